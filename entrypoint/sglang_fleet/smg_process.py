"""smg (the SGLang Model Gateway) as a child process: its command line, start, readiness, stop.

The process is a child.Child, as the engine's is: its own process group (stopping it never leaves helpers
behind), the death signal (a kill -9 of the router agent takes smg along, so no orphan keeps serving a
frozen worker list or holds the ports a restarted agent needs), the same environment policy. Its output
is read line by line and re-emitted as structlog events (smg is started with --log-json, so each line
keeps its level and message).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import sys
import threading
import time
from pathlib import Path

from sglang_fleet import logs, secret_files
from sglang_fleet.child import Child, State, inherited_env
from sglang_fleet.config import FleetConfig
from sglang_fleet.plan import redact_argv
from sglang_fleet.smg_client import SmgClient

READY_TIMEOUT = 60.0  # smg answers within a second or two; more means it is broken
ADMIN_KEY_ID = "sglang-fleet"  # the id of the agent's key among smg's control-plane keys
STOP_MARGIN = 5.0  # seconds after smg's own shutdown grace (FLEET_ROUTER_SHUTDOWN_GRACE) before SIGKILL
_LEVELS = {"TRACE": "debug", "DEBUG": "debug", "INFO": "info", "WARN": "warning", "WARNING": "warning",
           "ERROR": "error"}


class SmgStartFailed(Exception):
    """smg exited, or did not answer in time, while starting."""


def find_smg_binary(env: dict[str, str] | None = None) -> str:
    """FLEET_SMG_BIN, else `smg` next to this Python (a venv), else `smg` on PATH."""
    env = os.environ if env is None else env
    if env.get("FLEET_SMG_BIN"):
        return env["FLEET_SMG_BIN"]
    beside = Path(sys.executable).with_name("smg")
    if beside.exists():
        return str(beside)
    return shutil.which("smg") or "smg"


def smg_argv(cfg: FleetConfig, mode: str, binary: str, admin_key: str) -> list[str]:
    """The full smg command line for `mode` ("pd" or "regular"). FLEET_ROUTER_ARGS come last (win).
    The keys are on it (smg takes them no other way) only until smg renames itself "smg::router"."""
    argv = [binary, "launch", "--host", cfg.router_host, "--port", str(cfg.router_port),
            "--policy", cfg.router_policy, "--prometheus-port", str(cfg.router_prometheus_port),
            "--health-check-interval-secs", str(cfg.router_health_interval),
            "--health-check-timeout-secs", str(cfg.router_health_timeout),
            "--shutdown-grace-period-secs", str(cfg.router_shutdown_grace),
            "--cb-timeout-duration-secs", str(cfg.router_breaker_open), "--log-json"]
    if mode == "pd":
        argv.append("--pd-disaggregation")
    if cfg.router_api_key:
        argv += ["--api-key", cfg.router_api_key]
    argv += ["--control-plane-api-keys", f"{ADMIN_KEY_ID}:sglang-fleet router agent:admin:{admin_key}"]
    if cfg.router_tls_cert:
        argv += ["--tls-cert-path", cfg.router_tls_cert, "--tls-key-path", cfg.router_tls_key]
    for flag, value in cfg.router_args:
        argv.append(f"--{flag}")
        if value is True:
            continue
        argv += list(value) if isinstance(value, tuple) else [str(value)]
    return argv


def smg_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours without our own settings and secrets (child.inherited_env, the
    engine's policy too), and no colour codes in its log lines."""
    return {**inherited_env(base), "NO_COLOR": "1"}


def router_scheme(cfg: FleetConfig) -> str:
    return "https" if cfg.router_tls_cert else "http"


def _loopback_url(cfg: FleetConfig) -> str:
    host = cfg.router_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{router_scheme(cfg)}://{host}:{cfg.router_port}"


def _own_smg_tls(cfg: FleetConfig) -> ssl.SSLContext | None:
    """The agent talks to its own child over loopback: its certificate names the advertised host, not
    127.0.0.1, so it is not verified there."""
    if not cfg.router_tls_cert:
        return None
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


class SmgProcess:
    """One smg child at a time. start() blocks until smg answers (or raises SmgStartFailed); call it from
    the router loop's thread (the death signal is bound to the thread that spawns smg)."""

    def __init__(self, cfg: FleetConfig, binary: str | None = None):
        self.cfg = cfg
        self.binary = binary or find_smg_binary()
        # The control-plane admin key: the only key smg's /workers takes; one per agent unless configured.
        self.admin_key = cfg.router_admin_key or secrets.token_urlsafe(32)
        self.client = SmgClient(_loopback_url(cfg), self.admin_key, tls=_own_smg_tls(cfg))
        self.mode: str | None = None
        self.started_at = 0.0
        # SIGKILL only after smg's own shutdown grace (FLEET_ROUTER_SHUTDOWN_GRACE), so it finishes what is
        # in flight first.
        redact = secret_files.redactor([self.admin_key, cfg.router_api_key, cfg.engine_api_key])
        self.child = Child("smg", stop_grace=cfg.router_shutdown_grace + STOP_MARGIN,
                           on_line=lambda log, stream, line: _emit(log, stream, redact(line)), logger="router.smg")
        self._log = logs.get("router.smg")

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def running(self) -> bool:
        return self.child.poll() in (State.STARTING, State.RUNNING)

    def returncode(self) -> int | None:
        return self.child.returncode

    def start(self, mode: str, stop_event: threading.Event | None = None) -> None:
        self.stop()
        argv = smg_argv(self.cfg, mode, self.binary, self.admin_key)
        self._log.info("starting smg", argv=redact_argv(argv), mode=mode)
        self.child.start(argv, smg_env())
        if self.child.state is State.EXITED:
            raise SmgStartFailed(f"cannot run {self.binary}: {self.child.reason}")
        self.mode, self.started_at = mode, time.monotonic()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.child.poll() is State.EXITED:
                raise SmgStartFailed(f"smg exited with status {self.child.returncode} while starting")
            if self.client.alive(timeout=1.0):
                self.child.ready("smg is answering", pid=self.pid, url=self.client.base_url, mode=mode)
                return
            if stop_event is not None and stop_event.wait(0.1):
                raise SmgStartFailed("shutdown requested while smg was starting")
            time.sleep(0.05)
        self.stop()
        raise SmgStartFailed(f"smg did not answer on {self.client.base_url} within {READY_TIMEOUT:.0f} s")

    def stop(self, grace: float | None = None) -> str:
        """SIGTERM to smg's process group, then SIGKILL after `grace` (default: smg's own shutdown grace plus
        STOP_MARGIN); waits until the group is gone. Idempotent."""
        return self.child.stop_and_wait(grace)


def _emit(log, _stream: str, line: str) -> None:
    """One line of smg's -> structlog. JSON lines keep their level and message; others are logged as-is."""
    line = line.rstrip()
    if not line:
        return
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if isinstance(rec, dict) and "message" in rec:
        level = _LEVELS.get(str(rec.get("level", "INFO")).upper(), "info")
        extra = {k: v for k, v in rec.items()
                 if k not in ("message", "level", "timestamp", "filename", "line_number", "event")}
        getattr(log, level)("smg_output", line=rec["message"], **extra)
    else:
        log.info("smg_output", line=line)


__all__ = ["SmgProcess", "SmgStartFailed", "find_smg_binary", "router_scheme", "smg_argv", "smg_env"]
