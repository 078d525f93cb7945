"""The engine process: one SGLang server rank (or the sim), supervised as its own process group.

API (the node loop is the only caller, from its own thread; make one Engine per generation, since
rank and generation are bound into its log context; start() may be called again after a failure):
  engine = Engine(health_url, rank, *, ready_timeout=1800, stop_grace=30,
                  context={"group": g, "generation": G, "rank": r})
  engine = Engine.from_config(cfg, rank, **context)       # same, settings taken from FleetConfig
  engine.start(launch) -> str          # spawn launch.argv with launch.env; state STARTING (or EXITED)
  engine.poll() -> EngineState         # cheap, non-blocking; does the transitions; call every cycle
  engine.stop(grace=None) -> str       # SIGTERM (rank 0: launch_server; else the group), grace, SIGKILL
                                       # to the group; reaps; idempotent
  engine.state, .reason (last sentence), .failed (EXITED/UNHEALTHY), .pid, .returncode, .history

States (supervisord's process.py, plus UNHEALTHY for an engine that is alive but not serving):
  STOPPED -> STARTING -> RUNNING -> STOPPING -> STOPPED;  STARTING/RUNNING -> EXITED (process died)
  STARTING -> UNHEALTHY (not ready in time);  RUNNING -> UNHEALTHY (/health failed N times in a row)
EXITED and UNHEALTHY are local failures. Retrying a start (tenacity's exponential backoff with jitter,
FLEET_START_ATTEMPTS) and giving up (FATAL) belong to the node loop, not here: a start that blocked until
ready (model loading takes up to FLEET_READY_TIMEOUT) would blind the loop to its peers meanwhile.

The engine never outlives its supervisor: on Linux it is spawned with PR_SET_PDEATHSIG=SIGKILL, so a
kill -9 of the supervisor kills it too (SGLang's own scheduler/detokenizer processes do the same towards
launch_server). The kernel ties that signal to the *thread* that forked, not the process: call start()
only from a thread that lives as long as the engine should, i.e. the node
loop's thread (the main thread in `sglang-fleet node`), never from a short-lived helper thread.

Readiness: rank 0 when GET /health answers 200 (SGLang runs a one-token generation there); ranks > 0
when the process is alive and its dummy health server (same port) answers 200. While RUNNING only rank
0's /health is probed (every 5 s, 3 failures in a row = stuck). Probes run in a helper
thread that only records what it saw; poll() decides. Output lines become `engine_output` log events.
"""
from __future__ import annotations

import enum
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import structlog

from sglang_fleet import process_group as pg

PROBE_INTERVAL = 0.5  # seconds between readiness probes while STARTING
PROBE_TIMEOUT = 20.0  # SGLang's /health generates one token; a busy server may take a while
HEALTH_INTERVAL = 5.0  # seconds between /health probes while RUNNING (rank 0)
HEALTH_FAILURES = 3  # consecutive failed probes that make a running engine UNHEALTHY
KILL_WAIT = 5.0  # seconds to wait for the group to vanish after SIGKILL
SHM_EVERY_STARTING = 2.0  # seconds between looks at the engine's /dev/shm files while it starts
SHM_EVERY_RUNNING = 30.0  # and while it runs (SGLang creates them while it starts)

# No proxy: the probe always goes to this host's own engine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

