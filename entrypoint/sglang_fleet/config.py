"""Configuration: frozen settings built from preset YAML <- config file <- environment (env wins).

Every setting has one key. The environment spells it `FLEET_<KEY>`, preset and config files spell it
`<key>`. `load_config()` collects every problem and raises one `ConfigError`; the CLI turns that into a
report and exit 78, before anything is started.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

EX_CONFIG = 78  # sysexits.h: configuration error

ROLES = ("prefill", "decode", "regular", "router")
NODE_ROLES = ("prefill", "decode", "regular")
ENGINES = ("sglang", "sim")
DEVICES = ("cuda", "cpu")
NET_PROFILES = ("auto", "ethernet", "infiniband", "roce")
ROUTER_MODES = ("auto", "pd", "regular")
# SGLang 0.5.23's --disaggregation-transfer-backend choices (srt/arg_groups/choices.py), and auto.
TRANSFER_BACKENDS = ("auto", "mooncake", "mooncake_tcp", "nixl", "ascend", "mori", "fake")
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "least_load", "consistent_hashing",
                   "prefix_hash")
# SGLang 0.5.23's --moe-a2a-backend choices.
MOE_A2A_BACKENDS = ("none", "deepep", "mooncake", "nixl", "mori", "ascend_fuseep", "flashinfer", "megamoe",
                    "deepep_v2", "ascend_tp", "pplx", "flashinfer_megamoe")
# Flags sglang-fleet writes itself (and their aliases): FLEET_* settings or the rendezvous decide them.
RESERVED_ENGINE_FLAGS = {
    "nnodes": "FLEET_NNODES", "node-rank": "the rendezvous (or FLEET_NODE_RANK)",
    "dist-init-addr": "the rendezvous (FLEET_DIST_PORT on rank 0)", "nccl-init-addr": "the rendezvous",
    "tp-size": "FLEET_TP_SIZE", "tp": "FLEET_TP_SIZE", "tensor-parallel-size": "FLEET_TP_SIZE",
    "model-path": "FLEET_MODEL_PATH", "model": "FLEET_MODEL_PATH", "port": "FLEET_HTTP_PORT",
    "host": "sglang-fleet (always 0.0.0.0)", "disaggregation-mode": "FLEET_ROLE",
    "disaggregation-transfer-backend": "FLEET_TRANSFER_BACKEND",
    "disaggregation-bootstrap-port": "FLEET_BOOTSTRAP_PORT",
}
PREFILL_ONLY_ENGINE_FLAGS = frozenset({"chunked-prefill-size", "max-prefill-tokens",
                                       "disaggregation-bootstrap-port"})

# Consul keys and service IDs are built from these names: keep them to a safe alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

PRESET_DIRS = (
    Path(os.environ.get("FLEET_PRESET_DIR", "/nonexistent")),
    Path(__file__).resolve().parents[2] / "config" / "presets",  # source checkout
    Path("/etc/sglang-fleet/presets"),  # the container image
)

# SGLang flags that set up one host, not the group: they may differ between members.
PER_HOST_ENGINE_FLAGS = frozenset({
    "disaggregation-ib-device", "base-gpu-id", "gpu-id-step", "host", "port", "log-level",
    "mem-fraction-static", "enable-metrics", "log-requests",
})


class ConfigError(Exception):
    """Every problem found in one configuration; str() is the report a user sees."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    example: str = ""
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "FLEET_" + self.key.upper()


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _int(text: str) -> int:
    if isinstance(text, bool):
        raise ValueError("expected a whole number")
    if isinstance(text, int):
        return text
    if not re.fullmatch(r"\s*-?\d+\s*", str(text)):
        raise ValueError("expected a whole number")
    return int(text)


def _opt_int(text: str) -> int | None:
    return None if text in (None, "") else _int(text)


def _float(text: str) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a number")
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None


def _str(text: str) -> str:
    return "" if text is None else str(text).strip()


def _opt_str(text: str) -> str | None:
    return _str(text) or None


