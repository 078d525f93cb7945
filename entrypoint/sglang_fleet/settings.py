"""The settings table: every setting declared once, as a field of `FleetConfig` (or `ConsulSettings`).

A field made with `setting()` carries its section, help, example and choices; `SETTINGS` is read back
from the dataclass fields, so the default, the type and the docs cannot drift apart. The environment
spells a key `FLEET_<KEY>`, preset and config files spell it `<key>`; Consul's own variables keep their
names. Loading the layers is config.py's job, cross-field checks are validation.py's.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

ROLES = ("prefill", "decode", "regular", "router")
NODE_ROLES = ("prefill", "decode", "regular")
ENGINES = ("sglang", "sim")
DEVICES = ("cuda", "cpu")
NET_PROFILES = ("auto", "ethernet", "infiniband", "roce")
ROUTER_MODES = ("auto", "pd", "regular")
LOG_FORMATS = ("auto", "json", "console")
# SGLang 0.5.23's --disaggregation-transfer-backend choices (srt/arg_groups/choices.py), and auto.
TRANSFER_BACKENDS = ("auto", "mooncake", "mooncake_tcp", "nixl", "ascend", "mori", "fake")
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "least_load", "consistent_hashing",
                   "prefix_hash")
# SGLang 0.5.23's --moe-a2a-backend choices.
MOE_A2A_BACKENDS = ("none", "deepep", "mooncake", "nixl", "mori", "ascend_fuseep", "flashinfer", "megamoe",
                    "deepep_v2", "ascend_tp", "pplx", "flashinfer_megamoe")

# Sections group the settings in docs and listings; attribute access stays flat (cfg.http_port).
SECTIONS = {
    "node": "Node: who this node is, and how it stops and recovers",
    "engine": "Engine: what it runs and how it is supervised",
    "network": "Network",
    "router": "Router role",
    "consul": "Consul (Consul's own variables; environment only)",
    "sim": "Sim engine",
    "logging": "Logging",
}


@dataclass(frozen=True)
class Setting:
    key: str
    section: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    example: str = ""
    choices: tuple[str, ...] = ()
    env_name: str = ""
    secret: bool = False  # also read from the file `<env>_FILE` names; never shown (docs/security.md)

    @property
    def env(self) -> str:
        return self.env_name or "FLEET_" + self.key.upper()


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
    return tuple((name, val) for name, val in engine_args_layer(value) if val is not None)


def engine_args_layer(value: Any) -> tuple[tuple[str, Any], ...]:
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


# The parser of a field follows from its annotation unless setting() names one.
PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": _str, "str | None": _opt_str, "int": _int, "int | None": _opt_int, "float": _float, "bool": _bool,
}


def setting(section: str, default: Any, help: str, example: str = "", choices: tuple[str, ...] = (),
            parse: Callable[[Any], Any] | None = None, env: str = "", secret: bool = False) -> Any:
    """A dataclass field that is also a row of the settings table. A secret stays out of reprs (logs)."""
    assert section in SECTIONS, section
    return field(default=default, repr=not secret,
                 metadata={"setting": dict(section=section, help=help, example=example, choices=choices,
                                           parse=parse, env_name=env, secret=secret)})


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The rows declared by setting() fields of a dataclass, in declaration order."""
    rows = []
    for f in fields(cls):
        meta = dict(f.metadata.get("setting") or {})
        if meta:
            meta["parse"] = meta["parse"] or PARSERS[f.type]
            rows.append(Setting(key=f.name, default=f.default, **meta))
    return tuple(rows)


