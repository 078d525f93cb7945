# One multi-node SGLang group (the guide's TP16 Llama-405B, TP32 4-node, or DeepSeek-V3 TP16/EP16) and
# an optional router, as a Nomad job with the Docker driver.
#   nomad job run -var preset=llama-405b-tp16-2node -var nnodes=2 compose/nomad/sglang-fleet-group.nomad.hcl
#   nomad job run -var preset=deepseek-v3-tp16-ep16-2node -var nnodes=2 -var group=dsv3-a ...
#   nomad job run -var preset=llama-405b-tp32-4node -var nnodes=4 ...
# One allocation per host (distinct_hosts). The node rank is claimed in Consul, NOT taken from
# NOMAD_ALLOC_INDEX: Nomad does not guarantee alloc indexes unique (a replacement allocation may reuse
# one while the old is still stopping); Consul's session-bound rank keys are.

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
variable "group" {
  type    = string
  default = "llama-405b-a"
}
variable "preset" {
  type    = string
  default = "llama-405b-tp16-2node"
}
variable "nnodes" {
  type    = number
  default = 2
}
variable "gpus_per_node" {
  type    = number
  default = 8
}

job "sglang-fleet-group" {
  datacenters = var.datacenters
  type        = "service"

  group "engine" {
    count = var.nnodes

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
      # Withdraw the serving registration, then stop the engine (FLEET_STOP_GRACE 30 s + margin).
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
        FLEET_GROUP          = var.group
        FLEET_PRESET         = var.preset
        FLEET_NNODES         = var.nnodes
        FLEET_NODE_NAME      = "${node.unique.name}"
        FLEET_ADVERTISE_ADDR = "${attr.unique.network.ip-address}"
      }

      # HF_TOKEN from Nomad Variables, never in the job file.
      template {
        destination = "secrets/hf.env"
        env         = true
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/sglang-fleet-group" }}HF_TOKEN={{ .hf_token }}{{ end }}
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
        FLEET_ROUTER_MODE = "regular"
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
