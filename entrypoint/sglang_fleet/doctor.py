"""`sglang-fleet doctor [--json]`: preflight checks on one host, before (or when) a group will not form.

Each check answers ok / warn / fail / skip with one sentence: what it saw and what to do (the guide's
Prerequisites, Troubleshooting and RDMA sections). Plan, advertise address, NCCL profile and engine env
come from launch.py and netprofile.py exactly as `node` builds them. Exit 1 when any check failed, else 0.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from sglang_fleet import consul_api as ca
from sglang_fleet import launch, netprofile
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import ConfigError, FleetConfig

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
MIN_NCCL = (2, 28, 3)  # the guide's prerequisite
MIN_SHM = 16 << 30  # SGLang's docker examples give 32 GiB (--shm-size 32g); Docker's default is 64 MiB
ROCE_MIN_MTU = 4096  # RoCE wants jumbo frames (the guide: mtu 9000)
CONSUL_TIMEOUT = 2.0
WEIGHT_GLOBS = ("*.safetensors", "*.bin")
# Checks only a GPU node running the real engine needs, and why the router and the sim engine skip them.
ENGINE_CHECKS = {"sglang": "SGLang not used", "gpu": "no GPU needed", "cpu": "no CPU kernels needed",
                 "transfer": "no KV transfer library loaded", "nccl": "no NCCL used", "rdma": "no RDMA used",
                 "model": "no model files loaded", "memory": "no shared or locked memory needed"}
# Runs in FLEET_ENGINE_PYTHON (the interpreter that has SGLang), not in the supervisor's own Python.
NCCL_PROBE = """import json
out = {"torch": None, "nccl": None}
try:
    import torch; out["torch"] = torch.__version__; v = torch.cuda.nccl.version()
    out["nccl"] = v if isinstance(v, int) else list(v)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Host:
    """Where the checks look; tests point these at fixtures."""
    dev_root: str = "/dev"
    shm_path: str = "/dev/shm"
    proc_root: str = "/proc"
    nvidia_smi: str = "nvidia-smi"
    memlock: int | None = None  # None: this process's RLIMIT_MEMLOCK
    env: Mapping[str, str] | None = None  # None: os.environ


@dataclass(frozen=True)
class Plan:
    advertise: str
    launch: launch.EngineLaunch | None
    error: str | None = None


def make_plan(cfg: FleetConfig, host: Host) -> Plan:
    advertise = netprofile.resolve_advertise_addr(cfg)
    if cfg.is_router:
        return Plan(advertise, None)
    try:
        dist_init = f"{advertise}:{cfg.dist_port}"  # what rank 0 would publish
        return Plan(advertise, launch.build_launch(cfg, cfg.node_rank or 0, cfg.nnodes, dist_init, advertise, host.env))
    except ConfigError as e:
        return Plan(advertise, None, "; ".join(e.problems))


def _profile(cfg: FleetConfig) -> str:
    return netprofile.detect(cfg.sysfs_root).profile if cfg.net_profile == "auto" else cfg.net_profile


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


# FLEET_DEVICE decides between the GPU checks and the CPU one.
DEVICE_CHECKS = {"cuda": {"cpu": "device cuda: the GPUs serve, not the CPU"},
                 "cpu": {"gpu": "device cpu: no GPU used", "nccl": "device cpu: the ranks talk over gloo, not NCCL"}}


def _not_here(cfg: FleetConfig, name: str) -> Check | None:
    if name in ENGINE_CHECKS and (cfg.is_router or cfg.engine == "sim"):
        return Check(name, SKIP, f"{'router role' if cfg.is_router else 'sim engine'}: {ENGINE_CHECKS[name]}.")
    why = DEVICE_CHECKS.get(cfg.device, {}).get(name)
    if why and not cfg.is_router:
        return Check(name, SKIP, why + ".")
    return None