class EngineState(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    UNHEALTHY = "UNHEALTHY"


FAILED_STATES = frozenset({EngineState.EXITED, EngineState.UNHEALTHY})


class Launch(Protocol):
    argv: list[str]
    env: dict[str, str]


@dataclass
class _Run:
    """One spawned process and what the helper threads saw of it."""
    proc: subprocess.Popen
    pgid: int
    started_at: float
    done: threading.Event = field(default_factory=threading.Event)  # tells helpers to finish
    ready_at: float | None = None  # first successful probe
    failures: int = 0  # consecutive failed probes after ready
    last_error: str = "no probe yet"
    threads: list[threading.Thread] = field(default_factory=list)
    shm: set[str] = field(default_factory=set)  # /dev/shm files the engine's processes mapped or opened
    shm_seen_at: float = 0.0


def probe(url: str, timeout: float) -> str | None:
    """None when `url` answers 200, else a short description of what went wrong."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"timed out after {timeout:g} s" if "timed out" in str(reason) else str(reason)


class Engine:
    def __init__(self, health_url: str, rank: int, *, ready_timeout: float = 1800.0,
                 stop_grace: float = 30.0, probe_interval: float = PROBE_INTERVAL,
                 probe_timeout: float = PROBE_TIMEOUT, health_interval: float = HEALTH_INTERVAL,
                 health_failures: int = HEALTH_FAILURES, context: Mapping[str, Any] | None = None):
        self.health_url = health_url
        self.rank = rank
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.context = {"rank": rank, **(context or {})}
        self.state = EngineState.STOPPED
        self.reason = "engine not started"
        self.returncode: int | None = None
        self.history: list[tuple[EngineState, str]] = []  # last 50 transitions, for tests and status
        self._run: _Run | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, rank: int, **context: Any) -> "Engine":
        return cls(f"http://127.0.0.1:{cfg.http_port}/health", rank, ready_timeout=cfg.ready_timeout,
                   stop_grace=cfg.stop_grace, context=context)

    # -- observation -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._run.proc.pid if self._run else None

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES

    def _log(self):
        # Built per call so the context (and the test's capture_logs) in force now applies.
        return structlog.get_logger("sglang_fleet.engine").bind(**self.context)

    def _change(self, state: EngineState, sentence: str, **fields: Any) -> str:
        with self._lock:
            self.state, self.reason = state, sentence
            self.history = (self.history + [(state, sentence)])[-50:]
        log = self._log()
        (log.warning if state in FAILED_STATES else log.info)(
            sentence, state=state.value, **fields)
        return sentence

    # -- start -------------------------------------------------------------------------------

    def start(self, launch: Launch) -> str:
        """Spawns the engine in its own session (its own process group), to be SIGKILLed by the kernel
        when the calling thread ends (see the module docstring). Never blocks on it."""
        if self._run is not None and self._run.proc.poll() is None:
            raise RuntimeError(f"engine pid {self._run.proc.pid} is still running; stop() it first")
        self._release()
        self.returncode = None
        try:
            proc = subprocess.Popen(list(launch.argv), env=dict(launch.env), start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True,
                                    preexec_fn=pg.die_with_parent_thread(os.getpid()))
        except OSError as e:
            return self._change(EngineState.EXITED, f"engine could not be started: {e}")
        run = _Run(proc=proc, pgid=proc.pid, started_at=time.monotonic())
        self._run = run
        log = structlog.get_logger("sglang_fleet.engine").bind(
            **{**structlog.contextvars.get_contextvars(), **self.context})  # threads don't inherit contextvars
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            run.threads.append(_thread(f"engine-{name}", _pump, stream, name, log))
        run.threads.append(_thread("engine-probe", self._probe_loop, run))
        return self._change(EngineState.STARTING, f"engine started pid {proc.pid}", pid=proc.pid)

    def _probe_loop(self, run: _Run) -> None:
        """Helper thread: records probe results in `run`; poll() decides what they mean. Also notes the
        engine's /dev/shm files, which SGLang leaves behind whenever it is killed (stop() removes them)."""
        while not run.done.is_set() and run.proc.poll() is None:
            self._note_shm(run, SHM_EVERY_STARTING if run.ready_at is None else SHM_EVERY_RUNNING)
            if run.ready_at is not None and self.rank != 0:
                run.done.wait(self.health_interval)  # the dummy health server of ranks > 0 always says 200;
                continue  # poll() watches the process
            error = probe(self.health_url, self.probe_timeout)
            if run.ready_at is None:
                if error is None:
                    run.ready_at = time.monotonic()
                    self._note_shm(run, 0.0)  # SGLang has created its shared memory by now
                else:
                    run.last_error = error
                interval = self.probe_interval if run.ready_at is None else self.health_interval
            else:
                run.failures = 0 if error is None else run.failures + 1
                run.last_error = error or run.last_error
                interval = self.health_interval
            run.done.wait(interval)

    @staticmethod
    def _note_shm(run: _Run, every: float) -> None:
        now = time.monotonic()
        if now - run.shm_seen_at >= every:
            run.shm_seen_at = now
            run.shm = run.shm | pg.shm_files_of(pg.group_pids(run.pgid))  # rebound, never mutated: two threads

    @property
    def shm_files(self) -> set[str]:
        """The engine's /dev/shm files seen so far (for tests and logs)."""
        return set(self._run.shm) if self._run else set()

    # -- the transitions ---------------------------------------------------------------------

    def poll(self) -> EngineState:
        """Cheap and non-blocking: looks at the process and the prober's findings, changes state."""
        run, state = self._run, self.state
        if run is None or state not in (EngineState.STARTING, EngineState.RUNNING):
            return state
        code = run.proc.poll()
        if code is not None:
            self.returncode = code
            when = "before ready" if state is EngineState.STARTING else "while running"
            self._change(EngineState.EXITED, f"engine exited with code {code} {when}", returncode=code)
        elif state is EngineState.STARTING:
            if run.ready_at is not None:
                self._change(EngineState.RUNNING,
                             f"engine ready after {run.ready_at - run.started_at:.1f} s")
            elif time.monotonic() - run.started_at > self.ready_timeout:
                self._change(EngineState.UNHEALTHY, f"engine not ready after {self.ready_timeout:g} s "
                             f"(last probe: {run.last_error})")
        elif run.failures >= self.health_failures:
            self._change(EngineState.UNHEALTHY, f"engine stuck: /health failed {run.failures} times "
                         f"(last: {run.last_error})")
        return self.state

    # -- stop --------------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> str:
        """SIGTERM to the whole process group, up to `grace` seconds, then SIGKILL; reaps. Idempotent."""
        run = self._run
        if run is None:
            if self.state is EngineState.STOPPED:
                return self.reason
            return self._change(EngineState.STOPPED, f"engine stopped ({self.reason})")
        grace = self.stop_grace if grace is None else grace
        # Rank 0: SIGTERM to launch_server alone runs SGLang's own graceful exit (drain, ShutdownReq to
        # every TP rank, its children reaped); SIGTERM reaching its scheduler directly kills it, and SGLang
        # then aborts the whole tree. Ranks > 0: launch_server ignores SIGTERM there and waits for rank 0's
        # ShutdownReq, which never comes once rank 0 is gone, so the whole group gets it (docs/engine.md).
        whole_group = self.rank != 0
        target = "its process group" if whole_group else "launch_server"
        self._change(EngineState.STOPPING, f"stopping engine pid {run.proc.pid}: SIGTERM to {target}, "
                     f"{grace:g} s grace")
        began = time.monotonic()
        self._note_shm(run, 0.0)  # last look while its processes are there
        if not whole_group and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            _wait_exit(run.proc, began + grace)
        # What is left of the group once the launcher is gone (SGLang reaps its own children first).
        pg.signal_group(run.pgid, signal.SIGTERM)
        how = "after SIGTERM"
        if not pg.wait_group_gone(run.proc, run.pgid, began + grace):
            pg.signal_group(run.pgid, signal.SIGKILL)
            how = f"with SIGKILL after {grace:g} s grace"
            if not pg.wait_group_gone(run.proc, run.pgid, time.monotonic() + KILL_WAIT):
                how += f"; process group {run.pgid} still has live members"
        self.returncode = run.proc.wait()
        self._release()
        # SGLang unlinks its shared memory only on paths a SIGKILL skips (its own kill_process_tree, PDEATHSIG):
        # on CPU each start leaves a 258 MB all-reduce buffer, and restarts would fill /dev/shm (docs/engine.md).
        removed, freed = pg.remove_files(set(run.shm))
        if removed:
            how += f"; removed {removed} file(s) it left in /dev/shm ({freed / (1 << 20):.0f} MiB)"
        return self._change(EngineState.STOPPED, f"engine stopped {how} in {time.monotonic() - began:.1f} s "
                            f"(exit code {self.returncode})", returncode=self.returncode)

    def _release(self) -> None:
        """Ends the helper threads of the last run; the process must already be reaped."""
        run, self._run = self._run, None
        if run is None:
            return
        run.done.set()
        pumps = [t for t in run.threads if t.name != "engine-probe"]  # a probe may take probe_timeout
        for t in pumps:
            t.join(timeout=2.0)
        if not any(t.is_alive() for t in pumps):  # a pump still reading (pipe held by an escaped
            for stream in (run.proc.stdout, run.proc.stderr):  # process) would block close()
                stream.close()


def _wait_exit(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass


def _thread(name: str, target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


def _pump(stream, name: str, log) -> None:
    """Helper thread: every output line of the engine becomes one log event. Decides nothing."""
    try:
        for raw in iter(stream.readline, b""):
            log.info("engine_output", stream=name, line=raw.decode("utf-8", "replace").rstrip("\r\n"))
    except (OSError, ValueError):  # the pipe was closed under us by stop()
        pass


__all__ = ["Engine", "EngineState", "FAILED_STATES", "probe"]
