"""`sglang-fleet doctor`: each check on fixtures (sysfs trees, /dev trees, model directories, held ports, a
closed Consul port), and the CLI's output and exit codes."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_testing import free_port
from sglang_fleet import consul_api as ca
from sglang_fleet import doctor
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import load_config

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
NO_SMI = "sglang-fleet-test-no-nvidia-smi"


def closed_port() -> int:
    """A port nothing listens on, never the same as one handed out before (a test takes several)."""
    return free_port()


def cfg_of(**env):
    base = {"FLEET_NODE_NAME": "node-a", "FLEET_MODEL_PATH": "org/model", "FLEET_ADVERTISE_ADDR": "127.0.0.1",
            "FLEET_SYSFS_ROOT": str(SYSFS / "no-rdma"), "CONSUL_HTTP_ADDR": f"127.0.0.1:{closed_port()}"}
    return load_config({**base, **{k if k.isupper() else f"FLEET_{k.upper()}": str(v) for k, v in env.items()}})


def host(tmp_path: Path, **kw) -> doctor.Host:
    return doctor.Host(**{"dev_root": str(tmp_path), "nvidia_smi": NO_SMI, "env": {}, **kw})


def plan(cfg, tmp_path):
    return doctor.make_plan(cfg, host(tmp_path))


# ---- config ------------------------------------------------------------------------------------------
def test_config_shows_the_plan(tmp_path):
    cfg = cfg_of(role="prefill", group="pa", nnodes=2, node_rank=1, tp_size=16, preset="deepseek-r1-prefill")
    check = doctor.check_config(cfg, plan(cfg, tmp_path))
    assert check.status == doctor.OK
    for text in ("prefill group pa", "2 node(s)", "fixed rank 1", "engine sglang", "preset deepseek-r1-prefill",
                 "NCCL profile"):
        assert text in check.detail


def test_config_fails_when_the_engine_cannot_be_planned(tmp_path):
    cfg = dataclasses.replace(cfg_of(), net_profile="no-such-profile")
    check = doctor.check_config(cfg, plan(cfg, tmp_path))
    assert check.status == doctor.FAIL and "FLEET_NET_PROFILE" in check.detail


# ---- GPU ---------------------------------------------------------------------------------------------
def make_dev(tmp_path: Path, gpus: int) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in [f"nvidia{i}" for i in range(gpus)] + ["nvidiactl", "nvidia-uvm"]:
        (dev / name).touch()
    return dev


@pytest.mark.parametrize("tp, nnodes, status", [(2, 1, doctor.OK), (4, 2, doctor.OK), (4, 1, doctor.FAIL)])
def test_gpu_count_against_gpus_per_node(tmp_path, tp, nnodes, status):
    cfg = cfg_of(tp_size=tp, nnodes=nnodes, group="g")
    check = doctor.check_gpu(cfg, host(tmp_path, dev_root=str(make_dev(tmp_path, 2))))
    assert check.status == status
    assert "2 GPU(s) visible" in check.detail and f"this node runs {tp // nnodes}" in check.detail


def test_gpu_respects_cuda_visible_devices(tmp_path):
    check = doctor.check_gpu(cfg_of(tp_size=2), host(tmp_path, dev_root=str(make_dev(tmp_path, 8)),
                                                     env={"CUDA_VISIBLE_DEVICES": "3"}))
    assert check.status == doctor.FAIL and "CUDA_VISIBLE_DEVICES" in check.detail


def test_gpu_falls_back_to_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    check = doctor.check_gpu(cfg_of(tp_size=2), host(tmp_path, nvidia_smi=str(smi)))
    assert check.status == doctor.OK and "nvidia-smi -L" in check.detail


def test_no_gpu_fails_with_the_fix(tmp_path):
    check = doctor.check_gpu(cfg_of(), host(tmp_path))
    assert check.status == doctor.FAIL and "--gpus all" in check.detail


# ---- NCCL --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, version", [([2, 28, 3], (2, 28, 3)), (22803, (2, 28, 3)), (2708, (2, 7, 8))])
def test_nccl_version_forms(raw, version):
    assert doctor.nccl_version(raw) == version


def fake_torch(tmp_path: Path, nccl) -> dict[str, str]:
    """A `torch` package that only answers torch.cuda.nccl.version(), for the probe's subprocess."""
    pkg = tmp_path / "fake" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"__version__ = '2.9.0'\nclass cuda:\n    class nccl:\n"
                                     f"        version = staticmethod(lambda: {nccl!r})\n")
    return {"PYTHONPATH": str(pkg.parent), "PATH": os.environ.get("PATH", "")}


