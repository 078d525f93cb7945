"""The engine's command line and environment, from the configuration and the group assignment.

`build_launch()` is the single place that spells SGLang flags. It writes the canonical names of the
pinned SGLang (0.5.23): `--tp-size`, never the prefix-matched `--tp`; `--attn-dp-size N` for the
guide's deprecated `--dp-size N --enable-dp-attention`; `--cuda-graph-max-bs-decode` for the guide's
now ambiguous `--cuda-graph-max-bs`. docs/configuration.md has the full mapping; `sglang-fleet plan`
(plan.py) prints the result.

The environment is the parent's minus the supervisor's own FLEET_* / CONSUL_* settings (Consul's token
among them): SGLang 0.5.23 alone reads ~750 SGLANG_* variables (srt/environ.py) besides HOST_IP,
MASTER_ADDR, MOONCAKE_*, NIXL_*, ASCEND_*/HCCL_*, torch's and NCCL's, so an allowlist would always lag.
The NCCL/GLOO profile (netprofile.py), the CPU backend and the PD side channel add their variables; a
variable the user already set wins and is reported in `warnings`.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sglang_fleet import child, netprofile, secret_files
from sglang_fleet.config import ConfigError, FleetConfig, parse_cpu_list

SGLANG_MODULE = "sglang.launch_server"
# The SGLang release whose own parser checks every command line built here (tests/conformance), and the
# oldest that takes `--attn-dp-size` as a flag (0.5.20/0.5.21 spell it --dp-size N --enable-dp-attention).
SGLANG_TARGET = (0, 5, 23)
SGLANG_MIN_ATTN_DP = (0, 5, 22)

# The guide's (or older SGLang's) spellings -> what SGLang 0.5.23 accepts without prefix matching or
# deprecation warnings. `enable-dp-attention` and `disable-cuda-graph` are handled separately below.
FLAG_ALIASES = {
    "tp": "tp-size", "tensor-parallel-size": "tp-size",
    "ep": "ep-size", "expert-parallel-size": "ep-size",
    "dp": "dp-size", "data-parallel-size": "dp-size",
    "pp": "pp-size", "pipeline-parallel-size": "pp-size",
    "model": "model-path", "nccl-init-addr": "dist-init-addr",
    # SGLang 0.5.23 split it into -decode/-prefill; the old flag sized the decode CUDA graphs.
    "cuda-graph-max-bs": "cuda-graph-max-bs-decode",
    "cuda-graph-bs": "cuda-graph-bs-decode",
}

# FLEET_DEVICE=cpu: what SGLang's CPU guide preloads (Intel OpenMP from the engine's venv, then a faster
# malloc). Each one is preloaded only where it is installed.
CPU_PRELOADS = ("libiomp5.so", "libtcmalloc.so.4", "libtbbmalloc.so.2")
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")

@dataclass(frozen=True)
class EngineLaunch:
    argv: list[str]
    env: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    # (path, YAML text): the engine's API keys for SGLang's --config, written 0600 by the Engine before the
    # start and removed once the engine is ready or gone. Kept out of reprs (logs).
    secret_file: tuple[Path, str] | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # what the engine's output must not show


def key_config(cfg: FleetConfig) -> tuple[Path, str] | None:
    """The engine's API keys as SGLang's --config YAML (flag names as keys; SGLang merges it under the command
    line), at a path named after the engine's port; None without keys."""
    keys = {"api-key": cfg.engine_api_key, "admin-api-key": cfg.engine_admin_api_key}
    keys = {flag: key for flag, key in keys.items() if key}
    if not keys:
        return None
    path = secret_files.runtime_path(f"sglang-fleet-engine-{cfg.http_port}.keys.yaml")
    return path, yaml.safe_dump(keys)


def net_profile(cfg: FleetConfig) -> netprofile.NetProfile:
    try:
        return netprofile.resolve(cfg.net_profile, cfg.sysfs_root)
    except (netprofile.ProfileError, OSError) as e:
        raise ConfigError([f"FLEET_NET_PROFILE={cfg.net_profile!r}: {e}"]) from None


def transfer_backend(cfg: FleetConfig, profile: str) -> str:
    """FLEET_TRANSFER_BACKEND, or for auto what the network carries: SGLang's default `mooncake` speaks RDMA
    (MOONCAKE_PROTOCOL defaults to rdma), which an Ethernet-only host cannot open."""
    if cfg.transfer_backend != "auto":
        return cfg.transfer_backend
    return "mooncake_tcp" if profile == "ethernet" else "mooncake"


