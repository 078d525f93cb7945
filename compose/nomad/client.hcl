# Nomad client settings sglang-fleet's job needs on every GPU host (merge into the client's config, e.g.
# /etc/nomad.d/client.hcl, and restart the agent). Checked against the job by tests/containers/test_deploy_files.py.

client {
  enabled = true

  # A task's kill_timeout is capped by this (default 30 s): with the default, Nomad SIGKILLs a node 30 s
  # after SIGTERM, in the middle of its drain. The job's node tasks ask for 90 s (FLEET_DRAIN_TIMEOUT 30 s +
  # FLEET_STOP_GRACE 30 s + 15 s = 75 s); raise both when you raise those settings.
  max_kill_timeout = "120s"
}

plugin "docker" {
  config {
    # RDMA devices for NCCL/DeepEP and the KV transfer (the job's `privileged = true`).
    allow_privileged = true
    # The model directory (the job's `volumes`).
    volumes {
      enabled = true
    }
  }
}

# GPUs as `device "nvidia/gpu"` (the job's resources): NVIDIA's device plugin, installed in the client's
# plugin_dir.
plugin "nomad-device-nvidia" {
  config {
    enabled = true
  }
}