@dataclass(frozen=True)
class ConsulSettings:
    http_addr: str = setting("consul", "127.0.0.1:8500", "The Consul agent's HTTP API, `host:port` or "
                             "`http(s)://host:port`. Also decides the default advertise address (the source "
                             "address of the route toward this host).", "10.0.0.5:8500", env="CONSUL_HTTP_ADDR")
    token: str | None = setting("consul", None, "ACL token (`sglang-fleet acl-policy`, docs/security.md). Never logged, never "
                                "passed to the engine; shown as `***` by `plan`.", "...", env="CONSUL_HTTP_TOKEN",
                                secret=True)
    ssl: bool = setting("consul", False, "Use HTTPS.", "1", env="CONSUL_HTTP_SSL")
    cacert: str | None = setting("consul", None, "CA certificate that signed Consul's HTTPS certificate.",
                                 "/etc/consul/ca.pem", env="CONSUL_CACERT")
    client_cert: str | None = setting("consul", None, "Client certificate for a Consul with `verify_incoming` "
                                      "(with CONSUL_CLIENT_KEY).", "/etc/consul/client.pem", env="CONSUL_CLIENT_CERT")
    client_key: str | None = setting("consul", None, "Private key of CONSUL_CLIENT_CERT.", "/etc/consul/client-key.pem",
                                     env="CONSUL_CLIENT_KEY")
    # Which variable the token came from (CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE=<path>): errors name it.
    token_source: str = field(default="CONSUL_HTTP_TOKEN", compare=False)

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
    # node
    role: str = setting("node", "regular", "What this container runs: a node of a prefill, decode or regular "
                        "(non-disaggregated) group, or the router.", "prefill", ROLES)
    cluster: str = setting("node", "default", "One deployment; several clusters may share one Consul.", "prod-r1")
    group: str = setting("node", "", "The nodes that together form ONE SGLang server (one --nnodes launch). "
                         "Required when nnodes > 1; defaults to the node name for a one-node group.", "r1-prefill-a")
    nnodes: int = setting("node", 1, "Number of nodes in this group (SGLang --nnodes).", "2")
    node_rank: int | None = setting("node", None, "Fixed rank for this node (e.g. $SLURM_NODEID or a pod index). "
                                    "Unset: the rank is claimed in Consul.", "1")
    node_name: str = setting("node", "", "This node's name in Consul; defaults to the hostname.", "gpu-host-07")
    rank0: bool = setting("node", False, "Prefer rank 0 when claiming a rank (the node whose address becomes "
                          "the dist-init address).", "1")
    drain_timeout: float = setting(
        "node", 30.0, "On a graceful stop (SIGTERM of any member), most seconds rank 0 waits, after withdrawing "
        "its serving registration, for the requests in flight to finish before the engine is stopped; 0 stops at "
        "once. A container's stop timeout must be at least drain_timeout + stop_grace + 15.", "60")
    max_failures: int = setting("node", 5, "Consecutive failed generations caused by this node before it goes "
                                "FATAL and exits non-zero.", "5")
    backoff_base: float = setting("node", 1.0, "First backoff in seconds; doubles per consecutive failure.", "1")
    backoff_max: float = setting("node", 60.0, "Largest backoff in seconds.", "60")
    reattach_window: float = setting(
        "node", 15.0, "Seconds a group whose engines stayed healthy gives its members to re-attach to the same "
        "generation after a Consul outage cost them their sessions or rank keys (docs/protocol.md \"Re-attach "
        "after a Consul outage\"); a member not back in time ends the generation. 0: off, every lost key ends "
        "the generation.", "15")
    stable_after: float = setting("node", 300.0, "Seconds a generation must serve before the failure count "
                                  "resets.", "300")
    # engine
    engine: str = setting("engine", "sglang", "sglang: python -m sglang.launch_server. sim: the CPU stand-in "
                          "for demos and tests on machines without GPUs.", "sim", ENGINES)
    device: str = setting(
        "engine", "cuda", "cuda: NVIDIA GPUs. cpu: SGLang's CPU backend on Intel Xeon (AVX-512, AMX where "
        "present): `--device cpu`, `SGLANG_USE_CPU_ENGINE=1`, each TP rank of this node bound to its share of "
        "`FLEET_CPU_CORES` (`SGLANG_CPU_OMP_THREADS_BIND`), Intel OpenMP and tcmalloc/tbbmalloc preloaded where "
        "installed (docs/deployment.md, Xeon hosts).", "cpu", DEVICES)
    cpu_cores: str = setting(
        "engine", "", "FLEET_DEVICE=cpu: the cores this node's engine may use, as a Linux CPU list; split evenly "
        "over the node's TP ranks (SGLANG_CPU_OMP_THREADS_BIND). Default: every core this container may run on.",
        "0-31,64-95", parse=_cpu_cores)
    preset: str | None = setting("engine", None, "Name of a preset shipped in the package "
                                 "(sglang_fleet/data/presets: the guide's configurations).", "deepseek-r1-prefill")
    model_path: str = setting("engine", "", "Model path or Hugging Face id (SGLang --model-path).",
                              "/models/DeepSeek-R1")
    tp_size: int = setting("engine", 1, "Tensor parallel size across ALL nodes of the group (--tp-size).", "16")
    ep_size: int | None = setting("engine", None, "Expert parallel size (--ep-size); usually equal to tp_size.",
                                  "16")
    dp_size: int | None = setting("engine", None, "Data parallel size (--dp-size).", "16")
    pp_size: int | None = setting("engine", None, "Pipeline parallel size (--pp-size).", "2")
    attn_dp: bool = setting("engine", False, "Data-parallel attention (the guide's --enable-dp-attention; "
                            "emitted as SGLang 0.5.23's --attn-dp-size <dp_size>).", "1")
    dp_lm_head: bool = setting("engine", False, "Data-parallel LM head (--enable-dp-lm-head); needs attn_dp.", "1")
    moe_a2a_backend: str | None = setting("engine", None, "MoE all-to-all backend (--moe-a2a-backend).",
                                          "deepep", MOE_A2A_BACKENDS)
    ep_redundant_experts: int | None = setting("engine", None, "Redundant expert copies "
                                               "(--ep-num-redundant-experts).", "32")
    sglang_args: tuple[tuple[str, Any], ...] = setting(
        "engine", (), "Extra SGLang arguments, shell-quoted (a YAML mapping {flag: value} in presets and "
        "FLEET_CONFIG). Merged flag by flag over the lower layers (preset < config file < env); in YAML "
        "`flag: false` drops an inherited flag. They win over sglang-fleet's own flags, except the reserved ones "
        "(--nnodes, --node-rank, --dist-init-addr, --tp-size, --model-path, --host, --port, --disaggregation-*, --api-key, "
        "--admin-api-key) which have FLEET_* settings. The guide's old spellings are rewritten (see the flag mapping).",
        "--chunked-prefill-size 8192 --disable-radix-cache", parse=_engine_args)
    engine_api_key: str | None = setting(
        "engine", None, "SGLang's --api-key: every engine route but /health*, /ready* and /metrics wants "
        "`Authorization: Bearer <key>`. Set it on every node and on the router (which hands it to smg for the "
        "engines). Reaches the engine in a 0600 --config file, never its command line.", "...", secret=True)
    engine_admin_api_key: str | None = setting(
        "engine", None, "SGLang's --admin-api-key: the key of the engine's admin routes (/flush_cache, weight "
        "updates, profiling, ...); without it SGLang refuses the admin-only ones to everybody.", "...",
        secret=True)
    engine_metrics: bool = setting("engine", True, "Start the engine with --enable-metrics (SGLang's Prometheus "
                                   "metrics on its HTTP port, /metrics).", "0")
    engine_python: str = setting("engine", "python3", "Interpreter that runs `-m sglang.launch_server` (the one "
                                 "with SGLang installed; the sim engine always uses sglang-fleet's own).",
                                 "/opt/venv/bin/python")
    ready_timeout: float = setting("engine", 1800.0, "Seconds the engine may take to become ready (model "
                                   "loading).", "3600")
    stop_grace: float = setting("engine", 30.0, "Seconds between SIGTERM and SIGKILL when stopping the engine.",
                                "30")
    start_attempts: int = setting(
        "engine", 3, "One-node groups: engine start attempts (exit before ready, or not ready in time) before the "
        "generation is given up. In a multi-node group the first failed start ends the generation for the whole "
        "group (its peers wait in SGLang's rendezvous and cannot take a lone restarted rank back).", "3")
    # network
    advertise_addr: str = setting("network", "", "Address peers and the router use to reach this node; defaults "
                                  "to the address of the interface that routes to Consul.", "10.0.0.12")
    http_port: int = setting("network", 30000, "The engine's HTTP port (--port).", "30000")
    health_port: int = setting(
        "network", 9400, "Port of the supervisor's health endpoint (/livez, /readyz, /metrics; node and router "
        "agent; docs/operations.md); 0 turns it off.", "9400")
    dist_port: int = setting("network", 20000, "Port of the dist-init address on rank 0 (--dist-init-addr).",
                             "20000")
    transfer_backend: str = setting(
        "network", "auto", "Prefill/decode nodes: how the KV moves (--disaggregation-transfer-backend). auto: "
        "mooncake (RDMA) on the infiniband and roce profiles, mooncake_tcp on ethernet (SGLang's default mooncake "
        "needs RDMA and cannot start without it).", "nixl", TRANSFER_BACKENDS)
    bootstrap_port: int = setting("network", 8998, "Prefill KV bootstrap port (--disaggregation-bootstrap-port).",
                                  "8998")
    net_profile: str = setting("network", "auto", "NCCL/GLOO profile shipped in sglang_fleet/data/nccl; auto detects InfiniBand "
                               "and RoCE in /sys/class/infiniband.", "infiniband", NET_PROFILES)
    sysfs_root: str = setting("network", "/sys", "Where auto detection reads sysfs (tests point it at fixtures).",
                              "/sys")
    # sim, logging
    sim_startup_delay: float = setting("sim", 0.0, "Sim engine only: seconds to pretend to load the model.", "5")
    log_format: str = setting("logging", "auto", "auto (console on a TTY, else JSON), json or console.", "json",
                              LOG_FORMATS)
    # router
    router_host: str = setting("router", "0.0.0.0", "Address the router (smg) listens on.", "0.0.0.0")
    router_port: int = setting("router", 8000, "Port the router (smg) listens on.", "8000")
    router_mode: str = setting(
        "router", "auto", "pd: smg runs with --pd-disaggregation and routes the prefill and decode groups; "
        "regular: plain routing over the regular groups; auto: follows the roles passing in Consul (pd while any "
        "prefill/decode group passes or none does, regular when only regular groups do; a change restarts smg).",
        "pd", ROUTER_MODES)
    router_policy: str = setting("router", "cache_aware", "smg load-balancing policy.", "round_robin",
                                 ROUTER_POLICIES)
    router_api_key: str | None = setting(
        "router", None, "API key smg requires from clients on the OpenAI routes (smg --api-key). Defaults to "
        "FLEET_ENGINE_API_KEY, and may not differ from it: smg forwards the client's key to the engines "
        "(docs/security.md).", "s3cret", secret=True)
    router_admin_key: str | None = setting(
        "router", None, "smg's control-plane admin key (`--control-plane-api-keys`): the only key smg's worker "
        "API (`/workers`) accepts. Unset: the router agent makes a new one at every start. The agent keeps it "
        "in a 0600 file for `sglang-fleet status` on the same host (docs/security.md).", "...", secret=True)
    router_tls_cert: str | None = setting(
        "router", None, "PEM certificate smg serves HTTPS with (--tls-cert-path; with FLEET_ROUTER_TLS_KEY).",
        "/etc/sglang-fleet/router.pem")
    router_tls_key: str | None = setting(
        "router", None, "Private key of FLEET_ROUTER_TLS_CERT (--tls-key-path).", "/etc/sglang-fleet/router-key.pem")
    router_prometheus_port: int = setting("router", 29000, "smg's own Prometheus port.", "29000")
    router_health_interval: int = setting("router", 10, "smg's worker health-check interval in seconds.", "10")
    router_health_timeout: int = setting(
        "router", 20, "Seconds smg waits for a worker's /health (--health-check-timeout-secs; smg's default 5). "
        "SGLang's /health runs a one-token generation and may take up to SGLANG_HEALTH_CHECK_TIMEOUT (20 s) on a "
        "busy engine before it answers.", "20")
    router_shutdown_grace: int = setting(
        "router", 30, "On stop, seconds smg lets requests in flight finish (--shutdown-grace-period-secs; smg's "
        "default 180); the agent SIGKILLs smg 5 s after that. The router container's stop timeout must be "
        "longer.", "30")
    router_breaker_open: int = setting(
        "router", 5, "Seconds smg's circuit breaker keeps a failing worker closed off (`--cb-timeout-duration-secs`; "
        "smg's own default is 60). The agent withdraws a dead group within about 2 s, and in PD mode a dead "
        "prefill also trips the healthy decode's breaker, so a long open time would stop all PD traffic for that "
        "long.", "5")
    router_quiet_window: float = setting(
        "router", 0.5, "Seconds of quiet before new or changed groups are added to smg (batches a flapping check, "
        "like consul-template's wait); a group that stops passing is withdrawn at once.", "0.5")
    router_resync_interval: float = setting(
        "router", 5.0, "Seconds between full comparisons of smg's workers with Consul even when Consul is quiet "
        "(catches an smg restart or a hand edit).", "5")
    router_outage_hold: float = setting(
        "router", 30.0, "After a Consul outage, seconds during which the groups routed before it stay in smg until "
        "Consul lists them as passing again (nodes re-register, checks run again, a -dev Consul comes back empty); "
        "a group still missing then is withdrawn. 0: Consul's first answer rules.", "30")
    router_args: tuple[tuple[str, Any], ...] = setting("router", (), "Extra smg arguments, shell-quoted; not the ones "
                                                       "the agent writes from settings (--api-key, "
                                                       "--control-plane-api-keys, --tls-cert-path, --tls-key-path).",
                                                       "--request-timeout-secs 600", parse=_engine_args)
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

    @property
    def stop_wait(self) -> int:
        """supervisord's stopwaitsecs (SIGTERM to SIGKILL) for the container's program: rank 0's drain, the
        engine's grace, and 15 s to withdraw the registration and exit."""
        return math.ceil(self.drain_timeout + self.stop_grace) + 15


