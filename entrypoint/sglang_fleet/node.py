"""The node loop: rendezvous -> engine -> serving registration; restarts the whole group together.

One thread decides (`Node.run_cycle`). Each cycle reads a fresh view of the group, takes at most one
action and returns a sentence ("waiting for peers 1/2 in generation 3", "rank 1 of 2, engine ready",
"peer node-b (rank 1) left; ending generation 3") that is logged when it changes. Helpers only observe:
the heartbeat thread passes TTL checks (registration.py), the watcher thread holds a blocking query on
the group's keys and wakes the loop (watch.py), the engine's threads pump output and probe /health
(engine.py). Signal handlers only set a flag. The engine is only ever started from this loop's thread
(the main thread): its PR_SET_PDEATHSIG is bound to the thread that forked it.

The ways out (ending a generation, graceful stop with its drain, shutdown) are in leaving.py; a graceful
stop lets the requests in flight finish before any engine of the group stops (docs/protocol.md).

Failures: only this node's own engine failing spends its restart budget; a peer leaving or a generation
ended by somebody else does not. Consul errors are retried with backoff and never read as a peer leaving;
the engine keeps running through a Consul outage. (Patroni ha.py run_cycle, torchelastic _invoke_run.)
"""
from __future__ import annotations

import json
import signal
import threading
import time

import structlog

from sglang_fleet import consul_api as ca
from sglang_fleet import drain as dr
from sglang_fleet import health, launch, logs, netprofile
from sglang_fleet import registration as reg
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import EX_CONFIG, ConfigError, FleetConfig
from sglang_fleet.engine import Engine, EngineState
from sglang_fleet.leaving import EX_FATAL, Ending, Fatal, Leaving
from sglang_fleet.retry import backoff
from sglang_fleet.watch import Watcher

# After our own engine fails, wait this long for a peer's departure to show (its heartbeat TTL is 3 s):
# when an NCCL peer dies, every survivor's engine aborts too, and that is the peer's failure, not ours.
SETTLE_AFTER_ENGINE_FAILURE = 4.0
RE_READ_EVERY = 5.0  # seconds; the watcher wakes us on every change, this is only a backstop