@pytest.mark.parametrize("nccl, status", [((2, 28, 3), doctor.OK), ((2, 27, 7), doctor.FAIL), (22900, doctor.OK)])
def test_nccl_version_against_the_guides_minimum(tmp_path, nccl, status):
    cfg = cfg_of(engine_python=sys.executable)
    check = doctor.check_nccl(cfg, host(tmp_path, env=fake_torch(tmp_path, nccl)))
    assert check.status == status and "2.28.3" in check.detail


def test_nccl_skips_without_torch(tmp_path):
    check = doctor.check_nccl(cfg_of(engine_python=sys.executable), host(tmp_path, env={"PYTHONPATH": ""}))
    if check.status != doctor.SKIP:
        pytest.skip("this interpreter has torch")
    assert "torch is not importable" in check.detail


def test_nccl_fails_on_a_missing_engine_python(tmp_path):
    check = doctor.check_nccl(cfg_of(engine_python=str(tmp_path / "no-python")), host(tmp_path))
    assert check.status == doctor.FAIL and "FLEET_ENGINE_PYTHON" in check.detail


# ---- SGLang ------------------------------------------------------------------------------------------
def fake_sglang(tmp_path: Path, version: str) -> dict[str, str]:
    """An installed-package record of `sglang` (what importlib.metadata reads), for the probe's subprocess."""
    info = tmp_path / "site" / f"sglang-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang\nVersion: {version}\n")
    return {"PYTHONPATH": str(info.parent), "PATH": os.environ.get("PATH", "")}


@pytest.mark.parametrize("version, attn_dp, status, text", [
    ("0.5.23", 0, doctor.OK, "SGLang 0.5.23"),
    ("0.5.24", 0, doctor.WARN, "compare `sglang-fleet plan`"),
    ("0.5.21", 0, doctor.WARN, "0.5.23's flags"),
    ("0.5.21", 1, doctor.FAIL, "no --attn-dp-size"),
    ("0.5.22", 1, doctor.WARN, "0.5.23's flags"),
])
def test_sglang_version_against_the_flags_emitted(tmp_path, version, attn_dp, status, text):
    cfg = cfg_of(engine_python=sys.executable, attn_dp=attn_dp, dp_size=2, tp_size=2)
    check = doctor.check_sglang(cfg, host(tmp_path, env=fake_sglang(tmp_path, version)))
    assert (check.status, text in check.detail) == (status, True), check.detail


def test_sglang_missing_fails_and_names_the_python(tmp_path):
    check = doctor.check_sglang(cfg_of(engine_python=sys.executable), host(tmp_path, env={"PYTHONPATH": ""}))
    assert check.status == doctor.FAIL and f"FLEET_ENGINE_PYTHON={sys.executable}" in check.detail


# ---- RDMA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tree, profile, nnodes, status, text", [
    ("infiniband", "auto", 2, doctor.OK, "profile infiniband (auto)"),
    ("roce", "auto", 2, doctor.OK, "NCCL_IB_GID_INDEX=3"),
    ("roce", "roce", 2, doctor.OK, "NCCL_IB_GID_INDEX=3"),
    ("roce-linklocal", "roce", 2, doctor.WARN, "NCCL_IB_GID_INDEX=1"),  # the profile's 3 is not a RoCE v2 GID
    ("roce-v1-only", "auto", 2, doctor.WARN, "show_gids"),
    ("no-rdma", "infiniband", 2, doctor.FAIL, "FLEET_NET_PROFILE=ethernet"),
    ("ports-down", "roce", 2, doctor.FAIL, "no ACTIVE port"),
    ("infiniband", "ethernet", 2, doctor.WARN, "FLEET_NET_PROFILE=auto"),
    ("roce", "infiniband", 2, doctor.WARN, "set it to roce"),
    ("no-rdma", "auto", 2, doctor.WARN, "TCP sockets"),
    ("no-rdma", "auto", 1, doctor.OK, "profile ethernet"),
])
def test_rdma_detection_against_the_chosen_profile(tmp_path, tree, profile, nnodes, status, text):
    cfg = cfg_of(sysfs_root=SYSFS / tree, net_profile=profile, nnodes=nnodes, group="g", tp_size=nnodes)
    check = doctor.check_rdma(cfg, plan(cfg, tmp_path))
    assert (check.status, text in check.detail) == (status, True), check.detail


