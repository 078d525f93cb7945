"""Cross-field checks of a FleetConfig: every problem, each naming the variable, its value and what
is allowed. Single-value checks (types, choices) happen while parsing, in config.py; the constants
the checks need live here."""
from __future__ import annotations

import ipaddress
import os
import re

from sglang_fleet.settings import FleetConfig

# Consul keys and service IDs are built from these names: keep them to a safe alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Flags sglang-fleet writes itself (and their aliases): FLEET_* settings or the rendezvous decide them.
RESERVED_ENGINE_FLAGS = {
    "nnodes": "FLEET_NNODES", "node-rank": "the rendezvous (or FLEET_NODE_RANK)",
    "dist-init-addr": "the rendezvous (FLEET_DIST_PORT on rank 0)", "nccl-init-addr": "the rendezvous",
    "tp-size": "FLEET_TP_SIZE", "tp": "FLEET_TP_SIZE", "tensor-parallel-size": "FLEET_TP_SIZE",
    "model-path": "FLEET_MODEL_PATH", "model": "FLEET_MODEL_PATH", "port": "FLEET_HTTP_PORT",
    "host": "sglang-fleet (always 0.0.0.0)", "disaggregation-mode": "FLEET_ROLE",
    "disaggregation-transfer-backend": "FLEET_TRANSFER_BACKEND",
    "disaggregation-bootstrap-port": "FLEET_BOOTSTRAP_PORT",
    # Secrets: on the command line they would show in `ps` and in SGLang's logged launch command.
    "api-key": "FLEET_ENGINE_API_KEY (or FLEET_ENGINE_API_KEY_FILE)",
    "admin-api-key": "FLEET_ENGINE_ADMIN_API_KEY (or FLEET_ENGINE_ADMIN_API_KEY_FILE)",
}
# smg flags the router agent writes from settings: in FLEET_ROUTER_ARGS they would replace its own (smg keeps
# the last), and the agent would lose its way into smg's worker API.
RESERVED_ROUTER_FLAGS = {
    "api-key": "FLEET_ROUTER_API_KEY (or FLEET_ROUTER_API_KEY_FILE)",
    "control-plane-api-keys": "FLEET_ROUTER_ADMIN_KEY (or FLEET_ROUTER_ADMIN_KEY_FILE)",
    "tls-cert-path": "FLEET_ROUTER_TLS_CERT", "tls-key-path": "FLEET_ROUTER_TLS_KEY",
}
PREFILL_ONLY_ENGINE_FLAGS = frozenset({"chunked-prefill-size", "max-prefill-tokens",
                                       "disaggregation-bootstrap-port"})


def validate_config(cfg: FleetConfig, cluster_only: bool = False) -> list[str]:
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
    if not 0 <= cfg.health_port <= 65535:
        p.append(f"FLEET_HEALTH_PORT={cfg.health_port}: must be a port number between 1 and 65535, or 0 (off)")
    if cfg.router_shutdown_grace < 0:
        p.append(f"FLEET_ROUTER_SHUTDOWN_GRACE={cfg.router_shutdown_grace}: must be zero or more seconds")
    for key in ("stop_grace", "drain_timeout", "reattach_window", "backoff_base", "backoff_max", "stable_after",
                "sim_startup_delay", "router_quiet_window", "router_resync_interval", "router_outage_hold"):
        if getattr(cfg, key) < 0:
            p.append(f"FLEET_{key.upper()}={getattr(cfg, key)}: must be zero or more seconds")
    if cfg.ready_timeout <= 0:
        p.append(f"FLEET_READY_TIMEOUT={cfg.ready_timeout}: must be more than zero seconds")
    if cfg.backoff_max < cfg.backoff_base:
        p.append(f"FLEET_BACKOFF_MAX={cfg.backoff_max}: must be at least FLEET_BACKOFF_BASE={cfg.backoff_base}")
    for key in ("start_attempts", "max_failures", "router_health_interval", "router_breaker_open",
                "router_health_timeout"):
        if getattr(cfg, key) < 1:
            p.append(f"FLEET_{key.upper()}={getattr(cfg, key)}: must be at least 1")
    if cfg.advertise_addr and not _host_like(cfg.advertise_addr):
        p.append(f"FLEET_ADVERTISE_ADDR={cfg.advertise_addr!r}: must be an IP address or host name, without "
                 f"scheme or port (e.g. 10.0.0.12)")
    p.extend(_validate_keys(cfg))
    if cfg.is_router:
        p.extend(_validate_router(cfg))
    if cfg.is_router or cluster_only:
        return p
    p.extend(_validate_node(cfg))
    return p