# ---- the checks ---------------------------------------------------------------------------------------
def check_config(cfg: FleetConfig, plan: Plan) -> Check:
    if cfg.is_router:
        return Check("config", OK, f"router of cluster {cfg.cluster}: smg on {cfg.router_host}:{cfg.router_port}, "
                     f"mode {cfg.router_mode}, policy {cfg.router_policy}.")
    rank = f"fixed rank {cfg.node_rank}" if cfg.node_rank is not None else "rank claimed in Consul"
    what = (f"{cfg.role} group {cfg.group or cfg.node_name} of cluster {cfg.cluster} as node {cfg.node_name}: "
            f"{cfg.nnodes} node(s), {rank}, engine {cfg.engine}, {cfg.gpus_per_node} "
            f"{'GPU(s)' if cfg.device == 'cuda' else 'CPU TP rank(s)'} per node"
            + (f", preset {cfg.preset}" if cfg.preset else ""))
    if plan.launch is None:
        return Check("config", FAIL, f"{what}; the engine cannot be planned: {plan.error}.")
    notes = "; ".join(plan.launch.warnings)
    return Check("config", OK, what + (f"; launch notes: {notes}" if notes else "") + ".")


def count_gpus(host: Host) -> tuple[int, str]:
    """GPUs this host shows, and how they were counted."""
    devs = [p for p in Path(host.dev_root).glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    if devs:
        return len(devs), f"{host.dev_root}/nvidia<N>"
    exe = shutil.which(host.nvidia_smi)
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU ")), "nvidia-smi -L"
        except (OSError, subprocess.SubprocessError):
            pass
    return 0, f"no {host.dev_root}/nvidia<N> and no working {host.nvidia_smi}"


def check_gpu(cfg: FleetConfig, host: Host) -> Check:
    need = cfg.gpus_per_node
    found, source = count_gpus(host)
    env = os.environ if host.env is None else host.env
    if found and "CUDA_VISIBLE_DEVICES" in env:
        found = min(found, len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]))
        source += ", limited by CUDA_VISIBLE_DEVICES"
    saw = f"{found} GPU(s) visible ({source}); this node runs {need} ({cfg.world_size} GPUs / {cfg.nnodes} nodes)"
    if found < need:
        return Check("gpu", FAIL, f"{saw}: give the container the GPUs (docker run --gpus all, the NVIDIA runtime, "
                     f"Kubernetes nvidia.com/gpu: {need}) or lower FLEET_TP_SIZE.")
    return Check("gpu", OK, saw + (", the rest stay idle." if found > need else "."))


# The module SGLang 0.5.23 imports for each KV transfer backend (srt/disaggregation/<backend>/conn.py).
TRANSFER_MODULES = {"mooncake": "mooncake.engine", "mooncake_tcp": "mooncake.engine", "nixl": "nixl._api",
                    "mori": "mori.io", "ascend": "mf_adapter", "fake": None}