# ---- network -----------------------------------------------------------------------------------------
def test_loopback_advertise_address_fails_for_a_multi_node_group(tmp_path):
    cfg = cfg_of(nnodes=2, group="g", tp_size=2)
    check = doctor.check_network(cfg, plan(cfg, tmp_path), host(tmp_path))
    assert check.status == doctor.FAIL and "127.0.0.1" in check.detail and "FLEET_ADVERTISE_ADDR" in check.detail


def test_loopback_only_warns_for_a_sim_group_on_one_host(tmp_path):
    cfg = cfg_of(nnodes=2, group="g", tp_size=2, engine="sim")
    assert doctor.check_network(cfg, plan(cfg, tmp_path), host(tmp_path)).status == doctor.WARN


def test_loopback_is_fine_for_one_node_and_names_the_interface(tmp_path):
    cfg = cfg_of()
    check = doctor.check_network(cfg, plan(cfg, tmp_path), host(tmp_path))
    assert check.status == doctor.OK and "127.0.0.1 on lo" in check.detail


def test_address_on_no_local_interface_warns(tmp_path):
    cfg = cfg_of(advertise_addr="192.0.2.10")  # TEST-NET-1: held by no interface here
    check = doctor.check_network(cfg, plan(cfg, tmp_path), host(tmp_path))
    assert check.status == doctor.WARN and "hostNetwork" in check.detail


def test_roce_without_jumbo_frames_warns(tmp_path):
    sysfs = tmp_path / "sys"
    shutil.copytree(SYSFS / "roce", sysfs)
    (sysfs / "class" / "net" / "lo").mkdir(parents=True)
    (sysfs / "class" / "net" / "lo" / "mtu").write_text("1500\n")
    cfg = cfg_of(sysfs_root=sysfs, net_profile="auto")
    check = doctor.check_network(cfg, plan(cfg, tmp_path), host(tmp_path))
    assert check.status == doctor.WARN and "MTU 1500" in check.detail and "9000" in check.detail


# ---- ports -------------------------------------------------------------------------------------------
def test_ports_free_and_in_use():
    http, dist, boot = closed_port(), closed_port(), closed_port()
    cfg = cfg_of(role="prefill", http_port=http, dist_port=dist, bootstrap_port=boot)
    check = doctor.check_ports(cfg)
    assert check.status == doctor.OK
    assert f"HTTP {http}" in check.detail and f"dist-init (rank 0) {dist}" in check.detail and str(boot) in check.detail
    with socket.socket() as held:
        held.bind(("127.0.0.1", boot))
        held.listen()
        check = doctor.check_ports(cfg)
    assert check.status == doctor.FAIL
    assert f"bootstrap (prefill) {boot} address already in use (FLEET_BOOTSTRAP_PORT)" in check.detail


def test_ranks_above_zero_do_not_need_the_dist_port():
    dist = closed_port()
    check = doctor.check_ports(cfg_of(nnodes=2, group="g", tp_size=2, node_rank=1, dist_port=dist))
    assert str(dist) not in check.detail


# ---- model files -------------------------------------------------------------------------------------
def make_model(root: Path, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
               config='{"architectures": ["LlamaForCausalLM"]}') -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(config)
    for i, name in enumerate(shards):
        (root / name).write_bytes(b"\0" * (100 + i))
    return root


def fingerprint_of(check) -> str:
    return check.detail.split("fingerprint ")[1].split(":")[0]


