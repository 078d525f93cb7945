"""`sglang-fleet plan`: the argv and environment this node's engine would run, without Consul.

For humans, SLURM scripts and tests. The engine's flags go through SGLang's own parser first
(sglang_parser.py): a flag SGLang does not take is exit 78 with SGLang's message. The rank and the dist-init address come from the command line
(or FLEET_NODE_RANK / this node's own address) instead of the rendezvous; launch.py builds the rest.
Secrets are redacted: env names with TOKEN, KEY, SECRET, PASSWORD, PASSWD or CREDENTIAL, and the value
of a flag with such a word.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from typing import Mapping

from sglang_fleet import netprofile, sglang_parser
from sglang_fleet.config import EX_CONFIG, ConfigError, FleetConfig
from sglang_fleet.launch import build_launch
from sglang_fleet.secret_files import REDACTED

# Flags are matched word by word (`--api-key` yes, `--max-prefill-tokens` no).
SECRET_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SECRET_FLAG_WORDS = frozenset({"token", "key", "keys", "apikey", "secret", "password", "passwd", "credential",
                               "credentials"})


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if SECRET_RE.search(k) else v) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for tok in argv:
        if hide_next and not tok.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if tok.startswith("--"):
            name, eq, _ = tok.partition("=")
            if SECRET_FLAG_WORDS & set(name[2:].lower().replace("_", "-").split("-")):
                if eq:
                    out.append(f"{name}={REDACTED}")
                    continue
                hide_next = True
        out.append(tok)
    return out


def _valid_dist_init_addr(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)


def _check_arguments(cfg: FleetConfig, rank: int, dist_init_addr: str | None) -> None:
    problems: list[str] = []
    if cfg.is_router:
        problems.append("FLEET_ROLE='router': plan shows the engine of a node; use a node role "
                        "(prefill, decode or regular)")
    if not 0 <= rank < cfg.nnodes:
        problems.append(f"--node-rank={rank}: must be between 0 and FLEET_NNODES-1 ({cfg.nnodes - 1})")
    if dist_init_addr is not None and not _valid_dist_init_addr(dist_init_addr):
        problems.append(f"--dist-init-addr={dist_init_addr!r}: expected host:port (port 1-65535)")
    if problems:
        raise ConfigError(problems)


def plan_command(cfg: FleetConfig, node_rank: int | None, dist_init_addr: str | None, as_json: bool) -> int:
    """Prints the plan; a bad argument or a setting only the launch can check is the CLI's report, exit 78."""
    rank = node_rank if node_rank is not None else (cfg.node_rank if cfg.node_rank is not None else 0)
    try:
        _check_arguments(cfg, rank, dist_init_addr)
        advertise = netprofile.resolve_advertise_addr(cfg)
        notes: list[str] = []
        if dist_init_addr is None:
            dist_init_addr = f"{advertise}:{cfg.dist_port}"
            if rank != 0:
                notes.append(f"dist-init address assumed to be {dist_init_addr}; pass --dist-init-addr "
                             f"<rank 0 address>:{cfg.dist_port}")
        launch = build_launch(cfg, rank, cfg.nnodes, dist_init_addr, advertise)
        verdict = sglang_parser.check_launch(cfg, launch)
        if verdict.error:
            raise ConfigError([verdict.error])
        if verdict.note:
            notes.append(verdict.note)
    except ConfigError as e:
        print(e.report(), file=sys.stderr)
        return EX_CONFIG
    argv = redact_argv(launch.argv)
    env = redact_env(launch.env)
    warnings = notes + launch.warnings
    if as_json:
        print(json.dumps({"argv": argv, "env": env, "warnings": warnings}, indent=2))
        return 0
    print(f"# sglang-fleet plan: cluster {cfg.cluster}, group {cfg.group or '-'}, role {cfg.role}, "
          f"rank {rank} of {cfg.nnodes}, advertise {advertise}"
          + (f", preset {cfg.preset}" if cfg.preset else ""))
    for w in warnings:
        print(f"# note: {w}")
    print(" \\\n  ".join(_command_lines(argv, env)))
    return 0


def _command_lines(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """`env -i NAME=value ... python -m module`, then one flag (with its values) per line."""
    lines = ["env -i"] + [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(" ".join(shlex.quote(t) for t in argv[:3]))
    i = 3
    while i < len(argv):
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        lines.append("  " + " ".join(shlex.quote(t) for t in argv[i:j]))
        i = j
    return lines


__all__ = ["plan_command", "redact_argv", "redact_env"]