def _validate_keys(cfg: FleetConfig) -> list[str]:
    """Secrets are never shown, only named."""
    p: list[str] = []
    if cfg.router_api_key and cfg.engine_api_key and cfg.router_api_key != cfg.engine_api_key:
        p.append("FLEET_ROUTER_API_KEY: differs from FLEET_ENGINE_API_KEY; smg hands the client's key on to the "
                 "engines, so the two must be equal (leave FLEET_ROUTER_API_KEY unset: it defaults to the engine's)")
    if (cfg.engine_api_key or cfg.engine_admin_api_key) and any(flag == "config" for flag, _ in cfg.sglang_args):
        p.append("FLEET_SGLANG_ARGS: --config cannot be combined with FLEET_ENGINE_API_KEY or "
                 "FLEET_ENGINE_ADMIN_API_KEY (sglang-fleet hands the keys to SGLang in a --config file of its own; "
                 "SGLang takes one); put those flags in FLEET_SGLANG_ARGS instead")
    return p


def _validate_router(cfg: FleetConfig) -> list[str]:
    p: list[str] = [f"FLEET_ROUTER_ARGS: --{flag} is set by sglang-fleet; use {RESERVED_ROUTER_FLAGS[flag]} instead"
                    for flag, _ in cfg.router_args if flag in RESERVED_ROUTER_FLAGS]
    cert, key = cfg.router_tls_cert, cfg.router_tls_key
    if bool(cert) != bool(key):
        have, missing = ("FLEET_ROUTER_TLS_CERT", "FLEET_ROUTER_TLS_KEY") if cert else ("FLEET_ROUTER_TLS_KEY",
                                                                                          "FLEET_ROUTER_TLS_CERT")
        p.append(f"{have}={cert or key!r}: {missing} is not set; smg's HTTPS listener needs both")
    for env, path in (("FLEET_ROUTER_TLS_CERT", cert), ("FLEET_ROUTER_TLS_KEY", key)):
        if path and not os.access(path, os.R_OK):
            p.append(f"{env}={path!r}: no readable file there (a PEM file)")
    return p


def _ranges(ports: list[int]) -> str:
    return f"{ports[0]}-{ports[-2]} and {ports[-1]}" if len(ports) > 1 else str(ports[0])


