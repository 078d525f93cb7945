"""sglang-fleet checks the engine's flags with SGLang 0.5.23's own parser before anything starts: in `plan`
and at `node` start, with FLEET_ENGINE_PYTHON pointing at the SGLang venv while sglang-fleet's own Python has
no SGLang (the parser runs in the engine's Python). A flag SGLang does not take is exit 78 with SGLang's own
message; Consul is never reached (CONSUL_HTTP_ADDR points at a closed port)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BASE = {"FLEET_MODEL_PATH": "org/model", "FLEET_NODE_NAME": "node-a", "CONSUL_HTTP_ADDR": "127.0.0.1:1"}


@pytest.fixture
def fleet(sglang_python, tmp_path):
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
        return subprocess.run([sys.executable, "-m", "sglang_fleet", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path,
                              env={**clean, **BASE, "FLEET_ENGINE_PYTHON": sglang_python, **env})
    return run


def test_the_supervisors_python_has_no_sglang(tmp_path):
    """What makes the checks below go through FLEET_ENGINE_PYTHON (asked outside pytest: tests/sglang/ on
    pytest's path would pass for a namespace package)."""
    proc = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('sglang'))"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.stdout.strip() == "None"


def test_plan_refuses_an_unknown_flag_in_fleet_sglang_args(fleet, sglang_python):
    proc = fleet("plan", FLEET_SGLANG_ARGS="--bogus-flag 1")
    assert proc.returncode == 78 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (f"  - engine flags: SGLang's parser ({sglang_python}) rejects them: "
                                            "sglang.launch_server: error: unrecognized arguments: --bogus-flag 1")


def test_node_refuses_a_bad_value_after_double_dash_before_anything_starts(fleet):
    proc = fleet("node", "--", "--mem-fraction-static", "lots")
    assert proc.returncode == 78
    assert "argument --mem-fraction-static: invalid float value: 'lots'" in proc.stderr
    assert "Consul" not in proc.stderr and "Traceback" not in proc.stderr


def test_plan_accepts_real_flags_and_says_who_checked_them(fleet, sglang_python):
    proc = fleet("plan", "--json", "--", "--mem-fraction-static", "0.85", "--enable-metrics",
                 FLEET_SGLANG_ARGS="--chunked-prefill-size 4096")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert f"engine flags checked by SGLang's parser in {sglang_python}" in plan["warnings"]
    assert {"--mem-fraction-static", "--enable-metrics", "--chunked-prefill-size"} <= set(plan["argv"])


def test_plan_with_engine_keys_checks_the_key_file_flag_before_the_file_exists(fleet, sglang_python):
    """The keys' --config file is written only when the engine starts; the check must not need it."""
    proc = fleet("plan", "--json", FLEET_ENGINE_API_KEY="k3y", FLEET_ENGINE_ADMIN_API_KEY="adm1n")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert f"engine flags checked by SGLang's parser in {sglang_python}" in plan["warnings"]
    assert "--config" in plan["argv"] and "k3y" not in proc.stdout and "adm1n" not in proc.stdout
