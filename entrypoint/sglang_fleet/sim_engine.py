"""`sglang-fleet sim-engine`: a CPU stand-in for `python -m sglang.launch_server`. It is NOT a model.

It exists so that the appliance can be demonstrated and tested on machines without GPUs. It is selected
only by FLEET_ENGINE=sim, logs "sim engine: CPU stand-in for sglang.launch_server, not a model" at start,
and every answer says where it comes from ("sim": true, text starting "[sglang-fleet sim engine]").

What it imitates, over real sockets:
- argv: SGLang's flags (those it does not use are accepted and ignored).
- the group (what NCCL would do): rank 0 listens on the --dist-init-addr port; every rank > 0 connects
  (retrying until the join deadline) and says hello {rank, nnodes, model}. Rank 0 rejects a duplicate or
  out-of-range rank, another --nnodes or another model; the rejected process exits 1 naming why. Once
  joined, both sides send a heartbeat every 0.2 s; a closed socket or 1 s of silence makes every rank exit
  1 within about a second, as an NCCL abort would.
- start-up: group formed, then "model loading" (the startup delay), then ready. Rank 0 answers /health
  with 503 until ready, then 200; ranks > 0 open only SGLang 0.5.x's dummy health server (always 200),
  and only once ready, as SGLang does.
- HTTP surface of rank 0 (see sim_http.py) and, in prefill/decode mode, the KV hand-over through the
  prefill's bootstrap port (see sim_kv.py).

Knobs (environment):
  SGLANG_FLEET_SIM_STARTUP_DELAY   seconds of pretend model loading (default 0; --sim-startup-delay wins;
                                   FLEET_SIM_STARTUP_DELAY, which launch.py sets from the node's
                                   sim_startup_delay, is read when this one is unset)
  SGLANG_FLEET_SIM_CRASH_AT_START  1/true: log why and exit 1 at once (for retry and FATAL tests)
  SGLANG_FLEET_SIM_TOKEN_DELAY     seconds per generated token (default 0), keeps requests in flight
  SGLANG_FLEET_SIM_JOIN_TIMEOUT    seconds the group may take to form (default: --dist-timeout, else 600)
Exit codes: 0 after SIGTERM/SIGINT, 1 group failure / crash knob / port in use, 78 bad argv.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sglang_fleet import logs, sim_group, sim_http, sim_kv

BANNER = "sim engine: CPU stand-in for sglang.launch_server, not a model"
ENV_STARTUP_DELAY = "SGLANG_FLEET_SIM_STARTUP_DELAY"
ENV_STARTUP_DELAY_FROM_NODE = "FLEET_SIM_STARTUP_DELAY"
ENV_CRASH_AT_START = "SGLANG_FLEET_SIM_CRASH_AT_START"
ENV_TOKEN_DELAY = "SGLANG_FLEET_SIM_TOKEN_DELAY"
ENV_JOIN_TIMEOUT = "SGLANG_FLEET_SIM_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT_S = 600.0
EX_FAILED = 1
EX_BAD_ARGV = 78
DISAGG_MODES = ("null", "prefill", "decode")


class SimArgError(ValueError):
    """A flag value the sim (and SGLang) cannot run with."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit 2 with usage; we raise one clear error instead
        raise SimArgError(message)


def split_host_port(addr: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SimArgError(f"--dist-init-addr {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sglang-fleet sim-engine", allow_abbrev=False,
                description="CPU stand-in for sglang.launch_server (demos and tests only)")
    p.add_argument("--model-path", "--model", dest="model_path", default="sim-model")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--dist-init-addr", default=None)
    p.add_argument("--dist-timeout", type=float, default=None)
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1)
    p.add_argument("--dp-size", "--dp", dest="dp_size", type=int, default=1)
    p.add_argument("--pp-size", dest="pp_size", type=int, default=1)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--disaggregation-mode", default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    p.add_argument("--disaggregation-transfer-backend", default="mooncake")
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-api-key", default=None)
    p.add_argument("--config", default=None, help="a YAML file of flags, as SGLang's --config (CLI wins)")
    p.add_argument("--sim-startup-delay", type=float, default=None)
    return p