SETTINGS = settings_of(FleetConfig)
CONSUL_SETTINGS = settings_of(ConsulSettings)
SETTING_BY_KEY = {s.key: s for s in SETTINGS}

# FLEET_* variables that are not settings but are read elsewhere, in one place: any other FLEET_* variable in
# the environment is a configuration error (a typo would otherwise be ignored). Name -> who reads it and why.
OTHER_FLEET_VARIABLES = {
    "FLEET_CONFIG": "sglang-fleet: path of the YAML config file (precedence layer 3)",
    "FLEET_PRESET_DIR": "sglang-fleet: a directory searched first for `<preset>.yaml`",
    "FLEET_NCCL_DIR": "sglang-fleet: a directory searched first for `<profile>.env`",
    "FLEET_ACL_DIR": "sglang-fleet: a directory searched first for `<role>.hcl` (ACL policies)",
    "FLEET_HOME": "the image: sglang-fleet's venv (Dockerfile, docker-entrypoint.sh, supervisord)",
    "FLEET_LAUNCHER": "compose/slurm/sglang-fleet.sbatch: pyxis (default), apptainer, docker or package",
    "FLEET_GPU_IMAGE": "compose files and the SLURM script: the GPU image; scripts/images: its tag",
    "FLEET_MODELS_DIR": "compose files: the host directory mounted at /models",
    "FLEET_IMAGE": "scripts/images, compose/demo.yml: the CPU image",
    "FLEET_CONSUL_IMAGE": "scripts/images, compose/demo.yml: the Consul image",
    "FLEET_BASE_IMAGE": "scripts/images: base of the CPU image",
    "FLEET_GPU_BASE_IMAGE": "scripts/images: base of the GPU image",
    "FLEET_CONSUL_UPSTREAM": "scripts/images: the upstream Consul image",
    "FLEET_REGISTRY": "scripts/images: auto, or no (build without a registry)",
    "FLEET_DEMO_PORT": "scripts/demo, compose/demo.yml: the router's port on the host",
    "FLEET_DEMO_CONSUL_PORT": "compose/demo.yml: Consul's port on the host",
    "FLEET_DEMO_LOG_FORMAT": "compose/demo.yml: FLEET_LOG_FORMAT of the demo",
    "FLEET_DEMO_TOKEN_DELAY": "compose/demo.yml: the sim engine's delay per token",
    "FLEET_TOOLS": "scripts: where downloaded tools are kept (default ~/.cache/sglang-fleet)",
    "FLEET_SGLANG_KERNEL_SRC": "scripts/install-sglang-cpu: source of SGLang's CPU kernels",
    "FLEET_SGLANG_PYTHON": "tests (conformance, sglang tiers): the Python of the SGLang venv",
    "FLEET_CONSUL_BIN": "tests: the Consul binary",
    "FLEET_SMG_BIN": "tests: the smg binary",
    "FLEET_CT_DUMP_LOGS": "tests (containers tier): 1 prints every container's logs",
    "FLEET_GPU_PYTHON": "tests (gpu tier): the Python with torch",
    "FLEET_GPU_RESULTS": "scripts/gpu-validate: where the GPU tier's results go",
    "FLEET_NCCL_CHECK_BACKEND": "tests (gpu tier): gloo runs the NCCL-check cases on CPUs",
}

