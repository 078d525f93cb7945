"""`sglang-fleet plan` (plan.py): redaction, and the command through the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from sglang_fleet import launch, plan
from sglang_fleet.config import load_config


def run_plan(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_", "NCCL_", "GLOO_"))}
    return subprocess.run([sys.executable, "-m", "sglang_fleet", "plan", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- redaction

def test_redact_env():
    red = plan.redact_env({"HF_TOKEN": "a", "CONSUL_HTTP_TOKEN": "b", "MY_API_KEY": "c", "DB_PASSWORD": "d",
                           "AWS_SECRET_ACCESS_KEY": "e", "PATH": "/bin", "NCCL_DEBUG": "INFO"})
    assert red == {"HF_TOKEN": "***", "CONSUL_HTTP_TOKEN": "***", "MY_API_KEY": "***", "DB_PASSWORD": "***",
                   "AWS_SECRET_ACCESS_KEY": "***", "PATH": "/bin", "NCCL_DEBUG": "INFO"}


def test_redact_argv():
    argv = ["python3", "--api-key", "s", "--admin-api-key=t", "--max-prefill-tokens", "32768",
            "--hf-token", "u", "--enable-metrics", "--watermark-key", "v"]
    assert plan.redact_argv(argv) == ["python3", "--api-key", "***", "--admin-api-key=***",
                                      "--max-prefill-tokens", "32768", "--hf-token", "***",
                                      "--enable-metrics", "--watermark-key", "***"]


# ---------------------------------------------------------------- plan through the real CLI

def test_plan_json_done_when():
    env = {"FLEET_PRESET": "deepseek-r1-prefill", "FLEET_GROUP": "r1-prefill-a", "FLEET_NNODES": "2",
           "FLEET_NET_PROFILE": "infiniband"}
    proc = run_plan({**env, "HF_TOKEN": "hf_secret", "CONSUL_HTTP_TOKEN": "c"},
                    "--node-rank", "1", "--dist-init-addr", "10.0.0.1:20000", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"argv", "env", "warnings"}
    cfg = load_config({**env, "FLEET_NODE_NAME": "node-a"})
    assert out["argv"][3:] == launch.build_launch(cfg, 1, 2, "10.0.0.1:20000", "127.0.0.1", parent_env={}).argv[3:]
    assert out["argv"][out["argv"].index("--disaggregation-transfer-backend") + 1] == "mooncake"
    assert out["env"]["NCCL_IB_DISABLE"] == "0" and out["env"]["NCCL_IB_SPLIT_DATA_ON_QPS"] == "1"
    assert out["env"]["HF_TOKEN"] == "***"
    assert "CONSUL_HTTP_TOKEN" not in out["env"]
    assert "hf_secret" not in proc.stdout


def test_plan_text_is_a_runnable_command():
    proc = run_plan({"FLEET_PRESET": "llama-405b-tp16-2node", "FLEET_GROUP": "l", "FLEET_NET_PROFILE": "ethernet"},
                    "--node-rank", "0")
    assert proc.returncode == 0, proc.stderr
    assert "env -i" in proc.stdout and "python3 -m sglang.launch_server" in proc.stdout
    assert "--tp-size 16" in proc.stdout and "NCCL_IB_DISABLE=1" in proc.stdout
    assert "--dist-init-addr 127.0.0.1:20000" in proc.stdout  # rank 0: its own advertise address


def test_plan_for_router_is_refused():
    proc = run_plan({"FLEET_ROLE": "router"})
    assert proc.returncode == 78 and "FLEET_ROLE='router'" in proc.stderr


def test_bad_plan_arguments_exit_78_with_one_report():
    base = {"FLEET_MODEL_PATH": "org/model", "FLEET_NODE_NAME": "node-a"}
    proc = run_plan(base, "--node-rank", "3", "--dist-init-addr", "nohost")
    assert proc.returncode == 78 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "sglang-fleet: configuration error (2 problems):",
        "  - --node-rank=3: must be between 0 and FLEET_NNODES-1 (0)",
        "  - --dist-init-addr='nohost': expected host:port (port 1-65535)"]


def test_plan_names_the_engine_key_file_never_the_keys():
    proc = run_plan({"FLEET_MODEL_PATH": "m", "FLEET_NET_PROFILE": "ethernet", "FLEET_HTTP_PORT": "30111",
                     "FLEET_ENGINE_API_KEY": "plan-key-1", "FLEET_ENGINE_ADMIN_API_KEY": "plan-key-2"}, "--json")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[argv.index("--config") + 1].endswith("sglang-fleet-engine-30111.keys.yaml")
    assert "plan-key" not in proc.stdout + proc.stderr
