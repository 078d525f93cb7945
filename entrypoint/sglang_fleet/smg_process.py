"""smg (the SGLang Model Gateway) as a child process: its command line, start, readiness, stop.

smg runs in its own process group so that stopping it never leaves helpers behind; its output is read
line by line and re-emitted as structlog events (smg is started with --log-json, so each line keeps its
level and message).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sglang_fleet import logs
from sglang_fleet.config import FleetConfig
from sglang_fleet.smg_client import SmgClient

READY_TIMEOUT = 60.0  # smg answers within a second or two; more means it is broken
STOP_MARGIN = 5.0  # seconds after smg's own shutdown grace (FLEET_ROUTER_SHUTDOWN_GRACE) before SIGKILL
_SECRET_ENV = ("CONSUL_HTTP_TOKEN",)
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


def smg_argv(cfg: FleetConfig, mode: str, binary: str) -> list[str]:
    """The full smg command line for `mode` ("pd" or "regular"). FLEET_ROUTER_ARGS come last (win)."""
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
    for flag, value in cfg.router_args:
        argv.append(f"--{flag}")
        if value is True:
            continue
        argv += list(value) if isinstance(value, tuple) else [str(value)]
    return argv


def smg_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours without our own settings and secrets."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if not k.startswith("FLEET_") and k not in _SECRET_ENV}
    env["NO_COLOR"] = "1"
    return env


def _loopback_url(cfg: FleetConfig) -> str:
    host = cfg.router_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.router_port}"


class SmgProcess:
    """One smg child at a time. start() blocks until smg answers (or raises SmgStartFailed)."""

    def __init__(self, cfg: FleetConfig, binary: str | None = None):
        self.cfg = cfg
        self.binary = binary or find_smg_binary()
        self.client = SmgClient(_loopback_url(cfg), cfg.router_api_key)
        self.mode: str | None = None
        self.started_at = 0.0
        self._proc: subprocess.Popen | None = None
        self._log = logs.get("router.smg")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self, mode: str, stop_event: threading.Event | None = None) -> None:
        self.stop()
        argv = smg_argv(self.cfg, mode, self.binary)
        shown = [("***" if i and argv[i - 1] == "--api-key" else a) for i, a in enumerate(argv)]
        self._log.info("starting smg", argv=shown, mode=mode)
        try:
            proc = subprocess.Popen(argv, env=smg_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise SmgStartFailed(f"cannot run {self.binary}: {e.strerror or e}") from None
        self._proc, self.mode, self.started_at = proc, mode, time.monotonic()
        threading.Thread(target=_pump, args=(proc.stdout, self._log), name="smg-output", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SmgStartFailed(f"smg exited with status {proc.returncode} while starting")
            if self.client.alive(timeout=1.0):
                self._log.info("smg is answering", pid=proc.pid, url=self.client.base_url, mode=mode)
                return
            if stop_event is not None and stop_event.wait(0.1):
                raise SmgStartFailed("shutdown requested while smg was starting")
            time.sleep(0.05)
        self.stop()
        raise SmgStartFailed(f"smg did not answer on {self.client.base_url} within {READY_TIMEOUT:.0f} s")

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM to smg's process group, then SIGKILL after `grace` (default: smg's own shutdown grace plus
        STOP_MARGIN, so smg finishes what is in flight first); reaps. Idempotent."""
        grace = self.cfg.router_shutdown_grace + STOP_MARGIN if grace is None else grace
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._log.warning("smg ignored SIGTERM; killing it", pid=proc.pid, grace=grace)
        _signal_group(proc.pid, signal.SIGKILL)  # helpers it may have left in its group
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            self._log.error("smg did not exit after SIGKILL", pid=proc.pid)
        self._log.info("smg stopped", pid=proc.pid, returncode=proc.returncode)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(stream, log) -> None:
    """smg's lines -> structlog. JSON lines keep their level and message; others are logged as-is."""
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
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
    except (OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


__all__ = ["SmgProcess", "SmgStartFailed", "find_smg_binary", "smg_argv", "smg_env"]