def check_transfer(cfg: FleetConfig, host: Host) -> Check:
    """Prefill/decode: which KV transfer backend the engine gets, and whether its library imports there."""
    if cfg.role not in ("prefill", "decode"):
        return Check("transfer", SKIP, f"role {cfg.role}: no KV transfer between groups.")
    profile = _profile(cfg)
    backend = launch.transfer_backend(cfg, profile)
    why = "FLEET_TRANSFER_BACKEND" if cfg.transfer_backend != "auto" else f"auto, network profile {profile}"
    module = TRANSFER_MODULES.get(backend)
    if module is None:
        return Check("transfer", WARN if backend == "fake" else OK, f"backend {backend} ({why}).")
    try:
        proc = subprocess.run([cfg.engine_python, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=60, env=None if host.env is None else dict(host.env))
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("transfer", WARN, f"backend {backend} ({why}); could not ask {cfg.engine_python} ({e}).")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Check("transfer", FAIL, f"backend {backend} ({why}), but `import {module}` fails in "
                     f"{cfg.engine_python}: {last}. Install its package in the engine's image, or choose another "
                     f"FLEET_TRANSFER_BACKEND.")
    return Check("transfer", OK, f"backend {backend} ({why}); `import {module}` works in {cfg.engine_python}.")


CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def check_cpu(cfg: FleetConfig, host: Host) -> Check:
    """FLEET_DEVICE=cpu: SGLang's CPU kernels need AVX-512; AMX is what makes bf16/int8 matmuls fast."""
    try:
        text = Path(host.proc_root, "cpuinfo").read_text()
    except OSError as e:
        return Check("cpu", WARN, f"cannot read {host.proc_root}/cpuinfo ({e.strerror}): CPU features not checked.")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "CPU")
    have = [f for f in CPU_FLAGS if f in flags]
    try:
        cores = launch.engine_cores(cfg)
        bind = launch.cpu_threads_bind(cores, cfg.gpus_per_node)
    except ValueError as e:
        return Check("cpu", FAIL, f"{model}: {e}: give the container more cores or lower FLEET_TP_SIZE.")
    saw = (f"{model} with {', '.join(have) or 'none of ' + ', '.join(CPU_FLAGS)}; {len(cores)} core(s) for "
           f"{cfg.gpus_per_node} TP rank(s) (SGLANG_CPU_OMP_THREADS_BIND={bind})")
    if "avx512f" not in flags:
        return Check("cpu", FAIL, f"{saw}: SGLang's CPU backend needs AVX-512 (Intel Xeon, Skylake-SP or newer).")
    if not {"amx_bf16", "amx_int8"} <= flags:
        return Check("cpu", WARN, f"{saw}: no AMX (Xeon 4th generation, Sapphire Rapids, or newer), so bf16 and "
                     f"int8 matmuls run on AVX-512 only: several times slower.")
    return Check("cpu", OK, saw + ".")


def nccl_version(raw: int | list[int]) -> tuple[int, ...]:
    """torch.cuda.nccl.version(): a tuple in current torch, an int code (2.9+: MMmmpp) in old ones."""
    if isinstance(raw, int):
        major = 10000 if raw >= 10000 else 1000
        return raw // major, raw % major // 100, raw % 100
    return tuple(int(x) for x in raw)


def check_sglang(cfg: FleetConfig, host: Host) -> Check:
    """The engine's SGLang against the release whose flags sglang-fleet emits."""
    py, target = cfg.engine_python, ".".join(map(str, launch.SGLANG_TARGET))
    try:
        proc = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('sglang'))"],
                              capture_output=True, text=True, timeout=60,
                              env=None if host.env is None else dict(host.env))
    except FileNotFoundError:
        return Check("sglang", FAIL, f"FLEET_ENGINE_PYTHON={py!r} does not exist: point it at the Python with SGLang.")
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("sglang", WARN, f"could not ask {py} for its SGLang version ({e}).")
    found = proc.stdout.strip()
    if proc.returncode or not found:
        return Check("sglang", FAIL, f"SGLang is not installed for FLEET_ENGINE_PYTHON={py}: use the SGLang image, "
                     f"or point FLEET_ENGINE_PYTHON at the Python that has it.")
    have = tuple(int(x) for x in re.findall(r"\d+", found)[:3])
    if cfg.attn_dp and have < launch.SGLANG_MIN_ATTN_DP:
        return Check("sglang", FAIL, f"SGLang {found} has no --attn-dp-size, which FLEET_ATTN_DP=1 emits: use SGLang "
                     f">= {'.'.join(map(str, launch.SGLANG_MIN_ATTN_DP))} (the image's default base is {target}).")
    if have != launch.SGLANG_TARGET:
        return Check("sglang", WARN, f"SGLang {found}; sglang-fleet emits SGLang {target}'s flags: compare "
                     f"`sglang-fleet plan` with `{py} -m sglang.launch_server --help`.")
    return Check("sglang", OK, f"SGLang {found} in {py}, the release sglang-fleet's command lines are checked against.")


