"""One supervised child process and its whole process group: the engine (engine.py) and smg (smg_process.py)
both run through `Child`. The model is supervisord's process.py `Subprocess` and its `transition()`.

  child = Child("engine", stop_grace=30, leader="launch_server", term_leader_first=True, max_starts=3,
                on_gone=cleanup, context={"rank": 0})
  child.start(argv, env) -> str        spawn (never blocks on it): STARTING, or EXITED if it cannot be spawned
  child.poll() -> State                cheap, non-blocking: notices an exit, steps a stop; call it every cycle
  child.ready(sentence) / .unhealthy(sentence)   the owner's verdicts (what "ready" means is the owner's)
  child.stop(grace) -> str             non-blocking: SIGTERM, STOPPING; poll() SIGKILLs the group after grace
  child.stop_and_wait(grace) -> str    the same, polled until the group is gone (for shutdown paths)
  child.retry_later(delay) -> str      after a failure: stop it, then BACKOFF for `delay`, or FATAL once
                                       `max_starts` starts in a row failed; start() again when `backoff_over`
  child.state, .reason (the last sentence), .since (monotonic time it was entered), .history, .pid,
  .returncode, .starts (spawns in the current series: a start out of BACKOFF continues it; RUNNING ends it)

States, and the only transitions allowed (any other is a bug in the caller: IllegalTransition):
  STOPPED, BACKOFF, FATAL -> STARTING (spawned) | EXITED (could not be spawned)
  STARTING  -> RUNNING (ready) | UNHEALTHY | EXITED | STOPPING
  RUNNING   -> UNHEALTHY | EXITED | STOPPING
  UNHEALTHY -> STOPPING                  alive but failed: only a stop ends it
  EXITED    -> STOPPING                  what is left of its group; STOPPED/BACKOFF/FATAL when nothing was spawned
  STOPPING  -> STOPPED | BACKOFF | FATAL once no live process is left in its group
  BACKOFF, FATAL -> STOPPED              stop(): whatever the state, a finished stop leaves the child STOPPED

Every child runs in a session of its own (its own process group: a signal to ours never reaches it, and a
stop reaches all of it); gets an environment built explicitly, `inherited_env()` plus what its owner adds;
and is SIGKILLed by the kernel when the thread that spawned it ends (PR_SET_PDEATHSIG: a kill -9 of the
supervisor takes its children along). That signal is bound to the *thread* that forked: start() only from
a thread that lives as long as the child should (the node's and the router's loop run on the main thread).
Its whole group is stopped on every way out: stop(), the death signal, and an atexit net for an interpreter
that ends with a child still running. Its output lines become log events (`<name>_output` by default).
"""
from __future__ import annotations

import atexit
import enum
import os
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import structlog

from sglang_fleet import process_group as pg

OWN_PREFIXES = ("FLEET_", "CONSUL_")  # the supervisor's own settings, Consul's token among them
KILL_WAIT = 5.0  # seconds to wait for the group to vanish after SIGKILL
STOP_POLL = 0.05  # seconds between looks while stop_and_wait() waits


class State(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


FAILED = frozenset({State.EXITED, State.UNHEALTHY, State.FATAL})
_NOT_SPAWNED = {State.STARTING, State.EXITED}
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset(_NOT_SPAWNED),
    State.BACKOFF: frozenset(_NOT_SPAWNED | {State.STOPPED}),
    State.FATAL: frozenset(_NOT_SPAWNED | {State.STOPPED}),
    State.STARTING: frozenset({State.RUNNING, State.UNHEALTHY, State.EXITED, State.STOPPING}),
    State.RUNNING: frozenset({State.UNHEALTHY, State.EXITED, State.STOPPING}),
    State.UNHEALTHY: frozenset({State.STOPPING}),
    State.EXITED: frozenset({State.STOPPING, State.STOPPED, State.BACKOFF, State.FATAL}),
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FATAL}),
}


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in the caller, never an outcome of the child."""


def inherited_env(parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every child inherits: our environment minus our own settings and secrets (FLEET_*, CONSUL_*).
    Stripping, not an allowlist: SGLang alone reads ~750 SGLANG_* variables besides torch's and NCCL's."""
    parent = os.environ if parent is None else parent
    return {k: v for k, v in parent.items() if not k.startswith(OWN_PREFIXES)}