def engine_flags(cfg: FleetConfig, rank: int, nnodes: int, dist_init_addr: str,
                 profile: str) -> tuple[list[str], list[str]]:
    """SGLang flags (without the interpreter) and notes about mapped or overridden flags."""
    notes: list[str] = []
    flags: dict[str, Any] = {"model-path": cfg.model_path}
    if cfg.role in ("prefill", "decode"):
        flags["disaggregation-mode"] = cfg.role
        flags["disaggregation-transfer-backend"] = transfer_backend(cfg, profile)
    flags["tp-size"] = str(cfg.tp_size)
    if cfg.ep_size is not None:
        flags["ep-size"] = str(cfg.ep_size)
    if cfg.pp_size is not None:
        flags["pp-size"] = str(cfg.pp_size)
    if cfg.dp_size is not None:
        # SGLang 0.5.23: attention DP is its own width; `dp_size` would count model replicas.
        flags["attn-dp-size" if cfg.attn_dp else "dp-size"] = str(cfg.dp_size)
    flags["dist-init-addr"] = dist_init_addr
    flags["nnodes"] = str(nnodes)
    flags["node-rank"] = str(rank)
    if cfg.moe_a2a_backend:
        flags["moe-a2a-backend"] = cfg.moe_a2a_backend
    if cfg.dp_lm_head:
        flags["enable-dp-lm-head"] = True
    if cfg.ep_redundant_experts is not None:
        flags["ep-num-redundant-experts"] = str(cfg.ep_redundant_experts)
    if cfg.device == "cpu":
        flags["device"] = "cpu"
    if cfg.engine_metrics:  # SGLang serves /metrics on the engine's port only with this flag
        flags["enable-metrics"] = True

    for name, value in cfg.sglang_args:
        if name == "enable-dp-attention":
            width = flags.pop("dp-size", None) or flags.get("attn-dp-size")
            if width is None:
                notes.append("FLEET_SGLANG_ARGS --enable-dp-attention ignored: it needs FLEET_DP_SIZE")
                continue
            flags["attn-dp-size"] = width
            notes.append(f"FLEET_SGLANG_ARGS --enable-dp-attention written as --attn-dp-size {width} "
                         f"(SGLang 0.5.23 deprecates the old spelling)")
            continue
        if name == "disable-cuda-graph":
            flags["cuda-graph-backend-decode"] = "disabled"
            flags["cuda-graph-backend-prefill"] = "disabled"
            notes.append("FLEET_SGLANG_ARGS --disable-cuda-graph written as --cuda-graph-backend-decode "
                         "disabled --cuda-graph-backend-prefill disabled (SGLang 0.5.23 spelling)")
            continue
        canonical = FLAG_ALIASES.get(name, name)
        if canonical != name:
            notes.append(f"FLEET_SGLANG_ARGS --{name} written as --{canonical} (SGLang 0.5.23 spelling)")
        if canonical in flags and flags[canonical] != value:
            notes.append(f"FLEET_SGLANG_ARGS --{canonical} {_show(value)} overrides sglang-fleet's "
                         f"{_show(flags[canonical])}")
        flags[canonical] = value

    keys = key_config(cfg)
    if keys:
        flags["config"] = str(keys[0])
    # Appended last so they are easy to spot; the engine always listens on every interface.
    flags["host"] = "0.0.0.0"
    flags["port"] = str(cfg.http_port)
    if cfg.role == "prefill":
        flags["disaggregation-bootstrap-port"] = str(cfg.bootstrap_port)

    argv: list[str] = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, tuple):
            argv += [f"--{name}", *value]
        else:
            argv += [f"--{name}", str(value)]
    return argv, notes


def _show(value: Any) -> str:
    if value is True:
        return "(flag)"
    return " ".join(value) if isinstance(value, tuple) else str(value)


def engine_env(cfg: FleetConfig, advertise_addr: str, parent_env: Mapping[str, str] | None,
               profile: netprofile.NetProfile, proc_root: str = "/proc") -> tuple[dict[str, str], list[str]]:
    """The engine's complete environment and notes (profile choice, user values that won)."""
    env = child.inherited_env(parent_env)  # the one policy every child of the supervisor gets
    notes: list[str] = []
    notes.append(f"NCCL profile {profile.name} ({profile.reason})")
    wanted = dict(profile.env)
    source = {name: f"profile {profile.name}" for name in wanted}
    ifname = netprofile.interface_for(advertise_addr, proc_root) if advertise_addr else None
    if ifname:
        wanted["NCCL_SOCKET_IFNAME"] = ifname
        wanted["GLOO_SOCKET_IFNAME"] = ifname
    else:
        notes.append(f"no local interface holds the advertise address {advertise_addr!r}: "
                     f"NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME not set (NCCL and GLOO pick one)")
    if cfg.role in ("prefill", "decode") and advertise_addr:
        # Every prefill/decode TP rank binds its KV side channel (ZMQ) on get_local_ip_auto(): SGLANG_HOST_IP,
        # HOST_IP, else the interface routing to 8.8.8.8 (srt/utils/network.py), often a management network.
        if env.get("HOST_IP") and not env.get("SGLANG_HOST_IP"):  # SGLang skips empty values
            notes.append(f"HOST_IP={env['HOST_IP']} from the environment wins over SGLANG_HOST_IP={advertise_addr} "
                         f"(PD side channel)")
        else:
            wanted["SGLANG_HOST_IP"] = advertise_addr
            source["SGLANG_HOST_IP"] = "PD side channel"
    if cfg.device == "cpu":
        cpu_env, cpu_notes = cpu_engine_env(cfg)
        wanted.update(cpu_env)
        source.update(dict.fromkeys(cpu_env, "device cpu"))
        notes += cpu_notes
    for name, value in wanted.items():
        if name in env and env[name] != value:
            why = f" ({source[name]})" if name in source else ""
            notes.append(f"{name}={env[name]} from the environment wins over {value}{why}")
            continue
        env[name] = value
    if cfg.engine == "sim":
        # The sim reads its own knobs; everything else of FLEET_* stays with the supervisor.
        env["FLEET_SIM_STARTUP_DELAY"] = str(cfg.sim_startup_delay)
    return env, notes