def check_nccl(cfg: FleetConfig, host: Host) -> Check:
    py = cfg.engine_python
    try:
        proc = subprocess.run([py, "-c", NCCL_PROBE], capture_output=True, text=True, timeout=120,
                              env=None if host.env is None else dict(host.env))
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except FileNotFoundError:
        return Check("nccl", FAIL, f"FLEET_ENGINE_PYTHON={py!r} does not exist: point it at the Python with SGLang.")
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return Check("nccl", WARN, f"could not read torch's NCCL version from {py}: run "
                     f"`{py} -c 'import torch; print(torch.cuda.nccl.version())'` by hand.")
    if info.get("torch") is None:
        return Check("nccl", SKIP, f"torch is not importable by {py} ({info.get('error')}), NCCL not checked: "
                     f"on a GPU host set FLEET_ENGINE_PYTHON to the Python that has SGLang.")
    if info.get("nccl") is None:
        return Check("nccl", FAIL, f"torch {info['torch']} in {py} has no NCCL ({info.get('error')}): use a CUDA "
                     f"build of torch (the SGLang image).")
    have = nccl_version(info["nccl"])
    shown, need = ".".join(map(str, have)), ".".join(map(str, MIN_NCCL))
    if have < MIN_NCCL:
        return Check("nccl", FAIL, f"torch {info['torch']} uses NCCL {shown}, older than the {need} the guide "
                     f"requires: use an image with a newer NCCL (pip install -U nvidia-nccl-cu12).")
    return Check("nccl", OK, f"torch {info['torch']} in {py} uses NCCL {shown} (>= {need}).")


def check_rdma(cfg: FleetConfig, plan: Plan) -> Check:
    found, chosen = netprofile.detect(cfg.sysfs_root), cfg.net_profile
    saw = found.reason
    if chosen == "auto" and found.profile == "ethernet" and cfg.nnodes > 1:
        return Check("rdma", WARN, f"auto: {saw}, so NCCL uses TCP sockets between nodes (slow for serving): on an "
                     f"InfiniBand/RoCE host give the container /dev/infiniband and /sys (privileged, host network).")
    if chosen not in ("auto", found.profile):
        if found.profile == "ethernet":
            return Check("rdma", FAIL, f"FLEET_NET_PROFILE={chosen} but {saw}: NCCL cannot open IB queue pairs; "
                         f"check the HCAs (ibstatus, ibv_devinfo), pass /dev/infiniband into the container "
                         f"(privileged), or set FLEET_NET_PROFILE=ethernet.")
        if chosen == "ethernet":
            return Check("rdma", WARN, f"FLEET_NET_PROFILE=ethernet turns RDMA off (NCCL_IB_DISABLE=1) although "
                         f"{saw}: set FLEET_NET_PROFILE=auto to use it.")
        return Check("rdma", WARN, f"FLEET_NET_PROFILE={chosen} but {saw}: set it to {found.profile} or auto.")
    profile = found.profile if chosen == "auto" else chosen
    gid = (plan.launch.env if plan.launch else {}).get("NCCL_IB_GID_INDEX")
    if profile == "roce" and found.gid_index is None:
        return Check("rdma", WARN, f"profile roce: {saw}; NCCL_IB_GID_INDEX={gid} is the profile's guess: verify it "
                     f"with show_gids (a RoCE v2 GID of the HCA's IPv4 address).")
    if profile == "roce" and gid != str(found.gid_index):
        return Check("rdma", WARN, f"profile roce: {saw}, but the engine gets NCCL_IB_GID_INDEX={gid}: set "
                     f"NCCL_IB_GID_INDEX={found.gid_index} or FLEET_NET_PROFILE=auto.")
    extra = f", NCCL_IB_GID_INDEX={gid}" if profile == "roce" else ""
    return Check("rdma", OK, f"profile {profile} ({chosen}): {saw}{extra}.")