def daemon_thread(name: str, target: Callable, *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


def log_output(log, stream: str, line: str, event: str) -> None:
    log.info(event, stream=stream, line=line)


@dataclass
class _Run:
    """One spawned process and the threads that pump its output."""
    proc: subprocess.Popen
    pumps: list[threading.Thread] = field(default_factory=list)
    owner: int = field(default_factory=os.getpid)  # a forked copy of the supervisor must not kill it


@dataclass
class _Stop:
    """A stop in progress: what poll() does next, and where the child goes once its group is gone."""
    began: float
    grace: float
    then: State  # STOPPED; BACKOFF or FATAL after retry_later()
    delay: float = 0.0  # the BACKOFF's length
    failure: str = ""  # what made retry_later() necessary
    group_termed: bool = False
    killed_at: float | None = None

    @property
    def kill_at(self) -> float:
        return self.began + self.grace


_LIVE: "weakref.WeakSet[Child]" = weakref.WeakSet()  # children with a spawned process, for the atexit net


class Child:
    def __init__(self, name: str, *, stop_grace: float = 30.0, leader: str | None = None,
                 term_leader_first: bool = False, max_starts: int | None = None,
                 on_line: Callable[[Any, str, str], None] | None = None, on_gone: Callable[[], str] | None = None,
                 logger: str | None = None, context: Mapping[str, Any] | None = None):
        """`term_leader_first`: stop() sends SIGTERM to the process it spawned (`leader` names it in the
        sentences) and the rest of the group gets it once the leader is gone or the grace is over; else the
        whole group gets it at once. `on_line(log, stream, line)` runs in the pump threads; `on_gone()` runs
        once a stopped group is gone and returns a clause for the stop sentence."""
        self.name = name
        self.stop_grace = stop_grace
        self.leader = leader or name
        self.term_leader_first = term_leader_first
        self.max_starts = max_starts
        self.on_line = on_line or (lambda log, stream, line: log_output(log, stream, line, f"{name}_output"))
        self.on_gone = on_gone
        self.logger = logger or f"sglang_fleet.{name}"
        self.context = dict(context or {})
        self.state = State.STOPPED
        self.reason = f"{name} not started"
        self.since = time.monotonic()
        self.history: list[tuple[State, str]] = []  # the last 50 transitions, for tests and status
        self.returncode: int | None = None
        self.starts = 0
        self.retry_at: float | None = None
        self._run: _Run | None = None
        self._stop: _Stop | None = None
        self._lock = threading.Lock()

    # -- observation -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._run.proc.pid if self._run else None

    @property
    def failed(self) -> bool:
        return self.state in FAILED

    @property
    def backoff_over(self) -> bool:
        return self.state is State.BACKOFF and time.monotonic() >= (self.retry_at or 0.0)

    def alive(self) -> bool:
        """The spawned process itself is running (safe from helper threads: it only looks)."""
        run = self._run
        return run is not None and run.proc.poll() is None

    def _log(self):
        # Built per call so the context (and a test's capture_logs) in force now applies.
        return structlog.get_logger(self.logger).bind(**self.context)

    def _check(self, state: State, sentence: str) -> None:
        if state not in _TRANSITIONS.get(self.state, frozenset()):
            raise IllegalTransition(f"{self.name}: {self.state.value} -> {state.value} is not allowed ({sentence})")

    def _change(self, state: State, sentence: str, **fields: Any) -> str:
        self._check(state, sentence)
        with self._lock:
            self.state, self.reason, self.since = state, sentence, time.monotonic()
            self.history = (self.history + [(state, sentence)])[-50:]
        log = self._log()
        (log.warning if state in FAILED else log.info)(sentence, state=state.value, **fields)
        return sentence

    # -- start and the owner's verdicts ------------------------------------------------------------------
    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Spawns `argv` (env: `inherited_env()` unless the owner built one) in its own session, to be
        SIGKILLed by the kernel when the calling thread ends. Never blocks on it."""
        self._check(State.STARTING, f"start {argv[0] if argv else '?'}")
        if self.state is not State.BACKOFF:
            self.starts = 0  # only a start out of BACKOFF continues a series; STOPPED or FATAL begin one
        self.starts += 1
        self.returncode = self.retry_at = None
        try:
            proc = subprocess.Popen(list(argv), env=dict(inherited_env() if env is None else env),
                                    start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True,
                                    preexec_fn=pg.die_with_parent_thread(os.getpid()))
        except (OSError, subprocess.SubprocessError) as e:
            return self._change(State.EXITED, f"{self.name} could not be started: {e}")
        run = self._run = _Run(proc)
        _LIVE.add(self)
        # Threads don't inherit contextvars: the pumps get the ones in force now.
        log = structlog.get_logger(self.logger).bind(**{**structlog.contextvars.get_contextvars(), **self.context})
        for stream_name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            run.pumps.append(daemon_thread(f"{self.name}-{stream_name}", _pump, stream, stream_name, log,
                                           self.on_line))
        return self._change(State.STARTING, f"{self.name} started pid {proc.pid}", pid=proc.pid)

    def ready(self, sentence: str, **fields: Any) -> str:
        self.starts = 0  # a child that came up has its starts back (supervisord resets its backoff here)
        return self._change(State.RUNNING, sentence, **fields)

    def unhealthy(self, sentence: str, **fields: Any) -> str:
        return self._change(State.UNHEALTHY, sentence, **fields)

    # -- the transitions the process makes ---------------------------------------------------------------
    def poll(self) -> State:
        """Cheap and non-blocking: notices an exit; while STOPPING, escalates and notices the group gone."""
        run, state = self._run, self.state
        if state is State.STOPPING:
            self._step_stop()
        elif state in (State.STARTING, State.RUNNING) and run is not None:
            code = run.proc.poll()
            if code is not None:
                self.returncode = code
                when = "before ready" if state is State.STARTING else "while running"
                self._change(State.EXITED, f"{self.name} exited with code {code} {when}", returncode=code)
        return self.state

    # -- stop --------------------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> str:
        """Non-blocking: the stop signal goes out, the state is STOPPING, and poll() SIGKILLs the whole group
        `grace` seconds later (default stop_grace). Idempotent; a second stop may shorten the grace."""
        return self._begin_stop(self.stop_grace if grace is None else grace, State.STOPPED)

    def stop_and_wait(self, grace: float | None = None) -> str:
        """stop(), then polls until the group is gone; returns how it went. For shutdown paths."""
        self.stop(grace)
        while self.state is State.STOPPING:
            time.sleep(STOP_POLL)
            self.poll()
        return self.reason

    def retry_later(self, delay: float) -> str:
        """After a failure (EXITED, UNHEALTHY): stops what is left, then BACKOFF for `delay` seconds, or FATAL
        when `max_starts` starts in a row have failed. Non-blocking, like stop()."""
        if self.state not in (State.EXITED, State.UNHEALTHY):
            raise IllegalTransition(f"{self.name}: retry_later() in {self.state.value}; only a failed child is retried")
        return self._begin_stop(self.stop_grace, State.BACKOFF, delay=delay, failure=self.reason)

    def _begin_stop(self, grace: float, then: State, delay: float = 0.0, failure: str = "") -> str:
        run, stop = self._run, self._stop
        if stop is not None:  # STOPPING already
            stop.grace = min(stop.grace, round(time.monotonic() - stop.began + grace, 1))
            if then is State.STOPPED:
                stop.then = State.STOPPED  # a stop wins over a pending retry
            return self.reason
        if run is None:  # nothing spawned, or its group is gone already
            if self.state is State.BACKOFF and then is State.STOPPED:
                return self._change(State.STOPPED, f"{self.name} stopped (it was waiting to start again)")
            if self.state is State.FATAL and then is State.STOPPED:
                return self._change(State.STOPPED, f"{self.name} stopped ({self.reason})")
            if self.state is State.EXITED:  # nothing was spawned
                return self._settle(then, f"{self.name} stopped ({self.reason})" if then is State.STOPPED else "",
                                    delay, failure)
            return self.reason
        self._check(State.STOPPING, "stop")
        self._stop = _Stop(began=time.monotonic(), grace=grace, then=then, delay=delay, failure=failure)
        target = self.leader if self.term_leader_first else "its process group"
        sentence = self._change(State.STOPPING, f"stopping {self.name} pid {run.proc.pid}: SIGTERM to {target}, "
                                f"{grace:g} s grace")
        if self.term_leader_first and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
        else:
            self._term_group()
        self._step_stop()  # a group that is gone already (an exited child) is done at once
        return sentence

    def _term_group(self) -> None:
        self._stop.group_termed = True
        pg.signal_group(self._run.proc.pid, signal.SIGTERM)

    def _step_stop(self) -> None:
        run, stop, now = self._run, self._stop, time.monotonic()
        # What is left once the leader is gone (SGLang's launch_server reaps its own children first).
        if not stop.group_termed and (run.proc.poll() is not None or now >= stop.kill_at):
            self._term_group()
        if pg.group_gone(run.proc, run.proc.pid):
            self._finish("")
        elif stop.killed_at is None and now >= stop.kill_at:
            self._log().warning(f"{self.name} still running {stop.grace:g} s after SIGTERM; SIGKILL to its "
                                f"process group", pgid=run.proc.pid)
            pg.signal_group(run.proc.pid, signal.SIGKILL)
            stop.killed_at = now
        elif stop.killed_at is not None and now >= stop.killed_at + KILL_WAIT:
            self._finish(f"; process group {run.proc.pid} still has live members")

    def _finish(self, note: str) -> None:
        run, stop = self._run, self._stop
        self.returncode = run.proc.poll()
        self._release()
        self._stop = None
        how = "after SIGTERM" if stop.killed_at is None else f"with SIGKILL after {stop.grace:g} s grace"
        extra = self.on_gone() if self.on_gone else ""
        sentence = (f"{self.name} stopped {how}{note} in {time.monotonic() - stop.began:.1f} s "
                    f"(exit code {self.returncode}){extra}")
        self._settle(stop.then, sentence, stop.delay, stop.failure)

    def _settle(self, then: State, stopped: str, delay: float = 0.0, failure: str = "") -> str:
        """The state after a stop: STOPPED, or (retry_later) BACKOFF unless the starts are spent: FATAL."""
        if then is State.STOPPED:
            return self._change(State.STOPPED, stopped, returncode=self.returncode)
        done = "; ".join(part for part in (failure, stopped) if part)
        if self.max_starts is not None and self.starts >= self.max_starts:
            return self._change(State.FATAL, f"{done}; {self.starts} start(s) in a row failed, giving up")
        self.retry_at = time.monotonic() + delay
        of = f"/{self.max_starts}" if self.max_starts is not None else ""
        return self._change(State.BACKOFF, f"{done}; starting again in {delay:.1f} s (start {self.starts + 1}{of})")

    def _release(self) -> None:
        """Ends the pumps of the last run; its process must be reaped already."""
        run, self._run = self._run, None
        _LIVE.discard(self)
        if run is None:
            return
        for t in run.pumps:
            t.join(timeout=2.0)
        if not any(t.is_alive() for t in run.pumps):  # a pump still reading (a pipe held by an escaped
            for stream in (run.proc.stdout, run.proc.stderr):  # process) would block close()
                stream.close()


def _pump(stream, name: str, log, on_line: Callable[[Any, str, str], None]) -> None:
    """Helper thread: every output line of the child goes to on_line (a log event). Decides nothing."""
    try:
        for raw in iter(stream.readline, b""):
            on_line(log, name, raw.decode("utf-8", "replace").rstrip("\r\n"))
    except (OSError, ValueError):  # the pipe was closed under us
        pass


@atexit.register
def _kill_leftovers() -> None:
    """The last net: an interpreter that ends with a child still running takes the child's group along
    (the death signal would reach only the process it spawned)."""
    for child in list(_LIVE):
        run = child._run
        if run is not None and run.owner == os.getpid():
            pg.signal_group(run.proc.pid, signal.SIGKILL)


__all__ = ["Child", "FAILED", "IllegalTransition", "OWN_PREFIXES", "State", "daemon_thread", "inherited_env",
           "log_output"]
