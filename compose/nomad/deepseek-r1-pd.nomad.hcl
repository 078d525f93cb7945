# The guide's DeepSeek-R1 prefill/decode disaggregation as a Nomad job: a 2-host prefill group, a
# 2-host decode group (one allocation per host) and the router (smg in PD mode) that follows the
# groups' serving registrations in Consul.
#   nomad job run compose/nomad/deepseek-r1-pd.nomad.hcl
# Ranks are claimed in Consul, never taken from NOMAD_ALLOC_INDEX (not guaranteed unique).
# Per-host IB devices: -var 'ib_devices=mlx5_0,mlx5_1'.

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
  default = "deepseek-r1"
}
variable "ib_devices" {
  type    = string
  default = ""
}

locals {
  sglang_args = var.ib_devices == "" ? "" : "--disaggregation-ib-device ${var.ib_devices}"
}

job "sglang-fleet-deepseek-r1" {
  datacenters = var.datacenters
  type        = "service"

  group "prefill" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "fail"
    }

    task "node" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
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
        CONSUL_HTTP_ADDR     = "${attr.unique.network.ip-address}:8500"
        FLEET_CLUSTER        = var.cluster
        FLEET_PRESET         = "deepseek-r1-prefill"
        FLEET_GROUP          = "r1-prefill-a"
        FLEET_NODE_NAME      = "${node.unique.name}"
        FLEET_ADVERTISE_ADDR = "${attr.unique.network.ip-address}"
        FLEET_SGLANG_ARGS    = local.sglang_args
      }

      resources {
        cpu    = 16000
        memory = 65536
        device "nvidia/gpu" {
          count = 8
        }
      }
    }
  }

  group "decode" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "fail"
    }

    task "node" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
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
        CONSUL_HTTP_ADDR     = "${attr.unique.network.ip-address}:8500"
        FLEET_CLUSTER        = var.cluster
        FLEET_PRESET         = "deepseek-r1-decode"
        FLEET_GROUP          = "r1-decode-a"
        FLEET_NODE_NAME      = "${node.unique.name}"
        FLEET_ADVERTISE_ADDR = "${attr.unique.network.ip-address}"
        FLEET_SGLANG_ARGS    = local.sglang_args
      }

      resources {
        cpu    = 16000
        memory = 65536
        device "nvidia/gpu" {
          count = 8
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
        FLEET_ROUTER_MODE = "pd"
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