def _from_config_file(path: str | None, ns: argparse.Namespace) -> None:
    """SGLang's --config: a YAML mapping of flag names to values; flags on the command line win.
    The sim reads only the keys it uses (the API keys)."""
    if not path:
        return
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SimArgError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise SimArgError(f"--config {path}: expected a mapping of flag names to values")
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in ("api_key", "admin_api_key") and getattr(ns, dest) is None:
            setattr(ns, dest, str(value))


@dataclass(frozen=True)
class SimArgs:
    model_path: str
    served_model_name: str
    host: str
    port: int
    nnodes: int
    node_rank: int
    dist_init_addr: str | None
    tp_size: int
    dp_size: int
    pp_size: int
    context_length: int
    disaggregation_mode: str
    bootstrap_port: int
    transfer_backend: str
    enable_metrics: bool
    startup_delay: float
    token_delay: float
    join_timeout: float
    ignored: list[str] = field(default_factory=list)
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)

    @property
    def dist_init(self) -> tuple[str, int] | None:
        return split_host_port(self.dist_init_addr) if self.dist_init_addr else None


def _env_float(env: dict, name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SimArgError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SimArgError(f"{name}={raw!r} must be >= 0")
    return value


def parse_args(argv: list[str], env: dict | None = None) -> SimArgs:
    """SGLang argv (+ the sim's env knobs) -> SimArgs. Unknown flags are kept in .ignored."""
    env = os.environ if env is None else env
    ns, ignored = _build_parser().parse_known_args(argv)
    _from_config_file(ns.config, ns)
    if ns.nnodes < 1:
        raise SimArgError(f"--nnodes {ns.nnodes} must be >= 1")
    if not 0 <= ns.node_rank < ns.nnodes:
        raise SimArgError(f"--node-rank {ns.node_rank} is out of range 0..{ns.nnodes - 1} for --nnodes {ns.nnodes}")
    if ns.nnodes > 1 and not ns.dist_init_addr:
        raise SimArgError(f"--nnodes {ns.nnodes} needs --dist-init-addr host:port")
    if ns.dist_init_addr:
        split_host_port(ns.dist_init_addr)
    if ns.disaggregation_mode not in DISAGG_MODES:
        raise SimArgError(f"--disaggregation-mode {ns.disaggregation_mode!r}: allowed {', '.join(DISAGG_MODES)}")
    for flag, port in (("--port", ns.port), ("--disaggregation-bootstrap-port", ns.disaggregation_bootstrap_port)):
        if not 0 < port < 65536:
            raise SimArgError(f"{flag} {port} is not a TCP port")
    delay = ns.sim_startup_delay
    if delay is None:
        delay = _env_float(env, ENV_STARTUP_DELAY, _env_float(env, ENV_STARTUP_DELAY_FROM_NODE, 0.0))
    if delay < 0:
        raise SimArgError(f"--sim-startup-delay {delay} must be >= 0")
    join_default = ns.dist_timeout if ns.dist_timeout else DEFAULT_JOIN_TIMEOUT_S
    return SimArgs(
        model_path=ns.model_path, served_model_name=ns.served_model_name or ns.model_path,
        host=ns.host, port=ns.port, nnodes=ns.nnodes, node_rank=ns.node_rank,
        dist_init_addr=ns.dist_init_addr, tp_size=ns.tp_size, dp_size=ns.dp_size, pp_size=ns.pp_size,
        context_length=ns.context_length or 4096, disaggregation_mode=ns.disaggregation_mode,
        bootstrap_port=ns.disaggregation_bootstrap_port, transfer_backend=ns.disaggregation_transfer_backend,
        enable_metrics=ns.enable_metrics, startup_delay=delay, token_delay=_env_float(env, ENV_TOKEN_DELAY, 0.0),
        join_timeout=_env_float(env, ENV_JOIN_TIMEOUT, join_default), ignored=ignored, api_key=ns.api_key,
        admin_api_key=ns.admin_api_key)


def crash_requested(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(ENV_CRASH_AT_START, "").strip().lower() in ("1", "true", "yes", "on")


class SimEngine:
    """One rank's life: group, loading, ready, serve; any fatal event ends the process with a code."""

    def __init__(self, args: SimArgs, log):
        self.args = args
        self.log = log
        self.ready = threading.Event()
        self.started_at = time.time()
        self._done = threading.Event()
        self._code = 0
        self._signalled: int | None = None  # the signal that stopped us (the handler only records it)
        self._lock = threading.Lock()
        self.http = None
        self.kv = None

    # -- outcome ---------------------------------------------------------------------------
    def fail(self, reason: str, code: int = EX_FAILED) -> None:
        """Called from any thread; the main thread then exits with `code`."""
        with self._lock:
            if self._done.is_set():
                return
            self._code = code
            try:
                self.log.error(f"sim engine exiting: {reason}", exit_code=code)
            finally:  # stdout may be a broken pipe (supervisor killed): exit anyway
                self._done.set()

    def _on_signal(self, signum, _frame):
        # Only flags: a handler that locks or logs can wait on another thread or re-enter a stdout write.
        if not self._done.is_set():
            self._signalled = signum
            self._done.set()

    def _wait_until(self, predicate, deadline: float) -> bool:
        while not predicate():
            if self._done.wait(0.05) or time.monotonic() > deadline:
                return predicate()
        return True

    # -- life ------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        deadline = time.monotonic() + a.join_timeout
        what = f"HTTP on {a.host}:{a.port}"
        try:
            if a.node_rank == 0:
                self.http = sim_http.serve(self, a.host, a.port, sim_http.EngineHandler)
                if a.disaggregation_mode != "null":
                    self.kv = sim_kv.KVRooms()
                if a.disaggregation_mode == "prefill":
                    what = f"the bootstrap port {a.host}:{a.bootstrap_port}"
                    sim_kv.serve_bootstrap(self.kv, a.host, a.bootstrap_port, self.log)
            what = f"the group port {a.dist_init_addr}"
            group = sim_group.start(self, self.fail, deadline)
        except OSError as e:
            self.fail(f"cannot listen on {what}: {e}")
            return self._code

        if not self._wait_until(group.formed.is_set, deadline):
            if not self._done.is_set():
                self.fail(f"group did not form within {a.join_timeout:g}s: {group.missing()}")
            return self._finish()
        if a.nnodes > 1:
            self.log.info(f"group formed: {a.nnodes} ranks joined at {a.dist_init_addr}")
        if a.startup_delay:
            self.log.info(f"pretending to load {a.model_path} for {a.startup_delay:g}s")
            if self._done.wait(a.startup_delay):
                return self._finish()
        if a.node_rank > 0:
            try:  # SGLang 0.5.x: ranks > 0 serve only a dummy health server, once loaded
                self.http = sim_http.serve(self, a.host, a.port, sim_http.DummyHealthHandler)
            except OSError as e:
                self.fail(f"cannot listen on {a.host}:{a.port} for the dummy health server: {e}")
                return self._finish()
        self.ready.set()
        self.log.info(f"sim engine ready: rank {a.node_rank} of {a.nnodes}, http {a.host}:{a.port}",
                      disaggregation_mode=a.disaggregation_mode)
        return self._finish()

    def _finish(self) -> int:
        self._done.wait()
        self.ready.clear()  # /health answers 503 from now on, as SGLang's does while it exits
        if self._signalled is not None:
            self.log.info(f"sim engine stopping on {signal.Signals(self._signalled).name}")
            if self._signalled == signal.SIGTERM and self.args.node_rank == 0 and self.http is not None:
                self._drain()
        return self._code

    def _drain(self, timeout: float = 30.0) -> None:
        """SGLang's graceful exit on rank 0 (tokenizer_manager.sigterm_watchdog): finish what is in flight."""
        self.log.info("SIGTERM received. Draining requests and shutting down...")
        deadline = time.monotonic() + timeout
        while self.http.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.log.info(f"Gracefully exiting... Remaining number of requests {self.http.inflight}.")


def main(argv: list[str] | None = None) -> int:
    logs.configure(os.environ.get("FLEET_LOG_FORMAT", "auto"))
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except SimArgError as e:
        print(f"sglang-fleet sim-engine: {e}", file=sys.stderr)
        return EX_BAD_ARGV
    log = logs.get("sim_engine", rank=args.node_rank, nnodes=args.nnodes, sim=True)
    log.info(BANNER, model=args.model_path, disaggregation_mode=args.disaggregation_mode,
             dist_init_addr=args.dist_init_addr, http=f"{args.host}:{args.port}", tp_size=args.tp_size,
             ignored_flags=[x for x in args.ignored if x.startswith("--")])
    if crash_requested():
        log.error(f"sim engine exiting at start because {ENV_CRASH_AT_START} is set", exit_code=EX_FAILED)
        return EX_FAILED
    return SimEngine(args, log).run()