def parse_cpu_list(text: str) -> list[int]:
    """A Linux CPU list ("0-3,8,10-11") as sorted core numbers; ValueError when malformed."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part!r} is not a core number or a range (a Linux CPU list, e.g. 0-31,64-95)")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"range {part!r} runs backwards")
        cores.update(range(lo, hi + 1))
    return sorted(cores)


def _cpu_cores(text: str) -> str:
    text = _str(text)
    if text:
        parse_cpu_list(text)
    return text


def _engine_args(value: Any) -> tuple[tuple[str, Any], ...]:
    """Extra SGLang arguments as ordered (flag, value) pairs; value True means a bare flag.

    Accepts a YAML mapping {flag: value}, a YAML list of tokens, or a shell-quoted string.
    """
    return tuple((name, val) for name, val in _engine_args_layer(value) if val is not None)


def _engine_args_layer(value: Any) -> tuple[tuple[str, Any], ...]:
    """Like _engine_args, but a YAML `flag: false` (or null) yields (flag, None): drop an inherited flag."""
    if value in (None, ""):
        return ()
    if isinstance(value, Mapping):
        pairs = []
        for flag, val in value.items():
            name = str(flag).lstrip("-").replace("_", "-")
            if val is False or val is None:
                pairs.append((name, None))
                continue
            pairs.append((name, True if val is True else str(val)))
        return tuple(pairs)
    tokens = shlex.split(value) if isinstance(value, str) else [str(t) for t in value]
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"expected a --flag, got {tok!r}")
        name, eq, inline = tok[2:].partition("=")
        name = name.replace("_", "-")
        if eq:
            pairs.append((name, inline))
            i += 1
            continue
        vals = []
        while i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            vals.append(tokens[i + 1])
            i += 1
        pairs.append((name, True if not vals else " ".join(vals) if len(vals) == 1 else tuple(vals)))
        i += 1
    return tuple(pairs)


SETTINGS: tuple[Setting, ...] = (
    # Who this node is.
    Setting("role", _str, "regular", "What this container runs: a node of a prefill, decode or regular "
            "(non-disaggregated) group, or the router.", "prefill", ROLES),
    Setting("cluster", _str, "default", "One deployment; several clusters may share one Consul.", "prod-r1"),
    Setting("group", _str, "", "The nodes that together form ONE SGLang server (one --nnodes launch). "
            "Required when nnodes > 1; defaults to the node name for a one-node group.", "r1-prefill-a"),
    Setting("nnodes", _int, 1, "Number of nodes in this group (SGLang --nnodes).", "2"),
    Setting("node_rank", _opt_int, None, "Fixed rank for this node (e.g. $SLURM_NODEID or a pod index). "
            "Unset: the rank is claimed in Consul.", "1"),
    Setting("node_name", _str, "", "This node's name in Consul; defaults to the hostname.", "gpu-host-07"),
    Setting("rank0", _bool, False, "Prefer rank 0 when claiming a rank (the node whose address becomes "
            "the dist-init address).", "1"),
    # What it runs.
    Setting("engine", _str, "sglang", "sglang: python -m sglang.launch_server. sim: the CPU stand-in for "
            "demos and tests on machines without GPUs.", "sim", ENGINES),
    Setting("device", _str, "cuda", "cuda: NVIDIA GPUs. cpu: SGLang's CPU backend on Intel Xeon (AVX-512, AMX "
            "where present): --device cpu, SGLANG_USE_CPU_ENGINE=1, each TP rank of this node bound to its share "
            "of FLEET_CPU_CORES, Intel OpenMP and tcmalloc/tbbmalloc preloaded where installed "
            "(docs/deployment.md, Xeon hosts).", "cpu", DEVICES),
    Setting("cpu_cores", _cpu_cores, "", "FLEET_DEVICE=cpu: the cores this node's engine may use, as a Linux CPU list; "
            "split evenly over the node's TP ranks (SGLANG_CPU_OMP_THREADS_BIND). Default: every core this "
            "container may run on.", "0-31,64-95"),
    Setting("preset", _opt_str, None, "Name of a preset in config/presets (the guide's configurations).",
            "deepseek-r1-prefill"),
    Setting("model_path", _str, "", "Model path or Hugging Face id (SGLang --model-path).",
            "/models/DeepSeek-R1"),
    Setting("tp_size", _int, 1, "Tensor parallel size across ALL nodes of the group (--tp-size).", "16"),
    Setting("ep_size", _opt_int, None, "Expert parallel size (--ep-size); usually equal to tp_size.", "16"),
    Setting("dp_size", _opt_int, None, "Data parallel size (--dp-size).", "16"),
    Setting("pp_size", _opt_int, None, "Pipeline parallel size (--pp-size).", "2"),
    Setting("attn_dp", _bool, False, "Data-parallel attention (the guide's --enable-dp-attention; emitted as "
            "SGLang 0.5.23's --attn-dp-size <dp_size>).", "1"),
    Setting("dp_lm_head", _bool, False, "Data-parallel LM head (--enable-dp-lm-head); needs attn_dp.", "1"),
    Setting("moe_a2a_backend", _opt_str, None, "MoE all-to-all backend (--moe-a2a-backend).", "deepep",
            MOE_A2A_BACKENDS),
    Setting("ep_redundant_experts", _opt_int, None, "Redundant expert copies (--ep-num-redundant-experts).",
            "32"),
    Setting("sglang_args", _engine_args, (), "Extra SGLang arguments, shell-quoted (a YAML mapping "
            "{flag: value} in presets and FLEET_CONFIG). Merged flag by flag over the lower layers (preset < "
            "config file < env); in YAML `flag: false` drops an inherited flag. They win over sglang-fleet's "
            "own flags, except the reserved ones (--nnodes, --node-rank, --dist-init-addr, --tp-size, "
            "--model-path, --host, --port, --disaggregation-*) which have FLEET_* settings. The guide's "
            "old spellings are rewritten (see the flag mapping).",
            "--chunked-prefill-size 8192 --disable-radix-cache"),
    Setting("engine_python", _str, "python3", "Interpreter that runs `-m sglang.launch_server` (the one "
            "with SGLang installed; the sim engine always uses sglang-fleet's own).", "/opt/venv/bin/python"),
    # Network.
    Setting("advertise_addr", _str, "", "Address peers and the router use to reach this node; defaults "
            "to the address of the interface that routes to Consul.", "10.0.0.12"),
    Setting("http_port", _int, 30000, "The engine's HTTP port (--port).", "30000"),
    Setting("dist_port", _int, 20000, "Port of the dist-init address on rank 0 (--dist-init-addr).", "20000"),
    Setting("transfer_backend", _str, "auto", "Prefill/decode nodes: how the KV moves "
            "(--disaggregation-transfer-backend). auto: mooncake (RDMA) on the infiniband and roce profiles, "
            "mooncake_tcp on ethernet (SGLang's default mooncake needs RDMA and cannot start without it).",
            "nixl", TRANSFER_BACKENDS),
    Setting("bootstrap_port", _int, 8998, "Prefill KV bootstrap port (--disaggregation-bootstrap-port).",
            "8998"),
    Setting("net_profile", _str, "auto", "NCCL/GLOO profile from config/nccl; auto detects InfiniBand and "
            "RoCE in /sys/class/infiniband.", "infiniband", NET_PROFILES),
    Setting("sysfs_root", _str, "/sys", "Where auto detection reads sysfs (tests point it at fixtures).",
            "/sys"),
    # Supervision.
    Setting("ready_timeout", _float, 1800.0, "Seconds the engine may take to become ready (model loading).",
            "3600"),
    Setting("stop_grace", _float, 30.0, "Seconds between SIGTERM and SIGKILL when stopping the engine.", "30"),
    Setting("drain_timeout", _float, 30.0, "On a graceful stop (SIGTERM of any member), most seconds rank 0 "
            "waits, after withdrawing its serving registration, for the requests in flight to finish before the "
            "engine is stopped; 0 stops at once. A container's stop timeout must be at least drain_timeout + "
            "stop_grace + 15.", "60"),
    Setting("start_attempts", _int, 3, "One-node groups: engine start attempts (exit before ready, or not "
            "ready in time) before the generation is given up. In a multi-node group the first failed start "
            "ends the generation for the whole group (its peers wait in SGLang's rendezvous and cannot take a "
            "lone restarted rank back).", "3"),
    Setting("max_failures", _int, 5, "Consecutive failed generations caused by this node before it goes "
            "FATAL and exits non-zero.", "5"),
    Setting("backoff_base", _float, 1.0, "First backoff in seconds; doubles per consecutive failure.", "1"),
    Setting("backoff_max", _float, 60.0, "Largest backoff in seconds.", "60"),
    Setting("stable_after", _float, 300.0, "Seconds a generation must serve before the failure count "
            "resets.", "300"),
    Setting("sim_startup_delay", _float, 0.0, "Sim engine only: seconds to pretend to load the model.", "5"),
    Setting("log_format", _str, "auto", "auto (console on a TTY, else JSON), json or console.", "json",
            ("auto", "json", "console")),
    # Router role.
    Setting("router_host", _str, "0.0.0.0", "Address the router (smg) listens on.", "0.0.0.0"),
    Setting("router_port", _int, 8000, "Port the router (smg) listens on.", "8000"),
    Setting("router_mode", _str, "auto", "pd: smg runs with --pd-disaggregation and routes the prefill and "
            "decode groups; regular: plain routing over the regular groups; auto: follows the roles passing in "
            "Consul (pd while any prefill/decode group passes or none does, regular when only regular groups "
            "do; a change restarts smg).", "pd", ROUTER_MODES),
    Setting("router_policy", _str, "cache_aware", "smg load-balancing policy.", "round_robin",
            ROUTER_POLICIES),
    Setting("router_api_key", _opt_str, None, "API key smg requires from clients (--api-key).", "s3cret"),
    Setting("router_prometheus_port", _int, 29000, "smg's own Prometheus port.", "29000"),
    Setting("router_health_interval", _int, 10, "smg's worker health-check interval in seconds.", "10"),
    Setting("router_health_timeout", _int, 20, "Seconds smg waits for a worker's /health "
            "(--health-check-timeout-secs; smg's default 5). SGLang's /health runs a one-token generation and "
            "may take up to SGLANG_HEALTH_CHECK_TIMEOUT (20 s) on a busy engine before it answers.", "20"),
    Setting("router_shutdown_grace", _int, 30, "On stop, seconds smg lets requests in flight finish "
            "(--shutdown-grace-period-secs; smg's default 180); the agent SIGKILLs smg 5 s after that. The "
            "router container's stop timeout must be longer.", "30"),
    Setting("router_breaker_open", _int, 5, "Seconds smg's circuit breaker keeps a failing worker closed off "
            "(--cb-timeout-duration-secs; smg's own default is 60). The agent withdraws a dead group within "
            "about 2 s, and in PD mode a dead prefill also trips the healthy decode's breaker, so a long open "
            "time would stop all PD traffic for that long.", "5"),
    Setting("router_quiet_window", _float, 0.5, "Seconds of quiet before new or changed groups are added to "
            "smg (batches a flapping check, like consul-template's wait); a group that stops passing is "
            "withdrawn at once.", "0.5"),
    Setting("router_resync_interval", _float, 5.0, "Seconds between full comparisons of smg's workers with "
            "Consul even when Consul is quiet (catches an smg restart or a hand edit).", "5"),
    Setting("router_args", _engine_args, (), "Extra smg arguments, shell-quoted.", "--request-timeout-secs 600"),
)
SETTING_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class ConsulSettings:
    http_addr: str = "127.0.0.1:8500"
    token: str | None = None
    ssl: bool = False
    cacert: str | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        addr = self.http_addr.split("://", 1)[-1]
        host, _, port = addr.rpartition(":")
        return (host or "127.0.0.1"), int(port or 8500)

    @property
    def scheme(self) -> str:
        if self.http_addr.startswith("https://"):
            return "https"
        return "https" if self.ssl else "http"


@dataclass(frozen=True)
class FleetConfig:
    role: str = "regular"
    cluster: str = "default"
    group: str = ""
    nnodes: int = 1
    node_rank: int | None = None
    node_name: str = ""
    rank0: bool = False
    engine: str = "sglang"
    device: str = "cuda"
    cpu_cores: str = ""
    preset: str | None = None
    model_path: str = ""
    tp_size: int = 1
    ep_size: int | None = None
    dp_size: int | None = None
    pp_size: int | None = None
    attn_dp: bool = False
    dp_lm_head: bool = False
    moe_a2a_backend: str | None = None
    ep_redundant_experts: int | None = None
    sglang_args: tuple[tuple[str, Any], ...] = ()
    engine_python: str = "python3"
    advertise_addr: str = ""
    http_port: int = 30000
    dist_port: int = 20000
    transfer_backend: str = "auto"
    bootstrap_port: int = 8998
    net_profile: str = "auto"
    sysfs_root: str = "/sys"
    ready_timeout: float = 1800.0
    stop_grace: float = 30.0
    drain_timeout: float = 30.0
    start_attempts: int = 3
    max_failures: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 300.0
    sim_startup_delay: float = 0.0
    log_format: str = "auto"
    router_host: str = "0.0.0.0"
    router_port: int = 8000
    router_mode: str = "auto"
    router_policy: str = "cache_aware"
    router_api_key: str | None = None
    router_prometheus_port: int = 29000
    router_health_interval: int = 10
    router_health_timeout: int = 20
    router_shutdown_grace: int = 30
    router_breaker_open: int = 5
    router_quiet_window: float = 0.5
    router_resync_interval: float = 5.0
    router_args: tuple[tuple[str, Any], ...] = ()
    consul: ConsulSettings = field(default_factory=ConsulSettings)

    @property
    def is_router(self) -> bool:
        return self.role == "router"

    @property
    def world_size(self) -> int:
        """GPUs of the whole group: tp x pp x dp replicas (attention DP runs inside the TP group)."""
        replicas = 1 if self.attn_dp else (self.dp_size or 1)
        return self.tp_size * (self.pp_size or 1) * replicas

    @property
    def dist_ports(self) -> list[int]:
        """Every port SGLang 0.5.23 derives from the dist-init port on rank 0: the port itself, and with
        attention DP its ZMQ ports +1..+6 (srt/server_args.py:843, port_base = dist + 1) and the DP
        handshake +13 (DP_ATTENTION_HANDSHAKE_PORT_DELTA, srt/managers/data_parallel_controller.py:509)."""
        p = self.dist_port
        return [p, *range(p + 1, p + 7), p + 13] if self.attn_dp else [p]

    @property
    def gpus_per_node(self) -> int:
        return max(1, self.world_size // max(1, self.nnodes))


def find_preset(name: str) -> Path | None:
    for d in PRESET_DIRS:
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def preset_names() -> list[str]:
    names: set[str] = set()
    for d in PRESET_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _read_yaml(path: Path, what: str, problems: list[str]) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        problems.append(f"{what}: cannot read {path}: {e.strerror}")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"{what}: {path} is not valid YAML: {e}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{what}: {path} must hold a mapping of settings, got {type(data).__name__}")
        return {}
    data.pop("description", None)
    unknown = sorted(set(data) - set(SETTING_BY_KEY))
    for key in unknown:
        problems.append(f"{what}: {path}: unknown setting {key!r} (known: see docs/configuration.md)")
    return {k: v for k, v in data.items() if k in SETTING_BY_KEY}


def _parse(setting: Setting, raw: Any, source: str, problems: list[str]) -> Any:
    try:
        value = setting.parse(raw)
    except ValueError as e:
        problems.append(f"{source}={raw!r}: {e}")
        return setting.default
    if setting.choices and value not in setting.choices:
        problems.append(f"{source}={raw!r}: must be one of {', '.join(setting.choices)}")
        return setting.default
    return value


MERGED_KEYS = ("sglang_args", "router_args")


def _merge_engine_args(base: tuple, raw: Any, label: str, problems: list[str]) -> tuple:
    """Flag by flag: a later layer replaces a flag in place, adds new ones, and `flag: false` drops one."""
    try:
        pairs = _engine_args_layer(raw)
    except ValueError as e:
        problems.append(f"{label}={raw!r}: {e} (shell-quoted --flag value pairs, e.g. "
                        f"'--chunked-prefill-size 8192 --disable-radix-cache')")
        return base
    merged = dict(base)
    for name, val in pairs:
        if val is None:
            merged.pop(name, None)
        else:
            merged[name] = val
    return tuple(merged.items())


def load_config(env: Mapping[str, str] | None = None, *, cluster_only: bool = False) -> FleetConfig:
    """Builds the configuration from preset <- FLEET_CONFIG file <- FLEET_* environment.

    cluster_only: skip the checks of a node's own engine settings (for `status`, which only reads Consul).
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []  # (source label prefix, raw values)

    preset_name = (env.get("FLEET_PRESET") or "").strip()
    cfg_file = (env.get("FLEET_CONFIG") or "").strip()
    file_data = _read_yaml(Path(cfg_file), "FLEET_CONFIG", problems) if cfg_file else {}
    preset_name = preset_name or str(file_data.get("preset") or "")
    if preset_name:
        path = find_preset(preset_name)
        if path is None:
            problems.append(f"FLEET_PRESET={preset_name!r}: no such preset; known presets: "
                            f"{', '.join(preset_names()) or '(none found)'}")
        else:
            layers.append((f"preset {preset_name}:", _read_yaml(path, f"FLEET_PRESET={preset_name}", problems)))
    if file_data:
        layers.append((f"{cfg_file}:", file_data))
    env_layer = {s.key: env[s.env] for s in SETTINGS if s.env in env and env[s.env] != ""}
    layers.append(("", env_layer))

    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    for prefix, data in layers:
        for key, raw in data.items():
            setting = SETTING_BY_KEY[key]
            label = f"{prefix} {key}" if prefix else setting.env
            if key in MERGED_KEYS:
                values[key] = _merge_engine_args(values[key], raw, label, problems)
            else:
                values[key] = _parse(setting, raw, label, problems)
    values["preset"] = preset_name or None
    if not values["node_name"]:
        values["node_name"] = socket.gethostname().split(".")[0]
    if not values["group"] and values["nnodes"] == 1:
        values["group"] = values["node_name"]

    consul = ConsulSettings(
        http_addr=env.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500",
        token=env.get("CONSUL_HTTP_TOKEN") or None,
        ssl=_parse(Setting("ssl", _bool, False, ""), env.get("CONSUL_HTTP_SSL", ""), "CONSUL_HTTP_SSL", problems),
        cacert=env.get("CONSUL_CACERT") or None,
    )
    try:
        consul.host_port
    except ValueError:
        problems.append(f"CONSUL_HTTP_ADDR={consul.http_addr!r}: expected host:port or http(s)://host:port")

    cfg = FleetConfig(**values, consul=consul)
    problems.extend(validate(cfg, cluster_only=cluster_only))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: FleetConfig, cluster_only: bool = False) -> list[str]:
    """Cross-field checks (sglang_fleet.validation). Each message names the variable, the value and
    what is allowed."""
    from sglang_fleet.validation import validate_config  # it imports this module's names

    return validate_config(cfg, cluster_only=cluster_only)


def describe_settings() -> list[dict[str, str]]:
    """The settings table, for docs and `sglang-fleet config --help`."""
    return [{"env": s.env, "key": s.key, "default": repr(s.default), "help": s.help,
             "example": s.example, "choices": "|".join(s.choices)} for s in SETTINGS]


__all__ = [
    "ConfigError", "ConsulSettings", "EX_CONFIG", "FleetConfig", "NODE_ROLES", "ROLES", "SETTINGS",
    "load_config", "validate", "find_preset", "preset_names", "PER_HOST_ENGINE_FLAGS", "MOE_A2A_BACKENDS",
    "RESERVED_ENGINE_FLAGS", "describe_settings",
]
