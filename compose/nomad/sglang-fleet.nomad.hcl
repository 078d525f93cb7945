# sglang-fleet as one Nomad job (Docker driver): one task group per multi-node SGLang group, one
# allocation per host, and the router that follows the groups' serving registrations in Consul.
# Defaults: the guide's two-node TP16 Llama-405B with a regular router:
#   nomad job run compose/nomad/sglang-fleet.nomad.hcl
#   nomad job run -var 'groups=[{name="dsv3-a",preset="deepseek-v3-tp16-ep16-2node",nnodes=2}]' -var cluster=dsv3 ...
#   nomad job run -var 'groups=[{name="llama-405b-a",preset="llama-405b-tp32-4node",nnodes=4}]' ...
# The guide's DeepSeek-R1 prefill/decode disaggregation (prefill group, decode group, PD router):
#   nomad job run -var-file compose/nomad/deepseek-r1-pd.vars.hcl compose/nomad/sglang-fleet.nomad.hcl
# Per-host IB devices for the KV transfer: -var 'ib_devices=mlx5_0,mlx5_1'.
# The client must allow the 90 s kill_timeout: max_kill_timeout (default 30 s) caps it; see client.hcl.
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
# How long a new allocation may take to pass its /readyz check (model download and load included) before
# the update counts as failed and is reverted.
variable "healthy_deadline_minutes" {
  type    = number
  default = 45
}

locals {
  sglang_args = var.ib_devices == "" ? "" : "--disaggregation-ib-device ${var.ib_devices}"
  # The supervisor's health endpoint (node and router agent, FLEET_HEALTH_PORT): /readyz gates deployments,
  # /livez failing 3 times restarts the task.
  health_checks = {
    readyz = { restart = false }
    livez  = { restart = true }
  }
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

      # A group is one NCCL job: replacing its members one at a time would re-form it once per member.
      # max_parallel = nnodes stops every old member and starts every new one at once: one re-formation.
      # No canaries: a canary would join the same FLEET_GROUP in Consul and find every rank taken.
      update {
        max_parallel      = group.value.nnodes
        health_check      = "checks"
        min_healthy_time  = "30s"
        healthy_deadline  = "${var.healthy_deadline_minutes}m"
        progress_deadline = "${var.healthy_deadline_minutes + 10}m"
        auto_revert       = true
      }

      # /livez and /readyz of the node supervisor (FLEET_HEALTH_PORT; its service is in the task, where
      # check_restart works). Static: one node per host.
      network {
        port "health" {
          static = 9400
        }
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
        # Withdraw the serving registration, drain, stop the engine: FLEET_DRAIN_TIMEOUT 30 s + FLEET_STOP_GRACE
        # 30 s + 15 s = 75 s <= 90 s. The client's max_kill_timeout must be >= 90 s (client.hcl).
        kill_timeout = "90s"

        # Nomad's own service catalog: the Consul catalog's `sglang` service is sglang-fleet's (rank 0 registers
        # the serving group there), so the scheduler's checks stay out of it.
        service {
          provider = "nomad"
          name     = "sglang-fleet-${var.cluster}-${group.value.name}"
          port     = "health"
          # /readyz: 200 only while this node is part of a serving generation, so a deployment is healthy when
          # the whole group serves, not when its containers started. /livez: a stalled supervisor loop
          # restarts the task (its group re-forms through Consul).
          dynamic "check" {
            for_each = local.health_checks
            content {
              name     = check.key
              type     = "http"
              path     = "/${check.key}"
              interval = "10s"
              timeout  = "3s"
              dynamic "check_restart" {
                for_each = check.value.restart ? [1] : []
                content {
                  limit = 3
                  grace = "60s"
                }
              }
            }
          }
        }

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

    update {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "10s"
      healthy_deadline = "5m"
      auto_revert      = true
    }

    # Dynamic: the router may share a host with a node, which holds 9400. Its service is in the task
    # (check_restart works only there).
    network {
      port "health" {}
    }

    task "router" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
      kill_timeout = "60s"

      service {
        provider = "nomad"
        name     = "sglang-fleet-${var.cluster}-router"
        port     = "health"
        # /readyz: 200 once smg answers and the agent has read Consul.
        dynamic "check" {
          for_each = local.health_checks
          content {
            name     = check.key
            type     = "http"
            path     = "/${check.key}"
            interval = "10s"
            timeout  = "3s"
            dynamic "check_restart" {
              for_each = check.value.restart ? [1] : []
              content {
                limit = 3
                grace = "60s"
              }
            }
          }
        }
      }

      config {
        image        = var.image
        network_mode = "host"
      }

      env {
        CONSUL_HTTP_ADDR  = "${attr.unique.network.ip-address}:8500"
        FLEET_ROLE        = "router"
        FLEET_CLUSTER     = var.cluster
        FLEET_ROUTER_MODE = var.router_mode
        FLEET_HEALTH_PORT = "${NOMAD_PORT_health}"
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