def test_model_directory_ok_with_a_fingerprint_equal_across_copies(tmp_path):
    a = doctor.check_model(cfg_of(model_path=make_model(tmp_path / "a")))
    b = doctor.check_model(cfg_of(model_path=make_model(tmp_path / "b")))
    assert a.status == b.status == doctor.OK and "2 weight file(s)" in a.detail
    assert fingerprint_of(a) == fingerprint_of(b)
    other = make_model(tmp_path / "c")
    (other / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 7)  # a truncated copy
    assert fingerprint_of(doctor.check_model(cfg_of(model_path=other))) != fingerprint_of(a)


@pytest.mark.parametrize("broken, text", [
    ("config", "no config.json"), ("weights", "no *.safetensors or *.bin"), ("shard", "1 shard(s) listed"),
])
def test_incomplete_model_directory_fails(tmp_path, broken, text):
    model = make_model(tmp_path / "m")
    if broken == "config":
        (model / "config.json").unlink()
    elif broken == "weights":
        for p in model.glob("*.safetensors"):
            p.unlink()
    else:
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00003-of-00003.safetensors"}}))
    check = doctor.check_model(cfg_of(model_path=model))
    assert check.status == doctor.FAIL and text in check.detail


def test_hub_id_warns_and_missing_path_fails(tmp_path):
    assert doctor.check_model(cfg_of(model_path="deepseek-ai/DeepSeek-V3")).status == doctor.WARN
    check = doctor.check_model(cfg_of(model_path=tmp_path / "absent"))
    assert check.status == doctor.FAIL and "NFS" in check.detail


# ---- memory ------------------------------------------------------------------------------------------
INF = doctor.resource.RLIM_INFINITY


@pytest.mark.parametrize("shm, memlock, rdma, status, text", [
    (32 << 30, INF, True, doctor.OK, "ulimit -l unlimited"),
    (64 << 20, INF, False, doctor.WARN, "--shm-size"),          # Docker's default 64 MiB
    (32 << 30, 8 << 20, True, doctor.WARN, "memlock=-1"),
    (32 << 30, 8 << 20, False, doctor.OK, "only for RDMA"),
])
def test_memory_verdict(shm, memlock, rdma, status, text):
    check = doctor.memory_verdict(shm, memlock, rdma)
    assert check.status == status and text in check.detail


def test_missing_shm_warns(tmp_path):
    check = doctor.check_memory(cfg_of(), host(tmp_path, shm_path=str(tmp_path / "no-shm"), memlock=INF))
    assert check.status == doctor.WARN and "missing" in check.detail


# ---- Consul and peers --------------------------------------------------------------------------------
def test_unreachable_consul_fails_with_its_address():
    cfg = cfg_of()
    check, api = doctor.check_consul(cfg, timeout=2.0)
    assert api is None and check.status == doctor.FAIL
    assert cfg.consul.http_addr in check.detail and "CONSUL_HTTP_ADDR" in check.detail
    assert doctor.check_peers(cfg, None, "127.0.0.1").status == doctor.SKIP


class KVTree:
    """The one read check_peers makes (kv_get_tree), over a fixed list of entries."""

    def __init__(self, entries):
        self.entries = entries

    def kv_get_tree(self, prefix, index=0, wait="10s"):
        return 7, [e for e in self.entries if e.key.startswith(prefix)]


def group_tree(cfg, members: dict[int, tuple[str, dict]]) -> KVTree:
    k = rdv.Keys(cfg.cluster, cfg.group)
    entries = [ca.KVEntry(k.gen, b"3", 5)]
    for r, (node, fp) in members.items():
        value = json.dumps({"node": node, "addr": "10.0.0.2", "fingerprint": fp}).encode()
        entries.append(ca.KVEntry(k.rank(3, r), value, 6, session=f"s{r}"))
    entries.append(ca.KVEntry(k.ended(2), json.dumps({"by": "node-b", "reason": "peer node-c left"}).encode(), 4))
    return KVTree(entries)