def _host_like(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", text))


def _validate_node(cfg: FleetConfig) -> list[str]:
    p: list[str] = []
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
    if cfg.engine == "sglang" and not cfg.engine_python:
        p.append("FLEET_ENGINE_PYTHON='': must name the Python interpreter that has SGLang (e.g. python3)")
    sizes_ok = True
    for key in ("tp_size", "ep_size", "dp_size", "pp_size", "ep_redundant_experts"):
        val = getattr(cfg, key)
        least = 0 if key == "ep_redundant_experts" else 1
        if val is not None and val < least:
            p.append(f"FLEET_{key.upper()}={val}: must be at least {least}")
            sizes_ok = False
    if sizes_ok and cfg.nnodes >= 1:
        if cfg.world_size % cfg.nnodes:
            parts = "tp_size x pp_size" + ("" if cfg.attn_dp else " x dp_size")
            p.append(f"FLEET_TP_SIZE={cfg.tp_size}: {parts} ({cfg.world_size} GPUs) must be divisible by "
                     f"FLEET_NNODES={cfg.nnodes} (each node runs the same number of GPUs)")
        if cfg.ep_size and cfg.tp_size % cfg.ep_size:
            p.append(f"FLEET_EP_SIZE={cfg.ep_size}: must divide FLEET_TP_SIZE={cfg.tp_size} "
                     f"(SGLang requires tp_size % ep_size == 0)")
        if cfg.attn_dp and cfg.dp_size and cfg.tp_size % cfg.dp_size:
            p.append(f"FLEET_DP_SIZE={cfg.dp_size}: must divide FLEET_TP_SIZE={cfg.tp_size} with FLEET_ATTN_DP=1 "
                     f"(SGLang requires tp_size % attn_dp_size == 0)")
    if cfg.attn_dp and not (cfg.dp_size and cfg.dp_size > 1):
        p.append(f"FLEET_ATTN_DP={int(cfg.attn_dp)}: data-parallel attention needs FLEET_DP_SIZE > 1 "
                 f"(got {cfg.dp_size})")
    if cfg.dp_lm_head and not cfg.attn_dp:
        p.append("FLEET_DP_LM_HEAD=1: needs FLEET_ATTN_DP=1 (SGLang enables the DP LM head only with "
                 "data-parallel attention)")
    if cfg.moe_a2a_backend and cfg.moe_a2a_backend != "none" and not (cfg.ep_size and cfg.ep_size > 1):
        p.append(f"FLEET_MOE_A2A_BACKEND={cfg.moe_a2a_backend!r}: needs FLEET_EP_SIZE > 1 (expert parallelism; "
                 f"got {cfg.ep_size})")
    if cfg.ep_redundant_experts and not (cfg.ep_size and cfg.ep_size > 1):
        p.append(f"FLEET_EP_REDUNDANT_EXPERTS={cfg.ep_redundant_experts}: needs FLEET_EP_SIZE > 1 "
                 f"(got {cfg.ep_size})")
    if cfg.role == "prefill" and cfg.bootstrap_port == cfg.http_port:
        p.append(f"FLEET_BOOTSTRAP_PORT={cfg.bootstrap_port}: must differ from FLEET_HTTP_PORT on a prefill "
                 f"node (both are served by rank 0)")
    taken = cfg.dist_ports
    used = [("FLEET_HTTP_PORT", cfg.http_port)] + ([("FLEET_BOOTSTRAP_PORT", cfg.bootstrap_port)]
                                                  if cfg.role == "prefill" else [])
    for env, port in used:
        if port in taken:
            what = (f"the ports SGLang derives from it ({_ranges(taken)}, with FLEET_ATTN_DP=1)" if len(taken) > 1
                    else "it (rank 0 binds both)")
            p.append(f"{env}={port}: collides with FLEET_DIST_PORT={cfg.dist_port}: must be outside {what}")
    flags = [flag for flag, _ in cfg.sglang_args]
    prefill_only = sorted(set(flags) & PREFILL_ONLY_ENGINE_FLAGS - {"disaggregation-bootstrap-port"})
    if cfg.role == "decode" and prefill_only:
        p.append(f"FLEET_SGLANG_ARGS: {', '.join('--' + f for f in prefill_only)} are prefill options; "
                 f"this node has FLEET_ROLE=decode (allowed there: decode and general options)")
    return p


def reserved_flag_problems(flags: list[str], label: str) -> list[str]:
    """Engine flags of one layer (FLEET_SGLANG_ARGS, a preset, the command line) that sglang-fleet sets."""
    return [f"{label}: --{flag} is set by sglang-fleet; use {RESERVED_ENGINE_FLAGS[flag]} instead"
            for flag in flags if flag in RESERVED_ENGINE_FLAGS]
