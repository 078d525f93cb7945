"""A one-node sim group run by the installed wheel (a fresh venv outside the checkout): it claims its rank
in the real Consul, starts the engine with the shipped NCCL profile and the flags given after `node --`,
registers, serves, and status says so."""
from __future__ import annotations

import json
import subprocess

import pytest

from fleet_processes import http
from fleet_testing import wait_until

pytestmark = pytest.mark.integration


def test_one_node_group_from_the_installed_wheel(supervisors, wheel_fleet_bin, tmp_path):
    sup = supervisors.start("wheel-n0", cwd=tmp_path, fleet_bin=wheel_fleet_bin, FLEET_GROUP="wheel",
                           FLEET_NET_PROFILE="ethernet", FLEET_SGLANG_ARGS="--mem-fraction-static 0.7",
                           engine_args=("--mem-fraction-static", "0.85", "--enable-metrics"))
    sup.wait_for("registered serving service", timeout=90)
    engine = next(iter(sup.engine_pids()))
    with open(f"/proc/{engine}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert argv[0].startswith(str(wheel_fleet_bin.parents[1]))  # the wheel's venv runs the sim engine
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.85" and "--enable-metrics" in argv
    with open(f"/proc/{engine}/environ", "rb") as f:
        env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
    assert env["NCCL_IB_DISABLE"] == "1"  # data/nccl/ethernet.env, read from the wheel
    status, _ = http("GET", sup.http_url + "/health")
    assert status == 200
    out = wait_until(lambda: (p := subprocess.run([str(wheel_fleet_bin), "status", "--json"], env=sup.env,
                                                  capture_output=True, text=True, timeout=60)).returncode == 0 and p,
                     30, "status from the wheel to report healthy")
    [group] = json.loads(out.stdout)["groups"]
    assert group["group"] == "wheel" and group["serving"]["health"] == "passing"
