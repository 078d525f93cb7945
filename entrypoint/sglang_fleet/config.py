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
NET_PROFILES = ("auto", "ethernet", "infiniband", "roce")
ROUTER_MODES = ("auto", "pd", "regular")
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "least_load", "consistent_hashing",
                   "prefix_hash")

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


def _engine_args(value: Any) -> tuple[tuple[str, Any], ...]:
    """Extra SGLang arguments as ordered (flag, value) pairs; value True means a bare flag.

    Accepts a YAML mapping {flag: value}, a YAML list of tokens, or a shell-quoted string.
    """
    if value in (None, ""):
        return ()
    if isinstance(value, Mapping):
        pairs = []
        for flag, val in value.items():
            name = str(flag).lstrip("-").replace("_", "-")
            if val is False or val is None:
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
    Setting("moe_a2a_backend", _opt_str, None, "MoE all-to-all backend (--moe-a2a-backend).", "deepep"),
    Setting("ep_redundant_experts", _opt_int, None, "Redundant expert copies (--ep-num-redundant-experts).",
            "32"),
    Setting("sglang_args", _engine_args, (), "Extra SGLang arguments, shell-quoted; they follow the "
            "appliance's own and win on conflict.", "--chunked-prefill-size 8192 --disable-radix-cache"),
    # Network.
    Setting("advertise_addr", _str, "", "Address peers and the router use to reach this node; defaults "
            "to the address of the interface that routes to Consul.", "10.0.0.12"),
    Setting("http_port", _int, 30000, "The engine's HTTP port (--port).", "30000"),
    Setting("dist_port", _int, 20000, "Port of the dist-init address on rank 0 (--dist-init-addr).", "20000"),
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
    Setting("start_attempts", _int, 3, "Engine start attempts (exit before ready, or not ready in time) "
            "before the generation is given up.", "3"),
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
    Setting("router_mode", _str, "auto", "pd: --pd-disaggregation; regular: plain routing; auto: pd unless "
            "preset/role says otherwise (decided from the cluster's registered roles).", "pd", ROUTER_MODES),
    Setting("router_policy", _str, "cache_aware", "smg load-balancing policy.", "round_robin",
            ROUTER_POLICIES),
    Setting("router_api_key", _opt_str, None, "API key smg requires from clients (--api-key).", "s3cret"),
    Setting("router_prometheus_port", _int, 29000, "smg's own Prometheus port.", "29000"),
    Setting("router_health_interval", _int, 10, "smg's worker health-check interval in seconds.", "10"),
    Setting("router_quiet_window", _float, 0.5, "Seconds of quiet before Consul changes are applied to smg "
            "(batches a flapping check, like consul-template's wait).", "0.5"),
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
    advertise_addr: str = ""
    http_port: int = 30000
    dist_port: int = 20000
    bootstrap_port: int = 8998
    net_profile: str = "auto"
    sysfs_root: str = "/sys"
    ready_timeout: float = 1800.0
    stop_grace: float = 30.0
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
    router_quiet_window: float = 0.5
    router_args: tuple[tuple[str, Any], ...] = ()
    consul: ConsulSettings = field(default_factory=ConsulSettings)

    @property
    def is_router(self) -> bool:
        return self.role == "router"

    @property
    def gpus_per_node(self) -> int:
        return max(1, self.tp_size * (self.pp_size or 1) // max(1, self.nnodes))


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


def load_config(env: Mapping[str, str] | None = None) -> FleetConfig:
    """Builds the configuration from preset <- FLEET_CONFIG file <- FLEET_* environment."""
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
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: FleetConfig) -> list[str]:
    """Cross-field checks. Each message names the variable, the value and what is allowed."""
    p: list[str] = []
    for key in ("cluster", "group", "node_name"):
        val = getattr(cfg, key)
        if val and not NAME_RE.match(val):
            p.append(f"FLEET_{key.upper()}={val!r}: use letters, digits, '.', '_' and '-' (at most 63, "
                     f"starting with a letter or digit); it becomes part of Consul keys and service IDs")
    for key in ("http_port", "dist_port", "bootstrap_port", "router_port", "router_prometheus_port"):
        val = getattr(cfg, key)
        if not 1 <= val <= 65535:
            p.append(f"FLEET_{key.upper()}={val}: must be a port number between 1 and 65535")
    for key in ("ready_timeout", "stop_grace", "backoff_base", "backoff_max", "stable_after",
                "sim_startup_delay", "router_quiet_window"):
        if getattr(cfg, key) < 0:
            p.append(f"FLEET_{key.upper()}={getattr(cfg, key)}: must be zero or more seconds")
    for key in ("start_attempts", "max_failures", "router_health_interval"):
        if getattr(cfg, key) < 1:
            p.append(f"FLEET_{key.upper()}={getattr(cfg, key)}: must be at least 1")
    if cfg.is_router:
        return p

    if cfg.nnodes < 1:
        p.append(f"FLEET_NNODES={cfg.nnodes}: must be at least 1")
    if cfg.nnodes > 1 and not cfg.group:
        p.append(f"FLEET_GROUP is required when FLEET_NNODES={cfg.nnodes} (> 1): every member of the group "
                 f"sets the same name, e.g. FLEET_GROUP=llama-405b-a")
    if cfg.node_rank is not None and not 0 <= cfg.node_rank < max(cfg.nnodes, 1):
        p.append(f"FLEET_NODE_RANK={cfg.node_rank}: must be between 0 and FLEET_NNODES-1 "
                 f"({max(cfg.nnodes, 1) - 1})")
    if not cfg.model_path:
        p.append("FLEET_MODEL_PATH is not set: give a model path or Hugging Face id (or a FLEET_PRESET)")
    for key in ("tp_size", "ep_size", "dp_size", "pp_size", "ep_redundant_experts"):
        val = getattr(cfg, key)
        if val is not None and val < (0 if key == "ep_redundant_experts" else 1):
            p.append(f"FLEET_{key.upper()}={val}: must be at least {0 if key == 'ep_redundant_experts' else 1}")
    if cfg.nnodes >= 1 and cfg.tp_size >= 1:
        world = cfg.tp_size * (cfg.pp_size or 1)
        if world % cfg.nnodes:
            p.append(f"FLEET_TP_SIZE={cfg.tp_size}: tp_size x pp_size ({world}) must be divisible by "
                     f"FLEET_NNODES={cfg.nnodes} (each node runs the same number of GPUs)")
        if cfg.ep_size and cfg.ep_size >= 1 and cfg.tp_size % cfg.ep_size:
            p.append(f"FLEET_EP_SIZE={cfg.ep_size}: must divide FLEET_TP_SIZE={cfg.tp_size} "
                     f"(SGLang requires tp_size % ep_size == 0)")
        if cfg.dp_size and cfg.dp_size >= 1 and cfg.tp_size % cfg.dp_size:
            p.append(f"FLEET_DP_SIZE={cfg.dp_size}: must divide FLEET_TP_SIZE={cfg.tp_size} "
                     f"(SGLang requires tp_size % dp_size == 0)")
    if cfg.attn_dp and not (cfg.dp_size and cfg.dp_size > 1):
        p.append(f"FLEET_ATTN_DP={int(cfg.attn_dp)}: data-parallel attention needs FLEET_DP_SIZE > 1 "
                 f"(got {cfg.dp_size})")
    if cfg.dp_lm_head and not cfg.attn_dp:
        p.append("FLEET_DP_LM_HEAD=1: needs FLEET_ATTN_DP=1 (SGLang enables the DP LM head only with "
                 "data-parallel attention)")
    if cfg.moe_a2a_backend and not cfg.ep_size:
        p.append(f"FLEET_MOE_A2A_BACKEND={cfg.moe_a2a_backend!r}: needs FLEET_EP_SIZE (expert parallelism)")
    flags = {flag for flag, _ in cfg.sglang_args}
    prefill_only = sorted(flags & {"chunked-prefill-size", "max-prefill-tokens", "disaggregation-bootstrap-port"})
    if cfg.role == "decode" and prefill_only:
        p.append(f"FLEET_SGLANG_ARGS: {', '.join('--' + f for f in prefill_only)} are prefill options; "
                 f"this node has FLEET_ROLE=decode")
    if "disaggregation-mode" in flags:
        p.append("FLEET_SGLANG_ARGS: do not pass --disaggregation-mode; it follows FLEET_ROLE")
    for reserved in ("nnodes", "node-rank", "dist-init-addr", "tp-size", "tp", "model-path", "port"):
        if reserved in flags:
            p.append(f"FLEET_SGLANG_ARGS: --{reserved} is set by sglang-fleet (use the FLEET_* setting or "
                     f"let the rendezvous decide)")
    return p


def describe_settings() -> list[dict[str, str]]:
    """The settings table, for docs and `sglang-fleet config --help`."""
    return [{"env": s.env, "key": s.key, "default": repr(s.default), "help": s.help,
             "example": s.example, "choices": "|".join(s.choices)} for s in SETTINGS]


__all__ = [
    "ConfigError", "ConsulSettings", "EX_CONFIG", "FleetConfig", "NODE_ROLES", "ROLES", "SETTINGS",
    "load_config", "validate", "find_preset", "preset_names", "PER_HOST_ENGINE_FLAGS",
]
