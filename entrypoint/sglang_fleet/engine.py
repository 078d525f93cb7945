"""The engine process: one SGLang server rank (or the sim), supervised as its own process group.

API (the node loop is the only caller, from its own thread; make one Engine per generation, since
rank and generation are bound into its log context; start() may be called again after a stop):
  engine = Engine(health_url, rank, *, ready_timeout=1800, stop_grace=30, max_starts=None,
                  context={"group": g, "generation": G, "rank": r})
  engine = Engine.from_config(cfg, rank, **context)       # same, settings taken from FleetConfig
  engine.start(launch) -> str          # spawn launch.argv with launch.env; state STARTING (or EXITED)
  engine.poll() -> EngineState         # cheap, non-blocking; does the transitions; call every cycle
  engine.stop(grace=None, wait=True) -> str   # SIGTERM (rank 0: launch_server; else the group), grace,
                                       # SIGKILL to the group; reaps; idempotent. wait=False returns at once
                                       # (STOPPING) and poll() finishes the stop
  engine.retry_later(delay) -> str     # after a failed start: stop, BACKOFF, and poll() starts the same
                                       # launch again after `delay`; FATAL once max_starts in a row failed
  engine.state, .reason (last sentence), .since, .failed, .pid, .returncode, .starts, .retry_at, .history

The process itself is a child.Child (states, guarded transitions, process group, death signal, output
pumps, environment policy: child.py); this module adds what is the engine's own: readiness and stuck
detection over HTTP, how SGLang wants to be stopped, and the /dev/shm files it leaves behind.
States (child.State): STOPPED -> STARTING -> RUNNING -> STOPPING -> STOPPED; STARTING/RUNNING -> EXITED
(process died); STARTING -> UNHEALTHY (not ready in time); RUNNING -> UNHEALTHY (/health failed N times
in a row); after retry_later(): STOPPING -> BACKOFF -> STARTING, or FATAL.
EXITED and UNHEALTHY are local failures. Whether to retry a start is the node loop's decision (a group of
several nodes cannot take one restarted rank back); it never blocks: model loading takes up to
FLEET_READY_TIMEOUT, and the loop must keep watching its peers meanwhile.

The engine never outlives its supervisor: it is spawned with PR_SET_PDEATHSIG=SIGKILL, so a kill -9 of the
supervisor kills it too (SGLang's own scheduler/detokenizer processes do the same towards launch_server).
The kernel ties that signal to the *thread* that forked, not the process: call start() (and poll(), which
may start it again after a BACKOFF) only from a thread that lives as long as the engine should, i.e. the
node loop's thread (the main thread in `sglang-fleet node`), never from a short-lived helper thread.

API keys (FLEET_ENGINE_API_KEY / _ADMIN_API_KEY): the launch names a 0600 file for SGLang's --config; start()
writes it and it is removed as soon as the engine leaves STARTING (SGLang reads it while parsing its
arguments) or is stopped. The probes send the API key; the keys are replaced by *** in the relayed output.

Readiness: rank 0 when GET /health answers 200 (SGLang runs a one-token generation there); ranks > 0
when the process is alive and its dummy health server (same port) answers 200. While RUNNING only rank
0's /health is probed (every 5 s, 3 failures in a row = stuck). Probes run in a helper
thread that only records what it saw; poll() decides. Output lines become `engine_output` log events.
"""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from sglang_fleet import process_group as pg
from sglang_fleet import secret_files
from sglang_fleet.child import FAILED, Child, State, daemon_thread, log_output

PROBE_INTERVAL = 0.5  # seconds between readiness probes while STARTING
PROBE_TIMEOUT = 20.0  # SGLang's /health generates one token; a busy server may take a while
HEALTH_INTERVAL = 5.0  # seconds between /health probes while RUNNING (rank 0)
HEALTH_FAILURES = 3  # consecutive failed probes that make a running engine UNHEALTHY
SHM_EVERY_STARTING = 2.0  # seconds between looks at the engine's /dev/shm files while it starts
SHM_EVERY_RUNNING = 30.0  # and while it runs (SGLang creates them while it starts)

# No proxy: the probe always goes to this host's own engine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

EngineState = State  # the engine's states are the child's (node.py and leaving.py name them so)
FAILED_STATES = FAILED


