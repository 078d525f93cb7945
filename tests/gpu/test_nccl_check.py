"""GPU tier: `sglang-fleet nccl-check` on two supervised "nodes" of one GPU machine, with a real Consul.

Never in CI (scripts/test does not run it); scripts/gpu-validate runs it on a lent GPU machine. Each node is
a `python -m sglang_fleet nccl-check` process with its own FLEET_NODE_NAME and CUDA_VISIBLE_DEVICES; they
agree on ranks and the dist-init address through a real Consul dev agent, and run NCCL with the environment
launch.py builds. Both "nodes" share one host, so NCCL moves data over NVLink/P2P unless a case disables it.

Environment: FLEET_CONSUL_BIN (a Consul binary; required), FLEET_GPU_PYTHON (the Python with torch, default
this one), FLEET_NCCL_CHECK_BACKEND=gloo (run the same cases on CPUs: develops this file without GPUs),
FLEET_GPU_RESULTS (a folder: each case's summaries, records and logs are written there).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PY = os.environ.get("FLEET_GPU_PYTHON") or sys.executable
BACKEND = os.environ.get("FLEET_NCCL_CHECK_BACKEND", "nccl")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
RESULTS = Path(os.environ.get("FLEET_GPU_RESULTS") or Path(tempfile.gettempdir()) / "sglang-fleet-gpu")
MAX_BYTES = "256M" if BACKEND == "nccl" else "1M"


def _probe() -> dict:
    code = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
            "print(json.dumps({'gpus': n, 'torch': torch.__version__, 'nccl': "
            "'.'.join(map(str, torch.cuda.nccl.version())) if n else None}))")
    try:
        out = subprocess.run([ENGINE_PY, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": repr(exc)}


MACHINE = _probe()
GPUS = MACHINE.get("gpus", 0) if BACKEND == "nccl" else 4
if "error" in MACHINE:
    pytest.skip(f"no torch in FLEET_GPU_PYTHON={ENGINE_PY}: {MACHINE['error']}", allow_module_level=True)
if GPUS < 2:
    pytest.skip(f"needs 2 CUDA GPUs, torch in {ENGINE_PY} sees {GPUS} (gloo on CPUs: "
                f"FLEET_NCCL_CHECK_BACKEND=gloo)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def consul(tmp_path_factory):
    binary = os.environ.get("FLEET_CONSUL_BIN") or shutil.which("consul")
    if not binary:
        pytest.fail("FLEET_CONSUL_BIN is not set: point it at a Consul binary (scripts/install-consul prints one)")
    from sglang_fleet.config import ConsulSettings
    from sglang_fleet.consul_api import ConsulAPI, ConsulError
    ports = [free_port() for _ in range(4)]
    log = tmp_path_factory.mktemp("consul") / "consul.log"
    proc = subprocess.Popen([binary, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
                             "-http-port", str(ports[0]), "-serf-lan-port", str(ports[1]), "-serf-wan-port",
                             str(ports[2]), "-server-port", str(ports[3]), "-dns-port", "-1", "-grpc-port", "-1",
                             "-log-level", "warn"], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    api = ConsulAPI(ConsulSettings(http_addr=f"127.0.0.1:{ports[0]}"))
    deadline = time.monotonic() + 60
    while True:  # ready once it can create a session (leader elected, own node registered)
        try:
            api.session_destroy(api.session_create("probe", ["serfHealth"]))
            break
        except ConsulError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"Consul did not start: {log.read_text()[-1000:]}")
            time.sleep(0.2)
    yield api
    api.close()
    proc.kill()
    proc.wait(timeout=10)


def run_group(consul, case: str, nodes: list[str], tp_size: int, extra_env: dict | None = None,
              timeout: float = 240) -> list[dict]:
    """Starts one nccl-check per node (CUDA_VISIBLE_DEVICES given per node), waits, returns per node
    {rc, summary, sizes, log}."""
    # The machine's own NCCL settings stay, except those the profiles and the cases decide.
    from sglang_fleet import netprofile
    decided = {name for p in netprofile.PROFILES for name in netprofile.read_env_file(netprofile.profile_path(p))}
    decided |= {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"}
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("FLEET_", "CONSUL_", "CUDA_VISIBLE_DEVICES")) and k not in decided}
    base.update(MULTICAST_OFF)
    base.update({"CONSUL_HTTP_ADDR": consul.address, "FLEET_CLUSTER": f"gpu-{case}", "FLEET_GROUP": "g",
                 "FLEET_NNODES": str(len(nodes)), "FLEET_TP_SIZE": str(tp_size), "FLEET_MODEL_PATH": "nccl-check",
                 "FLEET_ENGINE_PYTHON": ENGINE_PY, "FLEET_ADVERTISE_ADDR": "127.0.0.1",
                 "FLEET_DIST_PORT": str(free_port()), "FLEET_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join([str(ROOT / "entrypoint")] + [p for p in [os.environ.get(
                     "PYTHONPATH")] if p])})
    base.update(extra_env or {})
    results_dir = RESULTS / case
    results_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, devices in enumerate(nodes):
        env = {**base, "FLEET_NODE_NAME": f"gpu-node-{'ab'[i]}", "CUDA_VISIBLE_DEVICES": devices}
        out, err = results_dir / f"node-{'ab'[i]}.out", results_dir / f"node-{'ab'[i]}.log"
        procs.append((subprocess.Popen([sys.executable, "-m", "sglang_fleet", "nccl-check", "--json",
                                        "--backend", BACKEND, "--max-bytes", MAX_BYTES, "--timeout", str(timeout - 30)],
                                       env=env, stdout=open(out, "w"), stderr=open(err, "w"), cwd=ROOT), out, err))
    nodes_out = []
    for proc, out, err in procs:
        rc = proc.wait(timeout=timeout)
        records = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
        summary = next((r for r in records if r.get("record") == "summary"), {})
        nodes_out.append({"rc": rc, "summary": summary, "log": out.read_text() + err.read_text(),
                          "sizes": [r for r in records if r.get("record") == "allreduce"]})
    (results_dir / "summary.json").write_text(json.dumps(
        {"case": case, "machine": MACHINE, "nodes": [{k: v for k, v in n.items() if k != "log"} for n in nodes_out]},
        indent=1))
    return nodes_out


def assert_group_passed(consul, case: str, nodes: list[dict], world: int) -> None:
    for n in nodes:
        assert n["rc"] == 0, f"nccl-check failed: {n['summary'].get('reason')}\n{n['log'][-3000:]}"
    summaries = [n["summary"] for n in nodes]
    assert sorted(s["rank"] for s in summaries) == list(range(len(nodes)))
    assert len({s["dist_init_addr"] for s in summaries}) == 1
    assert len({s["generation"] for s in summaries}) == 1
    for s in summaries:
        assert s["ok"] and s["all_correct"] and s["world_size"] == world and s["group"] == "g-nccl-check"
        for name, value in MULTICAST_OFF.items():
            assert s["env"].get(name) == value, f"{name} must reach the NCCL processes"
    sizes = nodes[0]["sizes"]
    assert sizes[0]["size"] == 8 and all(r["correct"] for r in sizes)
    # The generation was ended and the heartbeats withdrawn; the serving group "g" was never touched.
    _, entries = consul.kv_get_tree(f"sglang-fleet/gpu-{case}/groups/")
    keys = {e.key.split("/groups/", 1)[1] for e in entries}
    assert all(k.startswith("g-nccl-check/") for k in keys), keys
    assert not [k for k in keys if "/ranks/" in k or k.endswith("/leader")], keys
    assert not [s for s in consul.agent_services().values() if s["Service"] == "sglang-fleet-member"]


def test_two_nodes_one_gpu_each(consul):
    nodes = run_group(consul, "2x1", ["0", "1"], tp_size=2)
    assert_group_passed(consul, "2x1", nodes, world=2)
    env = nodes[0]["summary"]["env"]
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"  # from launch.py
    if BACKEND == "nccl":
        assert env["NCCL_IB_DISABLE"] == "1"  # the ethernet profile: no RDMA device here
        # "NET/Socket : Using [0]lo:127.0.0.1<0>" or "Bootstrap: Using lo:127.0.0.1<0>" (NCCL_DEBUG=INFO)
        assert re.search(r"(NET/Socket|Bootstrap|NCCL_SOCKET_IFNAME)[^\n]*\blo\b", nodes[0]["log"]), \
            "NCCL did not use the interface launch.py chose"


def test_two_nodes_forced_through_sockets(consul):
    """P2P and shared memory off: NCCL must carry the data over its socket transport on the profile's
    interface, as between two real hosts without RDMA."""
    nodes = run_group(consul, "2x1-socket", ["0", "1"], tp_size=2,
                      extra_env={"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"})
    assert_group_passed(consul, "2x1-socket", nodes, world=2)
    if BACKEND == "nccl":
        # "Channel 00/0 : 1[0] -> 0[1] [send] via NET/Socket/0"
        assert re.search(r"NET/Socket/\d", nodes[0]["log"]), "NCCL did not use its socket transport"


@pytest.mark.skipif(GPUS < 4, reason=f"needs 4 GPUs, this machine has {GPUS}")
def test_two_nodes_two_gpus_each(consul):
    nodes = run_group(consul, "2x2", ["0,1", "2,3"], tp_size=4)
    assert_group_passed(consul, "2x2", nodes, world=4)
    assert {n["summary"]["gpus_per_node"] for n in nodes} == {2}


def test_infiniband_profile_without_infiniband(consul):
    """FLEET_NET_PROFILE=infiniband on a host with no IB device, P2P and shared memory off so NCCL needs its
    network as between two hosts. What is certain: the profile reaches NCCL and the check ends within its
    timeout, either passing (NCCL falls back to sockets) or with a one-line reason. What happened is written
    to the results (outcome.json)."""
    nodes = run_group(consul, "ib-without-ib", ["0", "1"], tp_size=2, timeout=180,
                      extra_env={"FLEET_NET_PROFILE": "infiniband", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"})
    for n in nodes:
        assert n["summary"].get("env", {}).get("NCCL_IB_DISABLE") == "0" or n["rc"] != 0
        assert n["rc"] == 0 or (n["summary"]["reason"] and "\n" not in n["summary"]["reason"])
        assert "Traceback" not in n["log"]
    outcome = {"passed": all(n["rc"] == 0 for n in nodes), "reasons": [n["summary"].get("reason") for n in nodes],
               "nccl_net_lines": sorted({m for n in nodes for m in re.findall(
                   r"NCCL INFO ([^\n]*(?:NET/|IB|ibv)[^\n]{0,100})", n["log"])})[:40]}
    results = RESULTS / "ib-without-ib" / "outcome.json"
    results.write_text(json.dumps(outcome, indent=1))
    print(json.dumps(outcome))


def test_peer_never_comes(consul):
    """One node of two: the check says it waited for its peer, within its timeout, and cleans up."""
    nodes = run_group(consul, "alone", ["0"] * 1, tp_size=2, timeout=45,
                      extra_env={"FLEET_NNODES": "2"})
    assert nodes[0]["rc"] == 1
    assert "waiting for peers 1/2" in nodes[0]["summary"]["reason"]
    _, entries = consul.kv_get_tree("sglang-fleet/gpu-alone/groups/")
    assert not [e for e in entries if "/ranks/" in e.key]