class Node(Leaving):
    def __init__(self, cfg: FleetConfig, api: ca.ConsulAPI | None = None):
        self.cfg = cfg
        self.node_name = cfg.node_name
        self.group = cfg.group or cfg.node_name
        self.addr = netprofile.resolve_advertise_addr(cfg)
        self.api = api or ca.ConsulAPI(cfg.consul)
        self.rdv = rdv.Rendezvous(self.api, cfg, self.node_name, self.addr)
        self.stop_event = threading.Event()  # shutdown requested (signal)
        self.helpers_stop = threading.Event()  # stops heartbeat/watcher at the very end
        self.wake = threading.Event()
        self.heartbeat = reg.Heartbeat(cfg, self.addr, self.helpers_stop)
        self.watcher = Watcher(cfg, self.rdv.keys.prefix, self.wake, self.helpers_stop)
        self.log = logs.get("sglang_fleet.node")
        # Per generation:
        self.generation: int | None = None
        self.joined_gen_index = 0
        self.joined_reregistrations = 0
        self.session: str | None = None
        self.rank: int | None = None
        self.assignment: rdv.Assignment | None = None
        self.engine: Engine | None = None
        self.engine_ready_at: float | None = None
        self.start_attempts = 0
        self.engine_failed_at: float | None = None
        self.restart_engine_at: float | None = None
        self.serving = False
        self.serving_closed = False  # withdrawn for a drain: not registered again in this generation
        self.drain: dr.Drain | None = None
        self.drain_outcome: str | None = None  # how the last drain ended (rank 0)
        self.drain_confirmed = False  # rank 0 wrote K/g<G>/drained
        self.ending: Ending | None = None
        # Graceful stop:
        self.stopping = False
        self.stop_signals = 0
        self.drain_wait_until: float | None = None  # a member > 0 waits for rank 0's drain until then
        # Across generations:
        self.failures = 0  # consecutive generations this node's engine failed
        self.last_failure = ""
        self.resume_at = 0.0  # backoff: no new generation before this (monotonic)
        self.view: rdv.GroupView | None = None
        self.consul_errors = 0
        self.idle_wait = 1.0
        self.fresh_needed = True  # read Consul in the next cycle (woken, or we just acted)
        self.view_at = 0.0
        self.health = health.NodeHealth(cfg)  # /livez /readyz /metrics: observes this loop once per cycle

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> int:
        structlog.contextvars.bind_contextvars(cluster=self.cfg.cluster, group=self.group, node=self.node_name)
        self.log.info(f"node {self.node_name} of group {self.group} ({self.cfg.role}, {self.cfg.nnodes} "
                      f"node(s), engine {self.cfg.engine}) at {self.addr}; Consul {self.api.address}")
        self._record_fatal(None)  # a restarted node is not FATAL any more
        self.heartbeat.start()
        self.watcher.start()
        last = None
        code = 0
        try:
            while True:
                self.health.observe(self)
                if self.stop_event.is_set() and not self.stopping:
                    self.stopping = True
                    sentence = self._begin_stop()
                    if sentence:
                        self.log.info(sentence)
                        last = sentence
                if self.stopping and self.drain is None and self.drain_wait_until is None:
                    break
                try:
                    sentence = self._stop_cycle() if self.stopping else self.run_cycle()
                    if self.consul_errors:
                        self.log.info(f"Consul answers again after {self.consul_errors} failed attempt(s)")
                    self.consul_errors = 0
                except ca.ConsulUnavailable as exc:
                    self.health.consul_error(exc)
                    self.consul_errors += 1
                    self.fresh_needed = True
                    delay = backoff(self.consul_errors, 0.5, 5.0)
                    running = " the engine keeps running;" if self.engine and self.engine.pid else ""
                    sentence = f"Consul unavailable ({exc});{running} retrying"
                    if sentence != last:
                        self.log.warning(sentence, retry_in=round(delay, 2))
                    last = sentence
                    self._sleep(delay)
                    continue
                except ca.ConsulConflict as exc:
                    self.health.consul_error(exc)
                    # Somebody changed the group between our read and our write: read again.
                    sentence, self.fresh_needed, self.idle_wait = f"lost a race in Consul ({exc}); re-reading", True, 0
                except ca.ConsulError as exc:  # e.g. ACL denied: not transient, but do not crash
                    self.health.consul_error(exc)
                    self.consul_errors += 1
                    sentence = f"Consul refused a request ({exc}); retrying"
                    self.idle_wait, self.fresh_needed = backoff(self.consul_errors, 1.0, 30.0), True
                if sentence and sentence != last:
                    self.log.info(sentence)
                    last = sentence
                self._sleep(self.idle_wait)
        except Fatal as fatal:
            code = fatal.code
            self.log.error(f"FATAL: {fatal.reason}", exit_code=code)
            self._record_fatal(fatal.reason)
        except ConfigError as exc:
            code = EX_CONFIG
            self.log.error(f"FATAL: configuration error: {exc}", exit_code=code)
        except Exception as exc:  # a bug: withdraw everything and let the container restart us
            code = EX_FATAL
            self.log.exception(f"FATAL: internal error: {exc!r}", exit_code=code)
        finally:
            self.shutdown("shutdown requested" if code == 0 else "fatal")
        return code

    def _record_fatal(self, reason: str | None) -> None:
        """Best effort: `status` shows why this node gave up until it starts again."""
        key = self.rdv.keys.fatal(self.node_name)
        try:
            if reason is None:
                self.api.kv_delete(key)
            else:
                self.api.kv_put(key, json.dumps({"node": self.node_name, "reason": reason, "at": time.time()}))
        except ca.ConsulError as exc:
            self.log.warning(f"could not {'clear' if reason is None else 'record'} the FATAL reason in Consul ({exc})")

    def _sleep(self, seconds: float) -> None:
        """Sleeps until the watcher or a signal wakes us, at most `seconds`."""
        # Clear only a wake we saw: one set just after wait() timed out must wake the next sleep.
        if self.wake.wait(seconds) if seconds > 0 else self.wake.is_set():
            self.wake.clear()
            self.fresh_needed = True  # something changed: the next cycle reads Consul

    def _wait(self, seconds: float) -> None:
        """Ask the loop to wait up to `seconds` (or until the watcher/a signal wakes it) before the next cycle."""
        self.idle_wait = seconds

    def request_stop(self, *_args) -> None:
        self.stop_signals += 1  # a second signal cuts a drain short
        self.stop_event.set()
        self.wake.set()

    # ---- one cycle: at most one action ----------------------------------------------------------------
    def run_cycle(self) -> str | None:
        if self.idle_wait <= 0:
            self.fresh_needed = True  # the previous cycle acted: read what it changed
        self.idle_wait = 0.0  # after an action, go again at once
        if self.ending is not None:
            return self._step_ending()
        now = time.monotonic()
        if now < self.resume_at:
            self._wait(self.resume_at - now)
            return None
        if not self.heartbeat.registered.is_set():
            self._wait(0.2)
            return "waiting for the heartbeat check to be registered in Consul"

        if self.fresh_needed or self.view is None or now - self.view_at > RE_READ_EVERY:
            self.view, self.view_at, self.fresh_needed = self.rdv.read(), now, False
        view = self.view
        g = self.generation

        if g is not None:
            lost = self._state_lost(view)
            if lost:
                return self._end(None, f"Consul lost its state ({lost}); leaving generation {g}",
                                 own_failure=False, txn=False)

        if view.generation is None:
            self.rdv.ensure_generation()
            return f"created generation 0 of group {self.group}"

        if g is not None and view.generation != g:
            ended = view.ended.get(g)
            why = (f"generation {g} ended by {ended.get('by')}: {ended.get('reason')}" if ended
                   else f"generation moved from {g} to {view.generation}")
            return self._end(None, why, own_failure=False, txn=False)

        if self.session is None:
            if not self.heartbeat.keeping_up():
                # The session lives only as long as our own passes keep the check passing (registration.py
                # Heartbeat.keeping_up): joining on a check passed by a stale request dooms the generation.
                self._wait(0.5)
                why = f" ({self.heartbeat.last_error})" if self.heartbeat.last_error else ""
                return f"waiting for the heartbeat to reach Consul before joining generation {view.generation}{why}"
            self.session = self.rdv.create_session(self.heartbeat.check_id)
            self.generation, self.joined_gen_index = view.generation, view.gen_index
            self.joined_reregistrations = self.heartbeat.re_registrations
            structlog.contextvars.bind_contextvars(generation=self.generation)
            return f"joined generation {self.generation} with session {self.session[:8]}"

        if self.rank is not None and view.rank_of(self.session) is None:
            who = "my session" if self.assignment is None else "my rank key"
            return self._end(view, f"{who} in generation {g} is gone (heartbeat missed?); rejoining",
                             own_failure=False, txn=self.assignment is not None)

        if self.rank is None:
            try:
                rank, sentence = self.rdv.claim_rank(view, self.session)
            except ca.ConsulNotFound:  # invalidated while we waited for a rank: no retry brings it back
                return self._end(None, f"my session in generation {g} is gone (heartbeat missed?); rejoining",
                                 own_failure=False, txn=False)
            if rank is None:
                self._wait(1.0)
            else:
                self.rank = rank
                structlog.contextvars.bind_contextvars(rank=rank)
            return sentence

        if self.rank == 0 and view.leader is None:
            return self.rdv.publish_leader(view, self.session)

        if self.assignment is None:
            return self._barrier(view)

        gone = rdv.departures(view, self.assignment)
        if gone:
            names = ", ".join(f"{m.node} (rank {m.rank})" for m in gone)
            return self._end(view, f"peer {names} left; ending generation {g}", own_failure=False)

        if self.rank == 0 and view.draining is not None and not self.drain_confirmed:
            return self._drain_for_member(view)

        return self._supervise_engine(view)

    def _state_lost(self, view: rdv.GroupView) -> str | None:
        """Why the Consul state this generation was built on is gone, or None."""
        if view.generation is None:
            return "the group's keys are gone"
        if self.heartbeat.re_registrations != self.joined_reregistrations:
            return "the agent forgot our heartbeat check: restarted?"
        # K/gen changes only by CAS to G+1: the same G under another ModifyIndex was created anew (an
        # emptied Consul, re-filled by a peer that noticed first).
        if view.generation == self.generation and view.gen_index != self.joined_gen_index:
            return "the generation key was created anew since it was joined"
        return None

    def _barrier(self, view: rdv.GroupView) -> str:
        passed, sentence = rdv.barrier(view, self.generation, self.cfg.nnodes)
        if not passed:
            self._wait(1.0)
            return sentence
        mismatches = rdv.fingerprint_mismatches(view, self.rdv.fingerprint, self.node_name)
        if mismatches:
            self._wait(1.0)
            return f"config mismatch in generation {self.generation}: {'; '.join(mismatches)}; starting nothing"
        self.assignment = self.rdv.assignment(view, self.rank)
        return (f"barrier passed: rank {self.rank} of {self.cfg.nnodes} in generation {self.generation}, "
                f"dist-init {self.assignment.dist_init_addr}")

    def _supervise_engine(self, view: rdv.GroupView) -> str | None:
        a = self.assignment
        now = time.monotonic()
        if self.engine is None or (self.restart_engine_at is not None and now >= self.restart_engine_at):
            return self._start_engine()
        if self.restart_engine_at is not None:
            self._wait(min(0.5, self.restart_engine_at - now))
            return None
        state = self.engine.poll()
        if state is EngineState.STARTING:
            self._wait(0.25)
            return f"rank {a.rank} of {a.nnodes}, engine starting in generation {a.generation}"
        if state is EngineState.RUNNING:
            self.engine_failed_at = None
            if self.engine_ready_at is None:
                self.engine_ready_at = now
            if self.rank == 0 and not self.serving and not self.serving_closed:
                reg.register_serving(self.api, self.cfg, self.addr, a.generation)
                self.serving = True
                self.heartbeat.pass_serving(reg.serving_ttl_check_id(self.cfg))
                return (f"registered serving service {reg.serving_id(self.cfg)} ({self.cfg.role}) at "
                        f"http://{self.addr}:{self.cfg.http_port} for generation {a.generation}")
            if self.failures and now - self.engine_ready_at >= self.cfg.stable_after:
                self.failures = 0
                return f"generation {a.generation} stable for {self.cfg.stable_after:g} s; failure count reset"
            self._wait(0.5)
            return f"rank {a.rank} of {a.nnodes}, engine ready in generation {a.generation}"
        # EXITED or UNHEALTHY: our engine failed. Stop the router sending to it before anything else.
        if self.serving:
            return self._withdraw_serving()
        # Was it a peer's failure first (NCCL abort)?
        reason = self.engine.reason
        if self.engine_failed_at is None:
            self.engine_failed_at = now
        settle = SETTLE_AFTER_ENGINE_FAILURE if self.cfg.nnodes > 1 else 0.0
        if now - self.engine_failed_at < settle:
            self._wait(0.25)
            return f"{reason}; checking whether a peer left first"
        # Only a one-node group retries a start in place: the peers of a multi-node group wait in SGLang's
        # TCPStore/NCCL rendezvous for the rank that failed and cannot take a lone restarted one back.
        never_ready = self.engine_ready_at is None
        if never_ready and self.cfg.nnodes == 1 and self.start_attempts < self.cfg.start_attempts:
            delay = backoff(self.start_attempts, self.cfg.backoff_base, self.cfg.backoff_max)
            self.engine.stop()
            self.restart_engine_at = now + delay
            self.engine_failed_at = None
            return (f"engine start attempt {self.start_attempts}/{self.cfg.start_attempts} failed ({reason}); "
                    f"retrying in {delay:.1f} s")
        self.last_failure = reason
        return self._end(view, f"{reason}; ending generation {a.generation}", own_failure=True)

    def _start_engine(self) -> str:
        a = self.assignment
        self.restart_engine_at = None
        self.start_attempts += 1
        spec = launch.build_launch(self.cfg, a.rank, a.nnodes, a.dist_init_addr, self.addr)
        for warning in spec.warnings:
            self.log.info(f"launch note: {warning}")
        if self.engine is None:
            self.engine = Engine.from_config(self.cfg, a.rank, group=self.group, generation=a.generation)
        self.engine.start(spec)
        self.engine_failed_at = None
        self._wait(0.25)
        return (f"rank {a.rank} of {a.nnodes}: engine started (pid {self.engine.pid}, attempt "
                f"{self.start_attempts}) in generation {a.generation}")


def run(cfg: FleetConfig) -> int:
    """`sglang-fleet node`."""
    node = Node(cfg)
    health.serve(cfg, node.health)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    return node.run()


__all__ = ["EX_FATAL", "Ending", "Fatal", "Node", "run"]
