"""Engine argv and env for each preset and role, the flag mapping, the CPU backend (launch.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from sglang_fleet import launch, netprofile
from sglang_fleet.config import load_config, preset_names

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
GUIDE_IB_DEVICES = "mlx5_bond_0,mlx5_bond_1,mlx5_bond_2,mlx5_bond_3"


def cfg_of(**env):
    base = {"FLEET_NODE_NAME": "node-a", "FLEET_NET_PROFILE": "ethernet"}
    return load_config({**base, **{k if k.isupper() else f"FLEET_{k.upper()}": str(v) for k, v in env.items()}})


def build(cfg, rank=0, dist="10.0.0.1:20000", advertise="127.0.0.1", parent=None):
    return launch.build_launch(cfg, rank, cfg.nnodes, dist, advertise, parent_env=parent or {})


def flags(argv):
    """argv after the interpreter part, as {flag: value or True}."""
    out, i = {}, 0
    rest = argv[4:] if argv[3] == "sim-engine" else argv[3:]
    while i < len(rest):
        name = rest[i][2:]
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out[name] = rest[i + 1]
            i += 2
        else:
            out[name] = True
            i += 1
    return out


# ---------------------------------------------------------------- argv

def test_engine_metrics_flag_follows_the_setting():
    assert "enable-metrics" in flags(build(cfg_of(model_path="m")).argv)
    assert "enable-metrics" not in flags(build(cfg_of(model_path="m", engine_metrics=0)).argv)


def test_guide_prefill_node1_argv():
    cfg = cfg_of(preset="deepseek-r1-prefill", group="r1-prefill-a", nnodes=2)
    argv = build(cfg, rank=1).argv
    assert argv == [
        "python3", "-m", "sglang.launch_server",
        "--model-path", "deepseek-ai/DeepSeek-R1",
        "--disaggregation-mode", "prefill",
        "--disaggregation-transfer-backend", "mooncake_tcp",  # ethernet profile
        "--tp-size", "16",
        "--attn-dp-size", "16",
        "--dist-init-addr", "10.0.0.1:20000",
        "--nnodes", "2",
        "--node-rank", "1",
        "--enable-metrics",  # FLEET_ENGINE_METRICS, on by default
        "--chunked-prefill-size", "524288",
        "--max-prefill-tokens", "32768",
        "--disable-radix-cache",
        "--disaggregation-ib-device", GUIDE_IB_DEVICES,
        "--host", "0.0.0.0",
        "--port", "30000",
        "--disaggregation-bootstrap-port", "8998",
    ]


def test_guide_decode_argv():
    f = flags(build(cfg_of(preset="deepseek-r1-decode", group="d"), rank=0).argv)
    assert f["disaggregation-mode"] == "decode"
    assert (f["cuda-graph-max-bs-decode"], f["max-running-requests"], f["port"]) == ("64", "2048", "30001")
    assert "disaggregation-bootstrap-port" not in f and "cuda-graph-max-bs" not in f


def test_deepseek_v3_argv():
    f = flags(build(cfg_of(preset="deepseek-v3-tp16-ep16-2node", group="v3"), rank=1).argv)
    assert {k: f[k] for k in ("tp-size", "ep-size", "attn-dp-size", "moe-a2a-backend", "ep-num-redundant-experts",
                              "enable-dp-lm-head", "node-rank")} == {
        "tp-size": "16", "ep-size": "16", "attn-dp-size": "16", "moe-a2a-backend": "deepep",
        "ep-num-redundant-experts": "32", "enable-dp-lm-head": True, "node-rank": "1"}
    assert "dp-size" not in f and "enable-dp-attention" not in f and "disaggregation-mode" not in f


@pytest.mark.parametrize("preset, tp, nnodes", [
    ("llama-405b-tp16-2node", "16", "2"), ("llama-405b-tp32-4node", "32", "4"),
    ("llama-405b-slurm-xgrammar", "16", "2"),
])
def test_llama_presets(preset, tp, nnodes):
    f = flags(build(cfg_of(preset=preset, group="l"), rank=1, dist="node0:8000").argv)
    assert (f["tp-size"], f["nnodes"], f["node-rank"], f["dist-init-addr"]) == (tp, nnodes, "1", "node0:8000")
    assert f["model-path"] == "meta-llama/Meta-Llama-3.1-405B-Instruct"
    assert (f["host"], f["port"]) == ("0.0.0.0", "30000")
    if preset.endswith("xgrammar"):
        assert f["grammar-backend"] == "xgrammar"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_uses_canonical_flags_only(name):
    cfg = cfg_of(preset=name, group="g")
    for rank in range(cfg.nnodes):
        f = flags(build(cfg, rank=rank).argv)
        assert not set(f) & set(launch.FLAG_ALIASES)
        assert not set(f) & {"enable-dp-attention", "disable-cuda-graph"}
        assert f["node-rank"] == str(rank)


def test_roles():
    regular = flags(build(cfg_of(model_path="m")).argv)
    assert "disaggregation-mode" not in regular and "disaggregation-bootstrap-port" not in regular
    prefill = flags(build(cfg_of(model_path="m", role="prefill", bootstrap_port=9001)).argv)
    assert (prefill["disaggregation-mode"], prefill["disaggregation-bootstrap-port"]) == ("prefill", "9001")
    decode = flags(build(cfg_of(model_path="m", role="decode")).argv)
    assert decode["disaggregation-mode"] == "decode" and "disaggregation-bootstrap-port" not in decode


def test_plain_dp_is_replicas():
    f = flags(build(cfg_of(model_path="m", tp_size=4, dp_size=2)).argv)
    assert f["dp-size"] == "2" and "attn-dp-size" not in f


def test_guide_spellings_are_rewritten():
    cfg = cfg_of(model_path="m", role="decode", tp_size=16, nnodes=2, group="g", dp_size=16,
                 sglang_args="--enable-dp-attention --cuda-graph-max-bs 64 --ep 16 --disable-cuda-graph")
    built = build(cfg)
    f = flags(built.argv)
    assert f["attn-dp-size"] == "16" and "dp-size" not in f
    assert f["cuda-graph-max-bs-decode"] == "64" and f["ep-size"] == "16"
    assert (f["cuda-graph-backend-decode"], f["cuda-graph-backend-prefill"]) == ("disabled", "disabled")
    said = "\n".join(built.warnings)
    for old in ("--enable-dp-attention", "--cuda-graph-max-bs", "--ep", "--disable-cuda-graph"):
        assert f"FLEET_SGLANG_ARGS {old} written as" in said


def test_extra_args_win_and_are_reported():
    built = build(cfg_of(model_path="m", tp_size=8, ep_size=8, sglang_args="--ep-size 4"))
    assert flags(built.argv)["ep-size"] == "4"
    assert any("--ep-size 4 overrides sglang-fleet's 8" in w for w in built.warnings)


def test_sim_engine_argv_has_the_same_flags():
    cfg = cfg_of(model_path="sim/tiny-chat", engine="sim", nnodes=2, tp_size=2, group="g")
    sim = build(cfg, rank=1).argv
    assert sim[:4] == [sys.executable, "-m", "sglang_fleet", "sim-engine"]
    real = build(cfg_of(model_path="sim/tiny-chat", nnodes=2, tp_size=2, group="g"), rank=1).argv
    assert sim[4:] == real[3:]


def test_engine_python_setting():
    assert build(cfg_of(model_path="m", engine_python="/opt/sglang/bin/python")).argv[0] == "/opt/sglang/bin/python"


# ---------------------------------------------------------------- env

PARENT = {
    "PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "0,1",
    "NVIDIA_VISIBLE_DEVICES": "all", "HF_TOKEN": "hf_secret", "HF_HOME": "/models/.hf",
    "NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "WARN", "GLOO_SOCKET_IFNAME": "ib0", "SGLANG_SET_CPU_AFFINITY": "true",
    "TORCH_CUDA_ARCH_LIST": "9.0", "PYTHONPATH": "/x", "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
    "TMPDIR": "/tmp", "FLEET_ROUTER_API_KEY": "router-secret", "FLEET_GROUP": "g",
    "CONSUL_HTTP_TOKEN": "consul-secret", "AWS_SECRET_ACCESS_KEY": "aws", "RANDOM_VAR": "x",
}


def test_env_is_the_parents_without_own_settings_or_consul_secrets():
    env = build(cfg_of(model_path="m"), parent=PARENT).env
    for name in ("PATH", "HOME", "LANG", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HF_TOKEN", "HF_HOME",
                 "NCCL_NVLS_ENABLE", "SGLANG_SET_CPU_AFFINITY", "TORCH_CUDA_ARCH_LIST", "PYTHONPATH",
                 "LD_LIBRARY_PATH", "TMPDIR", "AWS_SECRET_ACCESS_KEY", "RANDOM_VAR"):
        assert env[name] == PARENT[name], name
    assert not [k for k in env if k.startswith(("FLEET_", "CONSUL_"))]


def test_variables_sglang_and_its_backends_read_reach_the_engine():
    # Dropped by the former allowlist: SGLang 0.5.23 reads each of them (srt/utils/network.py, mooncake,
    # nixl, torch.distributed, Ascend).
    theirs = {"HOST_IP": "10.1.0.5", "SGLANG_HOST_IP": "10.1.0.6", "MOONCAKE_PROTOCOL": "tcp",
              "NIXL_PLUGIN_DIR": "/opt/nixl", "MASTER_ADDR": "10.1.0.1", "MASTER_PORT": "29500",
              "ASCEND_RT_VISIBLE_DEVICES": "0", "HCCL_BUFFSIZE": "200", "SGLANG_ENABLE_TORCH_COMPILE": "1"}
    env = build(cfg_of(model_path="m", role="decode"), parent={**theirs, "CONSUL_HTTP_TOKEN": "t",
                                                                 "FLEET_ROUTER_API_KEY": "k"}).env
    assert {k: env.get(k) for k in theirs} == theirs
    assert "CONSUL_HTTP_TOKEN" not in env and "FLEET_ROUTER_API_KEY" not in env


def test_pd_nodes_bind_their_side_channel_on_the_advertise_address():
    for role in ("prefill", "decode"):
        built = build(cfg_of(model_path="m", role=role), advertise="10.0.0.7")
        assert built.env["SGLANG_HOST_IP"] == "10.0.0.7"
    assert "SGLANG_HOST_IP" not in build(cfg_of(model_path="m"), advertise="10.0.0.7").env  # regular: no PD
    mine = build(cfg_of(model_path="m", role="decode"), advertise="10.0.0.7", parent={"SGLANG_HOST_IP": "10.9.9.9"})
    assert mine.env["SGLANG_HOST_IP"] == "10.9.9.9"
    assert "SGLANG_HOST_IP=10.9.9.9 from the environment wins over 10.0.0.7 (PD side channel)" in mine.warnings
    host_ip = build(cfg_of(model_path="m", role="prefill"), advertise="10.0.0.7", parent={"HOST_IP": "10.8.8.8"})
    assert "SGLANG_HOST_IP" not in host_ip.env and host_ip.env["HOST_IP"] == "10.8.8.8"
    assert any("HOST_IP=10.8.8.8 from the environment wins" in w for w in host_ip.warnings)


@pytest.mark.parametrize("profile, setting, backend", [
    ("ethernet", "auto", "mooncake_tcp"), ("infiniband", "auto", "mooncake"), ("roce", "auto", "mooncake"),
    ("ethernet", "nixl", "nixl"),
])
def test_transfer_backend_follows_the_network(profile, setting, backend):
    for role in ("prefill", "decode"):
        argv = build(cfg_of(model_path="m", role=role, net_profile=profile, transfer_backend=setting)).argv
        assert flags(argv)["disaggregation-transfer-backend"] == backend
    assert "--disaggregation-transfer-backend" not in build(cfg_of(model_path="m", net_profile=profile)).argv


def test_profile_env_and_user_values_win():
    built = build(cfg_of(model_path="m", net_profile="infiniband"), parent=PARENT)
    env = built.env
    assert (env["NCCL_IB_DISABLE"], env["NCCL_IB_QPS_PER_CONNECTION"], env["NCCL_NET_PLUGIN"]) == ("0", "8", "none")
    assert env["NCCL_DEBUG"] == "WARN"           # the user's value wins ...
    assert env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert env["NCCL_SOCKET_IFNAME"] == "lo"     # ... the interface of 127.0.0.1 fills the rest
    said = "\n".join(built.warnings)
    assert "NCCL_DEBUG=WARN from the environment wins over INFO (profile infiniband)" in said
    assert "GLOO_SOCKET_IFNAME=ib0 from the environment wins over lo" in said
    assert "NCCL profile infiniband" in said


def test_auto_profile_from_sysfs():
    env = build(cfg_of(model_path="m", net_profile="auto", sysfs_root=SYSFS / "roce")).env
    assert (env["NCCL_IB_DISABLE"], env["NCCL_IB_GID_INDEX"], env["NCCL_IB_TC"]) == ("0", "3", "136")
    env = build(cfg_of(model_path="m", net_profile="auto", sysfs_root=SYSFS / "no-rdma")).env
    assert env["NCCL_IB_DISABLE"] == "1" and "NCCL_IB_GID_INDEX" not in env


def test_no_interface_for_a_foreign_advertise_address():
    built = build(cfg_of(model_path="m"), advertise="192.0.2.10")
    assert "NCCL_SOCKET_IFNAME" not in built.env
    assert any("no local interface holds the advertise address '192.0.2.10'" in w for w in built.warnings)


def test_sim_gets_its_knob_only():
    env = build(cfg_of(model_path="m", engine="sim", sim_startup_delay=2.5), parent=PARENT).env
    assert env["FLEET_SIM_STARTUP_DELAY"] == "2.5"
    assert [k for k in env if k.startswith("FLEET_")] == ["FLEET_SIM_STARTUP_DELAY"]


def test_loopback_advertise_for_a_multinode_group_is_flagged():
    built = build(cfg_of(model_path="m", nnodes=2, tp_size=2, group="g"))
    assert any("is loopback" in w for w in built.warnings)


def test_resolve_advertise_addr():
    assert netprofile.resolve_advertise_addr(cfg_of(model_path="m", advertise_addr="10.1.2.3")) == "10.1.2.3"
    # UDP connect() toward the local Consul only picks a route; nothing is sent.
    assert netprofile.resolve_advertise_addr(cfg_of(model_path="m", CONSUL_HTTP_ADDR="127.0.0.1:8500")) == "127.0.0.1"


# ---- FLEET_DEVICE=cpu ------------------------------------------------------------------------------------
def test_cpu_device_flag_and_engine_env(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    (venv / "bin" / "python").write_text("")
    system = tmp_path / "syslib"
    system.mkdir()
    (system / "libtbbmalloc.so.2").write_bytes(b"")
    cfg = cfg_of(FLEET_MODEL_PATH="/m", FLEET_DEVICE="cpu", FLEET_TP_SIZE="4", FLEET_NNODES="2", FLEET_GROUP="g", FLEET_CPU_CORES="0-3,8-11",
                 FLEET_ENGINE_PYTHON=str(venv / "bin" / "python"))
    env, notes = launch.cpu_engine_env(cfg, lib_dirs=(str(system),))
    # 2 TP ranks on this node (4 over 2 nodes), each with its own contiguous half of the cores.
    assert env == {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": "0-3|8-11",
                   "LD_PRELOAD": f"{venv}/lib/libiomp5.so:{system}/libtbbmalloc.so.2"}
    assert notes == ["device cpu: 2 TP rank(s) on cores 0-3|8-11; not installed, not preloaded: libtcmalloc.so.4"]
    argv = build(cfg).argv
    assert flags(argv)["device"] == "cpu"


def test_cuda_device_has_no_cpu_env():
    cfg = cfg_of(FLEET_MODEL_PATH="/m")
    spec = build(cfg)
    assert "--device" not in spec.argv
    assert not {"SGLANG_USE_CPU_ENGINE", "SGLANG_CPU_OMP_THREADS_BIND"} & set(spec.env)


def test_cpu_threads_bind_splits_and_refuses_too_few_cores():
    assert launch.cpu_threads_bind([0, 1, 2, 3, 4], 2) == "0-1|2-4"
    assert launch.cpu_threads_bind([5], 1) == "5"
    with pytest.raises(ValueError, match="1 core\\(s\\) for 2 TP rank\\(s\\)"):
        launch.cpu_threads_bind([0], 2)


def test_user_threads_bind_wins_and_is_reported():
    cfg = cfg_of(FLEET_MODEL_PATH="/m", FLEET_DEVICE="cpu", FLEET_CPU_CORES="0-1")
    spec = build(cfg, parent={"SGLANG_CPU_OMP_THREADS_BIND": "7"})
    assert spec.env["SGLANG_CPU_OMP_THREADS_BIND"] == "7"
    assert "SGLANG_CPU_OMP_THREADS_BIND=7 from the environment wins over 0-1 (device cpu)" in spec.warnings


def test_bad_device_and_cpu_cores_are_config_errors():
    from sglang_fleet.config import ConfigError

    with pytest.raises(ConfigError) as info:
        cfg_of(FLEET_MODEL_PATH="/m", FLEET_DEVICE="gpu", FLEET_CPU_CORES="0-x")
    assert info.value.problems == [
        "FLEET_DEVICE='gpu': must be one of cuda, cpu",
        "FLEET_CPU_CORES='0-x': '0-x' is not a core number or a range (a Linux CPU list, e.g. 0-31,64-95)"]


# ---------------------------------------------------------------- the engine's API keys

def test_engine_keys_go_in_a_config_file_never_on_the_command_line_or_in_the_environment():
    cfg = cfg_of(model_path="m", engine_api_key="ek-1", engine_admin_api_key="adm-2", http_port=30123)
    spec = build(cfg, parent={"FLEET_ENGINE_API_KEY": "ek-1", "PATH": "/bin"})
    path, text = spec.secret_file
    assert flags(spec.argv)["config"] == str(path) and path.name == "sglang-fleet-engine-30123.keys.yaml"
    assert yaml.safe_load(text) == {"api-key": "ek-1", "admin-api-key": "adm-2"}  # SGLang's flag names
    assert not {"ek-1", "adm-2"} & set(spec.argv) and "ek-1" not in spec.env.values()
    assert set(spec.secrets) == {"ek-1", "adm-2"} and "ek-1" not in repr(spec)
    plain = build(cfg_of(model_path="m"))
    assert plain.secret_file is None and "config" not in flags(plain.argv)
