# sglang-fleet as one Nomad job (Docker driver): one task group per multi-node SGLang group, one
# allocation per host, and the router that follows the groups' serving registrations in Consul.
# Defaults: the guide's two-node TP16 Llama-405B with a regular router:
#   nomad job run compose/nomad/sglang-fleet.nomad.hcl
#   nomad job run -var 'groups=[{name="dsv3-a",preset="deepseek-v3-tp16-ep16-2node",nnodes=2}]' -var cluster=dsv3 ...
#   nomad job run -var 'groups=[{name="llama-405b-a",preset="llama-405b-tp32-4node",nnodes=4}]' ...
# The guide's DeepSeek-R1 prefill/decode disaggregation (prefill group, decode group, PD router):
#   nomad job run -var-file compose/nomad/deepseek-r1-pd.vars.hcl compose/nomad/sglang-fleet.nomad.hcl
# Per-host IB devices for the KV transfer: -var 'ib_devices=mlx5_0,mlx5_1'.
# The node rank is claimed in Consul, NOT taken from NOMAD_ALLOC_INDEX: Nomad does not guarantee alloc
# indexes unique (a replacement allocation may reuse one while the old is still stopping); Consul's
# session-bound rank keys are.

variable "image" {
  type    = string
  default = "sglang-fleet:gpu"
}
variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}
variable "cluster" {
  type    = string
  default = "llama-405b"
}
# One entry per SGLang group: its FLEET_GROUP name, preset and number of hosts.
variable "groups" {
  type = list(object({
    name   = string
    preset = string
    nnodes = number
  }))
  default = [{ name = "llama-405b-a", preset = "llama-405b-tp16-2node", nnodes = 2 }]
}
variable "router_mode" {
  type    = string
  default = "regular"
}
variable "gpus_per_node" {
  type    = number
  default = 8
}
variable "ib_devices" {
  type    = string
  default = ""
}

locals {
  sglang_args = var.ib_devices == "" ? "" : "--disaggregation-ib-device ${var.ib_devices}"
}

job "sglang-fleet" {
  # One job per cluster, so several clusters share a Nomad namespace.
  id          = "sglang-fleet-${var.cluster}"
  datacenters = var.datacenters
  type        = "service"

  dynamic "group" {
    for_each = var.groups
    labels   = [group.value.name]

    content {
      count = group.value.nnodes

      constraint {
        operator = "distinct_hosts"
        value    = "true"
      }

      # The group restarts together through Consul; Nomad only replaces a failed container.
      restart {
        attempts = 3
        interval = "10m"
        delay    = "15s"
        mode     = "fail"
      }

      task "node" {
        driver       = "docker"
        kill_signal  = "SIGTERM"
        # Withdraw the serving registration, drain, stop the engine: FLEET_DRAIN_TIMEOUT 30 s + FLEET_STOP_GRACE 30 s + 15 s = 75 s <= 90 s.
        kill_timeout = "90s"

        config {
          image        = var.image
          network_mode = "host"
          ipc_mode     = "host"
          shm_size     = 34359738368
          privileged   = true
          ulimit {
            memlock = "-1"
            stack   = "67108864"
          }
          volumes = ["/models:/models:ro"]
        }

        env {
          # The Consul client agent on this host.
          CONSUL_HTTP_ADDR     = "${attr.unique.network.ip-address}:8500"
          FLEET_CLUSTER        = var.cluster
          FLEET_GROUP          = group.value.name
          FLEET_PRESET         = group.value.preset
          FLEET_NNODES         = group.value.nnodes
          FLEET_NODE_NAME      = "${node.unique.name}"
          FLEET_ADVERTISE_ADDR = "${attr.unique.network.ip-address}"
          FLEET_SGLANG_ARGS    = local.sglang_args
        }

        # HF_TOKEN from Nomad Variables, never in the job file.
        template {
          destination = "secrets/hf.env"
          env         = true
          data        = <<-EOT
          {{- with nomadVar "nomad/jobs/sglang-fleet-${var.cluster}" }}HF_TOKEN={{ .hf_token }}{{ end }}
          EOT
        }

        resources {
          cpu    = 16000
          memory = 65536
          device "nvidia/gpu" {
            count = var.gpus_per_node
          }
        }
      }
    }
  }

  group "router" {
    count = 1

    task "router" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
      kill_timeout = "60s"

      config {
        image        = var.image
        network_mode = "host"
      }

      env {
        CONSUL_HTTP_ADDR  = "${attr.unique.network.ip-address}:8500"
        FLEET_ROLE        = "router"
        FLEET_CLUSTER     = var.cluster
        FLEET_ROUTER_MODE = var.router_mode
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
