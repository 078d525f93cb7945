"""The wheel carries what sglang-fleet reads at run time (presets, NCCL profiles, ACL policies): built,
installed in a fresh venv outside the checkout, and run from a directory that is not the checkout."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_installed(wheel_fleet_bin, tmp_path):
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_", "PYTHON"))}
        (tmp_path / "sys").mkdir(exist_ok=True)  # no RDMA devices: the ethernet profile
        return subprocess.run([str(wheel_fleet_bin), *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={**clean, "FLEET_SYSFS_ROOT": str(tmp_path / "sys"), **env})
    return run


def test_the_installed_package_is_the_wheel_not_the_checkout(wheel_fleet_bin):
    where = subprocess.run([str(wheel_fleet_bin.parent / "python"), "-c", "import sglang_fleet; "
                            "print(sglang_fleet.__file__)"], capture_output=True, text=True, cwd="/")
    assert Path(where.stdout.strip()).is_relative_to(wheel_fleet_bin.parents[1]), where
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)


def test_plan_with_default_settings_finds_the_nccl_profile(run_installed):
    proc = run_installed("plan", "--json", FLEET_MODEL_PATH="org/model")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["env"]["NCCL_IB_DISABLE"] == "1"  # from data/nccl/ethernet.env
    assert any(w.startswith("NCCL profile ethernet") for w in plan["warnings"])


def test_plan_with_a_shipped_preset(run_installed):
    proc = run_installed("plan", "--json", FLEET_PRESET="llama-405b-tp16-2node", FLEET_GROUP="g")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[argv.index("--tp-size") + 1] == "16" and argv[argv.index("--nnodes") + 1] == "2"


def test_acl_policy_is_shipped(run_installed):
    proc = run_installed("acl-policy", "node", "--cluster", "prod", "--consul-node", "agent-1")
    assert proc.returncode == 0, proc.stderr
    assert 'key_prefix "sglang-fleet/prod/" {' in proc.stdout


def test_doctor_json_from_the_installed_wheel(run_installed):
    proc = run_installed("doctor", "--json", FLEET_MODEL_PATH="org/model", CONSUL_HTTP_ADDR="127.0.0.1:1")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1  # no GPU, no SGLang, no Consul here: the report says so, nothing crashes
    assert checks["config"]["status"] == "ok", checks["config"]
    assert checks["rdma"]["status"] == "ok" and "profile ethernet" in checks["rdma"]["detail"]
    assert checks["consul"]["status"] == "fail"