def test_peers_report_members_and_fingerprint_mismatches():
    cfg = cfg_of(nnodes=2, group="g", tp_size=2)
    same = rdv.fingerprint(cfg)
    check = doctor.check_peers(cfg, group_tree(cfg, {0: ("node-b", same)}), "127.0.0.1")
    assert check.status == doctor.OK
    assert "generation 3: 1/2 rank(s) held (rank 0 node-b 10.0.0.2)" in check.detail
    assert "ended by node-b: peer node-c left" in check.detail
    other = {**same, "model_path": "org/other-model"}
    check = doctor.check_peers(cfg, group_tree(cfg, {0: ("node-b", other)}), "127.0.0.1")
    assert check.status == doctor.FAIL and "differs in model_path" in check.detail
    check = doctor.check_peers(cfg, group_tree(cfg, {0: ("node-b", same), 1: ("node-c", same)}), "127.0.0.1")
    assert check.status == doctor.WARN and "every rank is taken" in check.detail
    check = doctor.check_peers(cfg, group_tree(cfg, {1: ("node-a", same)}), "127.0.0.1")
    assert check.status == doctor.WARN and "node-a already holds rank 1" in check.detail
    assert doctor.check_peers(cfg, KVTree([]), "127.0.0.1").status == doctor.OK


# ---- the whole command -------------------------------------------------------------------------------
def test_sim_engine_skips_the_gpu_checks(tmp_path):
    checks = doctor.run_checks(cfg_of(engine="sim"), host(tmp_path))
    by_name = {c.name: c for c in checks}
    assert [c.name for c in checks] == ["config", "sglang", "gpu", "cpu", "nccl", "rdma", "transfer", "network", "ports",
                                        "model", "memory", "consul", "peers"]
    assert by_name["gpu"].status == doctor.SKIP and "sim engine: no GPU" in by_name["gpu"].detail
    assert all(by_name[n].status == doctor.SKIP for n in doctor.ENGINE_CHECKS)


def test_router_role_checks_its_ports_and_consul_only(tmp_path):
    port = closed_port()
    checks = {c.name: c for c in doctor.run_checks(cfg_of(role="router", router_port=port), host(tmp_path))}
    assert checks["gpu"].detail == "router role: no GPU needed." and checks["peers"].status == doctor.SKIP
    assert checks["ports"].status == doctor.OK and f"router {port}" in checks["ports"].detail
    assert checks["config"].status == doctor.OK and "smg on" in checks["config"].detail


def test_exit_code_follows_failures(monkeypatch, capsys):
    cfg = cfg_of(engine="sim")
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, host=None: [doctor.Check("x", doctor.WARN, "w.")])
    assert doctor.run(cfg, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == {"checks": [{"name": "x", "status": "warn", "detail": "w."}],
                                                   "ok": True}
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, host=None: [doctor.Check("x", doctor.FAIL, "f.")])
    assert doctor.run(cfg) == 1
    assert "doctor: 1 fail, 0 warn, 0 ok, 0 skip" in capsys.readouterr().out