# What `node` and `router` read (their --help lists it): whole sections, and the router's few others.
COMMAND_SETTINGS = {
    "node": {"sections": ("node", "engine", "network", "sim", "consul", "logging"), "keys": ()},
    "router": {"sections": ("router", "consul", "logging"),
               "keys": ("role", "cluster", "node_name", "advertise_addr", "health_port", "backoff_base", "backoff_max",
                        "start_attempts")},
}


def settings_read_by(command: str) -> list[Setting]:
    """The settings `command` reads, in SECTIONS order."""
    wanted = COMMAND_SETTINGS[command]
    rows = [s for s in SETTINGS + CONSUL_SETTINGS if s.section in wanted["sections"] or s.key in wanted["keys"]]
    return sorted(rows, key=lambda s: list(SECTIONS).index(s.section))


def known_variables() -> set[str]:
    """Every FLEET_* (and Consul) variable sglang-fleet knows: settings, their `_FILE` forms, the others."""
    rows = SETTINGS + CONSUL_SETTINGS
    return {s.env for s in rows} | {s.env + "_FILE" for s in rows if s.secret} | set(OTHER_FLEET_VARIABLES)


def describe_settings() -> list[dict[str, str]]:
    """The settings table, section by section, for docs and listings."""
    rows = sorted(SETTINGS + CONSUL_SETTINGS, key=lambda s: list(SECTIONS).index(s.section))
    return [{"section": s.section, "env": s.env, "key": "" if s.env_name else s.key, "default": repr(s.default),
             "help": s.help, "example": s.example, "choices": "|".join(s.choices)} for s in rows]