def check_network(cfg: FleetConfig, plan: Plan, host: Host) -> Check:
    addr = plan.advertise
    try:
        loopback = ipaddress.ip_address(addr).is_loopback
    except ValueError:
        loopback = False
    if loopback and cfg.nnodes > 1 and not cfg.is_router:
        # The sim demo runs every member on one host; a real group spans hosts.
        return Check("network", WARN if cfg.engine == "sim" else FAIL, f"advertise address {addr} is loopback but "
                     f"the group has {cfg.nnodes} nodes: peers on other hosts cannot reach it; set "
                     f"FLEET_ADVERTISE_ADDR to this host's cluster address (or CONSUL_HTTP_ADDR to a non-loopback "
                     f"agent: the default follows the route toward Consul).")
    ifname = netprofile.interface_for(addr, host.proc_root)
    if not ifname:
        return Check("network", WARN, f"advertise address {addr} is on no local interface (NAT or a container "
                     f"bridge?): NCCL/GLOO cannot bind it; use host networking (the guide's hostNetwork) or set "
                     f"FLEET_ADVERTISE_ADDR to a local address.")
    try:
        mtu: int | None = int((Path(cfg.sysfs_root) / "class" / "net" / ifname / "mtu").read_text())
    except (OSError, ValueError):
        mtu = None
    saw = f"advertise address {addr} on {ifname} (MTU {mtu or 'unknown'})"
    sock_if = (plan.launch.env if plan.launch else {}).get("NCCL_SOCKET_IFNAME")
    if sock_if and sock_if != ifname:
        saw += f", NCCL_SOCKET_IFNAME={sock_if} from the environment"
    if not cfg.is_router and _profile(cfg) == "roce" and mtu and mtu < ROCE_MIN_MTU:
        return Check("network", WARN, f"{saw}: RoCE wants jumbo frames; set MTU 9000 on the RoCE interfaces and "
                     f"switches (the guide: ifconfig <if> mtu 9000).")
    if loopback:
        saw += ": reachable from this host only (fine for a one-node group with a local router)"
    return Check("network", OK, saw + ".")