def format_cpu_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (SGLang reads each rank's share in this form)."""
    runs: list[list[int]] = []
    for c in cores:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def cpu_threads_bind(cores: list[int], local_ranks: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND: the cores split into `local_ranks` contiguous shares, "|"-separated.

    SGLang indexes the list by the rank's local device id (0 .. ranks per node - 1: its numa_utils
    init_threads_binding), so every node of a group gets its own list built from its own cores."""
    if len(cores) < local_ranks:
        raise ValueError(f"{len(cores)} core(s) for {local_ranks} TP rank(s) on this node: each rank needs one")
    n = len(cores)
    return "|".join(format_cpu_list(cores[i * n // local_ranks:(i + 1) * n // local_ranks])
                    for i in range(local_ranks))


def engine_cores(cfg: FleetConfig) -> list[int]:
    """FLEET_CPU_CORES, else every core this process may run on (docker --cpuset-cpus, taskset)."""
    return parse_cpu_list(cfg.cpu_cores) if cfg.cpu_cores else sorted(os.sched_getaffinity(0))


def cpu_engine_env(cfg: FleetConfig, lib_dirs: tuple[str, ...] = SYSTEM_LIB_DIRS) -> tuple[dict[str, str], list[str]]:
    """The CPU backend's variables (SGLang's CPU guide), and a note on what was bound where."""
    try:
        bind = cpu_threads_bind(engine_cores(cfg), cfg.gpus_per_node)
    except ValueError as e:
        raise ConfigError([f"FLEET_CPU_CORES={cfg.cpu_cores or format_cpu_list(sorted(os.sched_getaffinity(0)))!r}: "
                           f"{e}"]) from None
    env = {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": bind}
    engine_py = shutil.which(cfg.engine_python) or cfg.engine_python
    dirs = (str(Path(engine_py).parent.parent / "lib"), *lib_dirs)  # the venv's lib (intel-openmp), then system
    found = [next((str(Path(d) / lib) for d in dirs if (Path(d) / lib).is_file()), None) for lib in CPU_PRELOADS]
    preloads = [p for p in found if p]
    if preloads:
        env["LD_PRELOAD"] = ":".join(preloads)
    missing = [lib for lib, p in zip(CPU_PRELOADS, found) if not p]
    notes = [f"device cpu: {cfg.gpus_per_node} TP rank(s) on cores {bind}"
             + (f"; not installed, not preloaded: {', '.join(missing)}" if missing else "")]
    return env, notes


def build_launch(cfg: FleetConfig, rank: int, nnodes: int, dist_init_addr: str, advertise_addr: str,
                 parent_env: Mapping[str, str] | None = None) -> EngineLaunch:
    """argv + env + warnings for this node's engine under the given assignment."""
    profile = net_profile(cfg)
    flags, flag_notes = engine_flags(cfg, rank, nnodes, dist_init_addr, profile.name)
    if cfg.engine == "sim":
        argv = [sys.executable, "-m", "sglang_fleet", "sim-engine", *flags]
    else:
        argv = [cfg.engine_python, "-m", SGLANG_MODULE, *flags]
    env, env_notes = engine_env(cfg, advertise_addr, parent_env, profile)
    warnings = flag_notes + env_notes
    try:
        if nnodes > 1 and ipaddress.ip_address(advertise_addr).is_loopback:
            warnings.append(f"advertise address {advertise_addr} is loopback: peers on other hosts cannot "
                            f"reach it (set FLEET_ADVERTISE_ADDR, or CONSUL_HTTP_ADDR to a remote agent)")
    except ValueError:
        pass
    return EngineLaunch(argv=argv, env=env, warnings=warnings, secret_file=key_config(cfg),
                        secrets=tuple(k for k in (cfg.engine_api_key, cfg.engine_admin_api_key) if k))


__all__ = ["EngineLaunch", "FLAG_ALIASES", "build_launch", "cpu_threads_bind", "engine_cores", "parse_cpu_list",
           "engine_env", "engine_flags"]