def test_table_wraps_on_a_tty(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # the detail column is 60 - 16 = 44 wide: nine words a line
    text = doctor.format_text([doctor.Check("model", doctor.WARN, "word " * 60),
                               doctor.Check("gpu", doctor.OK, "8 x H100.")], tty=True)
    nine = " ".join(["word"] * 9)
    assert text.splitlines() == [
        "CHECK    STATUS DETAIL",
        "model    WARN   " + nine,
        *[" " * 16 + nine] * 5,
        " " * 16 + " ".join(["word"] * 6),
        "gpu      OK     8 x H100.",
        "doctor: 0 fail, 1 warn, 1 ok, 0 skip",
    ]


def cli(*args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    return subprocess.run([sys.executable, "-m", "sglang_fleet", "doctor", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **env})


def test_cli_json_and_exit_code_one_when_consul_is_unreachable():
    port = closed_port()
    proc = cli("--json", FLEET_ENGINE="sim", FLEET_MODEL_PATH="org/model", FLEET_NODE_NAME="node-a",
               CONSUL_HTTP_ADDR=f"127.0.0.1:{port}", FLEET_HTTP_PORT=str(closed_port()),
               FLEET_DIST_PORT=str(closed_port()))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False and set(out) == {"checks", "ok"}
    assert all(set(c) == {"name", "status", "detail"} for c in out["checks"])
    consul = next(c for c in out["checks"] if c["name"] == "consul")
    assert consul["status"] == "fail" and f"127.0.0.1:{port}" in consul["detail"]


def test_cli_configuration_error_exits_78():
    proc = cli(FLEET_ENGINE="sim", FLEET_MODEL_PATH="m", FLEET_NNODES="2")
    assert proc.returncode == 78 and "FLEET_GROUP" in proc.stderr


# ---- FLEET_DEVICE=cpu ------------------------------------------------------------------------------------
def cpuinfo(tmp_path: Path, flags: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: Test Xeon\nflags\t\t: fpu sse2 {flags}\n\n")
    return str(proc)


@pytest.mark.parametrize("flags, status, says", [
    ("avx512f avx512_bf16 amx_tile amx_bf16 amx_int8", doctor.OK, "Test Xeon with avx512f, avx512_bf16, amx_tile"),
    ("avx512f", doctor.WARN, "no AMX"),
    ("avx2", doctor.FAIL, "needs AVX-512"),
])
def test_cpu_device_checks_avx512_and_amx(tmp_path, flags, status, says):
    cfg = cfg_of(device="cpu", cpu_cores="0-3", tp_size=2)
    check = doctor.check_cpu(cfg, host(tmp_path, proc_root=cpuinfo(tmp_path, flags)))
    assert check.status == status and says in check.detail
    assert "4 core(s) for 2 TP rank(s) (SGLANG_CPU_OMP_THREADS_BIND=0-1|2-3)" in check.detail


def test_cpu_device_skips_gpu_and_nccl_and_cuda_skips_cpu(tmp_path):
    cpu = {c.name: c for c in doctor.run_checks(cfg_of(device="cpu"), host(tmp_path))}
    assert cpu["gpu"].status == cpu["nccl"].status == doctor.SKIP and "device cpu" in cpu["nccl"].detail
    cuda = {c.name: c for c in doctor.run_checks(cfg_of(), host(tmp_path))}
    assert cuda["cpu"].status == doctor.SKIP and cuda["gpu"].status != doctor.SKIP


def test_cpu_device_with_fewer_cores_than_ranks_fails(tmp_path):
    check = doctor.check_cpu(cfg_of(device="cpu", cpu_cores="0", tp_size=2),
                             host(tmp_path, proc_root=cpuinfo(tmp_path, "avx512f amx_bf16 amx_int8")))
    assert check.status == doctor.FAIL and "1 core(s) for 2 TP rank(s)" in check.detail


# ---- KV transfer (prefill/decode) --------------------------------------------------------------------------
def test_transfer_backend_and_its_library(tmp_path):
    py = sys.executable  # has no mooncake
    check = doctor.check_transfer(cfg_of(role="decode", engine_python=py, net_profile="ethernet"), host(tmp_path))
    assert check.status == doctor.FAIL and "backend mooncake_tcp (auto, network profile ethernet)" in check.detail
    assert "`import mooncake.engine` fails" in check.detail
    fake = doctor.check_transfer(cfg_of(role="prefill", transfer_backend="fake"), host(tmp_path))
    assert fake.status == doctor.WARN and fake.detail == "backend fake (FLEET_TRANSFER_BACKEND)."
    regular = doctor.check_transfer(cfg_of(), host(tmp_path))
    assert regular.status == doctor.SKIP


def closed_port_run(length: int) -> int:
    """The first of `length` consecutive ports that nothing listens on (other tests run beside this one)."""
    while True:
        base = closed_port()
        try:
            for port in range(base, base + length):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def test_ports_cover_what_sglang_derives_from_the_dist_init_port():
    base = closed_port_run(14)
    checks = doctor.check_ports(cfg_of(dist_port=base, tp_size=4, dp_size=4, attn_dp=1, http_port=closed_port()))
    assert checks.status == doctor.OK
    for port in (base, *range(base + 1, base + 7), base + 13):
        assert str(port) in checks.detail
    plain = doctor.check_ports(cfg_of(dist_port=base, http_port=closed_port()))
    assert str(base + 1) not in plain.detail and f"dist-init (rank 0) {base}" in plain.detail