def port_problem(port: int, addr: str = "0.0.0.0") -> str | None:
    """Why `port` cannot be bound here (as the engine binds it), or None when it is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            s.bind((addr, port))
        except OSError as e:
            return (e.strerror or str(e)).lower()
    return None


def check_ports(cfg: FleetConfig) -> Check:
    if cfg.is_router:
        wanted = [("router", "FLEET_ROUTER_PORT", cfg.router_port),
                  ("router metrics", "FLEET_ROUTER_PROMETHEUS_PORT", cfg.router_prometheus_port)]
    else:
        wanted = [("HTTP", "FLEET_HTTP_PORT", cfg.http_port)]
        if cfg.node_rank in (None, 0):  # rank 0 binds the dist-init and bootstrap ports
            wanted += [("dist-init (rank 0)" if port == cfg.dist_port else "derived from dist-init (rank 0)",
                        "FLEET_DIST_PORT", port) for port in cfg.dist_ports]
            if cfg.role == "prefill":
                wanted.append(("bootstrap (prefill)", "FLEET_BOOTSTRAP_PORT", cfg.bootstrap_port))
    free, busy = [], []
    for label, env, port in wanted:
        why = port_problem(port)
        (busy if why else free).append(f"{label} {port}" + (f" {why} ({env})" if why else ""))
    if busy:
        also = f" (free: {', '.join(free)})" if free else ""
        return Check("ports", FAIL, f"cannot bind {'; '.join(busy)}{also}: stop what holds it (a leftover engine?) "
                     f"or choose another port; while this host's own node runs, its engine holds them.")
    return Check("ports", OK, f"free to bind: {', '.join(free)}.")


def model_fingerprint(config_json: Path, weights: list[Path]) -> str:
    """sha256 over config.json and the sorted names and sizes of the weight files (never their bytes)."""
    h = hashlib.sha256(config_json.read_bytes())
    for p in sorted(weights, key=lambda p: p.name):
        h.update(f"\n{p.name}\t{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def check_model(cfg: FleetConfig) -> Check:
    path = Path(cfg.model_path).expanduser()
    if not path.is_dir():
        if cfg.model_path.startswith(("/", ".", "~")) or path.exists():
            return Check("model", FAIL, f"FLEET_MODEL_PATH={cfg.model_path} is not a directory on this host: mount "
                         f"the same model on every node (shared storage such as NFS/Lustre) or copy it.")
        return Check("model", WARN, f"FLEET_MODEL_PATH={cfg.model_path} is not a local directory: every node downloads "
                     f"it from the Hugging Face hub; put one copy on shared storage and point FLEET_MODEL_PATH there.")
    config_json = path / "config.json"
    weights = sorted({p for g in WEIGHT_GLOBS for p in path.glob(g) if p.is_file()})
    problems = [] if config_json.is_file() else ["no config.json"]
    if not weights:
        problems.append("no *.safetensors or *.bin weight files")
    index = path / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values()) if index.is_file() else set()
    except (OSError, ValueError, AttributeError):
        shards = set()
        problems.append(f"{index.name} is unreadable")
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        problems.append(f"{len(missing)} shard(s) listed in {index.name} missing (first: {missing[0]})")
    if problems:
        return Check("model", FAIL, f"{path}: {', '.join(problems)}: this host's copy is incomplete; sync it again.")
    size = sum(p.stat().st_size for p in weights)
    return Check("model", OK, f"{path}: config.json and {len(weights)} weight file(s), {_gib(size)}, fingerprint "
                 f"{model_fingerprint(config_json, weights)}: compare it with doctor on every host.")


def memory_verdict(shm_bytes: int | None, memlock: int, rdma: bool, shm_path: str = "/dev/shm") -> Check:
    unlimited = memlock == resource.RLIM_INFINITY
    shm = "missing" if shm_bytes is None else _gib(shm_bytes)
    saw = f"{shm_path} {shm}, ulimit -l {'unlimited' if unlimited else _gib(memlock)}"
    todo = []
    if shm_bytes is None or shm_bytes < MIN_SHM:
        todo.append(f"give the container more shared memory ({_gib(MIN_SHM)} or more: docker run --shm-size 32g; "
                    f"Kubernetes: an emptyDir of medium Memory on /dev/shm)")
    if rdma and not unlimited:
        todo.append("RDMA needs unlimited locked memory (docker run --ulimit memlock=-1; the guide: "
                    "ulimit -l unlimited)")
    if todo:
        return Check("memory", WARN, f"{saw}: {'; '.join(todo)}.")
    return Check("memory", OK, saw + ("." if rdma else " (locked memory matters only for RDMA)."))


def check_memory(cfg: FleetConfig, host: Host) -> Check:
    try:
        st = os.statvfs(host.shm_path)
        shm: int | None = st.f_blocks * st.f_frsize
    except OSError:
        shm = None
    memlock = host.memlock if host.memlock is not None else resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return memory_verdict(shm, memlock, _profile(cfg) in ("infiniband", "roce"), host.shm_path)


def _reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return m.group(1).strip().lower() if m else ("timed out" if "timed out" in text.lower() else text[:200])


def check_consul(cfg: FleetConfig, timeout: float = CONSUL_TIMEOUT) -> tuple[Check, ca.ConsulAPI | None]:
    api = ca.ConsulAPI(cfg.consul, timeout=timeout)
    try:
        leader = api.leader()
    except ca.ConsulError as e:
        api.close()
        return Check("consul", FAIL, f"cannot reach Consul at {api.address} ({_reason(e)}): check CONSUL_HTTP_ADDR, "
                     f"that a Consul agent runs there (consul members) and no firewall is in between."), None
    if not leader:
        api.close()
        return Check("consul", FAIL, f"Consul at {api.address} answers but has no leader: the servers lack a "
                     f"quorum (consul operator raft list-peers)."), None
    return Check("consul", OK, f"Consul at {api.address} answers; raft leader {leader}."), api


def check_peers(cfg: FleetConfig, store: rdv.Store | None, advertise: str) -> Check:
    if cfg.is_router:
        return Check("peers", SKIP, "router role: no group to join.")
    if store is None:
        return Check("peers", SKIP, "Consul not usable: the group's members were not read.")
    r = rdv.Rendezvous(store, cfg, cfg.node_name, advertise)
    try:
        view = r.read(wait="1s")
    except ca.ConsulError as e:
        return Check("peers", FAIL, f"cannot read {r.keys.prefix} from Consul ({_reason(e)}): does the "
                     f"CONSUL_HTTP_TOKEN allow key reads under sglang-fleet/?")
    if view.generation is None:
        return Check("peers", OK, f"group {r.keys.group} has no keys in Consul yet: the first member creates it.")
    held = ", ".join(f"rank {n} {m.node} {m.addr}" for n, m in sorted(view.members.items())) or "none"
    saw = f"group {r.keys.group} generation {view.generation}: {len(view.members)}/{cfg.nnodes} rank(s) held ({held})"
    if view.ended:
        last = view.ended[max(view.ended)]
        saw += f"; generation {max(view.ended)} ended by {last.get('by', '?')}: {last.get('reason', '?')}"
    mismatches = rdv.fingerprint_mismatches(view, r.fingerprint, cfg.node_name)
    if mismatches:
        return Check("peers", FAIL, f"{saw}; {'; '.join(mismatches)}: nothing starts until every member has the "
                     f"same settings and SGLang image.")
    mine = [n for n, m in view.members.items() if m.node == cfg.node_name]
    if mine:
        return Check("peers", WARN, f"{saw}; node name {cfg.node_name} already holds rank {mine[0]}: fine if this "
                     f"host's node runs, else two hosts share the name (set FLEET_NODE_NAME).")
    if len(view.members) >= cfg.nnodes:
        return Check("peers", WARN, f"{saw}; every rank is taken: this node waits for one (wrong FLEET_GROUP?).")
    return Check("peers", OK, saw + ".")


# ---- running and printing -----------------------------------------------------------------------------
def run_checks(cfg: FleetConfig, host: Host | None = None, consul_timeout: float = CONSUL_TIMEOUT) -> list[Check]:
    host = host or Host()
    plan = make_plan(cfg, host)
    consul_check, api = check_consul(cfg, consul_timeout)
    steps = [
        ("config", lambda: check_config(cfg, plan)), ("sglang", lambda: check_sglang(cfg, host)),
        ("gpu", lambda: check_gpu(cfg, host)), ("cpu", lambda: check_cpu(cfg, host)),
        ("nccl", lambda: check_nccl(cfg, host)), ("rdma", lambda: check_rdma(cfg, plan)),
        ("transfer", lambda: check_transfer(cfg, host)),
        ("network", lambda: check_network(cfg, plan, host)), ("ports", lambda: check_ports(cfg)),
        ("model", lambda: check_model(cfg)), ("memory", lambda: check_memory(cfg, host)),
        ("consul", lambda: consul_check), ("peers", lambda: check_peers(cfg, api, plan.advertise)),
    ]
    checks = []
    for name, step in steps:
        if skip := _not_here(cfg, name):
            checks.append(skip)
            continue
        try:
            checks.append(step())
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            checks.append(Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}."))
    if api is not None:
        api.close()
    return checks


def format_text(checks: list[Check], tty: bool) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN, OK, SKIP)}
    summary = "doctor: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    if not tty:
        return "\n".join(f"{c.status:<4} {c.name}: {c.detail}" for c in checks) + "\n" + summary
    width = max(60, shutil.get_terminal_size((120, 24)).columns)
    lines = [f"{'CHECK':<8} {'STATUS':<6} DETAIL"]
    for c in checks:
        wrapped = textwrap.wrap(c.detail, width - 16) or [""]
        lines.append(f"{c.name:<8} {c.status.upper():<6} {wrapped[0]}")
        lines += [" " * 16 + more for more in wrapped[1:]]
    return "\n".join(lines + [summary])


def run(cfg: FleetConfig, as_json: bool = False, host: Host | None = None) -> int:
    checks = run_checks(cfg, host)
    ok = not any(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "ok": ok}, indent=2))
    else:
        print(format_text(checks, sys.stdout.isatty()))
    return 0 if ok else 1