class Launch(Protocol):
    argv: list[str]
    env: dict[str, str]


@dataclass
class _Probe:
    """What the prober thread saw of one spawned engine (a new one per start)."""
    alive: Callable[[], bool]
    pgid: int
    started_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)  # tells the prober to finish
    ready_at: float | None = None  # first successful probe
    failures: int = 0  # consecutive failed probes after ready
    last_error: str = "no probe yet"
    shm: set[str] = field(default_factory=set)  # /dev/shm files the engine's processes mapped or opened
    shm_seen_at: float = 0.0


def engine_request(url: str, api_key: str | None = None) -> urllib.request.Request:
    """A GET of the engine, with its API key (FLEET_ENGINE_API_KEY) when there is one."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})


def probe(url: str, timeout: float, api_key: str | None = None) -> str | None:
    """None when `url` answers 200, else a short description of what went wrong."""
    try:
        with _OPENER.open(engine_request(url, api_key), timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"timed out after {timeout:g} s" if "timed out" in str(reason) else str(reason)


def _of_child(name: str) -> property:
    return property(lambda self: getattr(self.child, name))


class Engine:
    def __init__(self, health_url: str, rank: int, *, ready_timeout: float = 1800.0,
                 stop_grace: float = 30.0, probe_interval: float = PROBE_INTERVAL,
                 probe_timeout: float = PROBE_TIMEOUT, health_interval: float = HEALTH_INTERVAL,
                 health_failures: int = HEALTH_FAILURES, max_starts: int | None = None,
                 context: Mapping[str, Any] | None = None, api_key: str | None = None):
        self.health_url = health_url
        self.api_key = api_key  # SGLang keeps /health open; sent anyway, so a guarded probe path works too
        self.rank = rank
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.context = {"rank": rank, **(context or {})}
        # Rank 0: SIGTERM to launch_server alone runs SGLang's own graceful exit (drain, ShutdownReq to
        # every TP rank, its children reaped); SIGTERM reaching its scheduler directly kills it, and SGLang
        # then aborts the whole tree. Ranks > 0: launch_server ignores SIGTERM there and waits for rank 0's
        # ShutdownReq, which never comes once rank 0 is gone, so the whole group gets it (docs/engine.md).
        self.child = Child("engine", stop_grace=stop_grace, leader="launch_server", term_leader_first=rank == 0,
                           max_starts=max_starts, on_gone=self._remove_shm, logger="sglang_fleet.engine",
                           context=self.context, on_line=self._output)
        self._probe: _Probe | None = None
        self._launch: Launch | None = None
        self._redact = secret_files.redactor(())

    @classmethod
    def from_config(cls, cfg, rank: int, **context: Any) -> "Engine":
        return cls(f"http://127.0.0.1:{cfg.http_port}/health", rank, ready_timeout=cfg.ready_timeout,
                   stop_grace=cfg.stop_grace, max_starts=cfg.start_attempts, context=context,
                   api_key=cfg.engine_api_key)

    # -- observation: the child's, read through (see child.Child) ---------------------------------------
    state = _of_child("state")
    reason = _of_child("reason")  # the last transition's sentence
    since = _of_child("since")  # monotonic time the current state was entered (e.g. when it failed)
    history = _of_child("history")
    pid = _of_child("pid")
    returncode = _of_child("returncode")
    starts = _of_child("starts")  # spawns in the current series of retried starts
    retry_at = _of_child("retry_at")  # BACKOFF: when poll() starts it again (monotonic)
    failed = _of_child("failed")

    @property
    def shm_files(self) -> set[str]:
        """The engine's /dev/shm files seen so far (for tests and logs)."""
        return set(self._probe.shm) if self._probe else set()

    # -- start -------------------------------------------------------------------------------------------
    def start(self, launch: Launch) -> str:
        """Spawns the engine (child.Child.start: own session, death signal bound to the calling thread) and
        its prober. Never blocks on it."""
        self._launch = launch
        self._redact = secret_files.redactor(getattr(launch, "secrets", ()))
        secret = getattr(launch, "secret_file", None)
        if secret:  # the API keys for SGLang's --config; removed once it is ready or gone (_forget_secret)
            secret_files.write_private(*secret)
        sentence = self.child.start(launch.argv, launch.env)
        if self.child.state is State.STARTING:
            run = self._probe = _Probe(alive=self.child.alive, pgid=self.child.pid)
            daemon_thread("engine-probe", self._probe_loop, run)
        return sentence

    def _probe_loop(self, run: _Probe) -> None:
        """Helper thread: records probe results in `run`; poll() decides what they mean. Also notes the
        engine's /dev/shm files, which SGLang leaves behind whenever it is killed (the stop removes them)."""
        while not run.done.is_set() and run.alive():
            self._note_shm(run, SHM_EVERY_STARTING if run.ready_at is None else SHM_EVERY_RUNNING)
            if run.ready_at is not None and self.rank != 0:
                run.done.wait(self.health_interval)  # the dummy health server of ranks > 0 always says 200;
                continue  # poll() watches the process
            error = probe(self.health_url, self.probe_timeout, self.api_key)
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
    def _note_shm(run: _Probe, every: float) -> None:
        now = time.monotonic()
        if now - run.shm_seen_at >= every:
            run.shm_seen_at = now
            run.shm = run.shm | pg.shm_files_of(pg.group_pids(run.pgid))  # rebound, never mutated: two threads

    # -- the transitions ---------------------------------------------------------------------------------
    def poll(self) -> State:
        """Cheap and non-blocking: the child's own transitions (exit, a stop's escalation), then the
        prober's findings; after a BACKOFF, starts the same launch again."""
        state, run = self.child.poll(), self._probe
        if state is State.STARTING:
            if run.ready_at is not None:
                self.child.ready(f"engine ready after {run.ready_at - run.started_at:.1f} s")
            elif time.monotonic() - run.started_at > self.ready_timeout:
                self.child.unhealthy(f"engine not ready after {self.ready_timeout:g} s "
                                     f"(last probe: {run.last_error})")
        elif state is State.RUNNING and run.failures >= self.health_failures:
            self.child.unhealthy(f"engine stuck: /health failed {run.failures} times (last: {run.last_error})")
        elif self.child.backoff_over:
            self.start(self._launch)
        if self.child.state is not State.STARTING:
            self._forget_secret()  # SGLang read it while parsing its arguments
        return self.child.state

    def _forget_secret(self) -> None:
        secret = getattr(self._launch, "secret_file", None)
        if secret:
            secret_files.remove(secret[0])

    def _output(self, log, stream: str, line: str) -> None:
        """An output line as an `engine_output` event, without the API keys (SGLang logs its resolved
        server arguments, keys included)."""
        log_output(log, stream, self._redact(line), "engine_output")

    # -- stop --------------------------------------------------------------------------------------------
    def stop(self, grace: float | None = None, wait: bool = True) -> str:
        """SIGTERM (rank 0: launch_server alone; else the whole group), up to `grace` seconds, then SIGKILL
        to the group; reaps; removes its /dev/shm files. Idempotent. wait=False returns at once (STOPPING)
        and poll() finishes the stop."""
        self._stopping()
        self._forget_secret()
        return self.child.stop_and_wait(grace) if wait else self.child.stop(grace)

    def retry_later(self, delay: float) -> str:
        """After a failed start: stops what is left, then BACKOFF; poll() starts the same launch again after
        `delay` seconds (FATAL instead once max_starts starts in a row failed). Non-blocking."""
        self._stopping()
        return self.child.retry_later(delay)

    def _stopping(self) -> None:
        run = self._probe
        if run is not None and self.child.pid is not None:
            run.done.set()  # a probe may still take probe_timeout; nobody waits for it
            self._note_shm(run, 0.0)  # last look while its processes are there

    def _remove_shm(self) -> str:
        """Once the group is gone. SGLang unlinks its shared memory only on paths a SIGKILL skips (its own
        kill_process_tree, PDEATHSIG): on CPU each start leaves a 258 MB all-reduce buffer, and restarts would
        fill /dev/shm (docs/engine.md)."""
        run, self._probe = self._probe, None
        removed, freed = pg.remove_files(set(run.shm)) if run else (0, 0)
        return f"; removed {removed} file(s) it left in /dev/shm ({freed / (1 << 20):.0f} MiB)" if removed else ""


__all__ = ["Engine", "EngineState", "FAILED_STATES", "engine_request", "probe"]
