"""The node loop: rendezvous -> engine -> serving registration; restarts the whole group together.

One thread decides (`Node.run_cycle`). Each cycle takes at most one action and returns a
membership.Step: what it did ("waiting for peers 1/2 in generation 3", "rank 1 of 2, engine ready",
"peer node-b (rank 1) left; ending generation 3", logged when it changes) and how long to wait before
the next cycle. The group's side is membership.Membership (session, rank, generation, barrier, the
serving registration); the node keeps the engine and the restart budget. Helpers only observe:
the heartbeat thread passes TTL checks (registration.py), the watcher thread holds a blocking query on
the group's keys and wakes the loop (watch.py), the engine's threads pump output and probe /health
(engine.py). Signal handlers only set a flag. The engine is only ever started from this loop's thread
(the main thread): its PR_SET_PDEATHSIG is bound to the thread that forked it.

The ways out (leaving a generation, graceful stop with its drain) are leaving.Leaving's; a graceful
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
from dataclasses import dataclass

import structlog

from sglang_fleet import consul_api as ca
from sglang_fleet import health, launch, logs, netprofile
from sglang_fleet import registration as reg
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import EX_CONFIG, ConfigError, FleetConfig
from sglang_fleet.engine import Engine, EngineState
from sglang_fleet.leaving import EX_FATAL, STOP_POLL, Fatal, Leaving
from sglang_fleet.membership import Action, Ending, Generation, Membership, Step
from sglang_fleet.retry import backoff
from sglang_fleet.watch import Watcher

# After our own engine fails, wait this long for a peer's departure to show (its heartbeat TTL is 3 s):
# when an NCCL peer dies, every survivor's engine aborts too, and that is the peer's failure, not ours.
SETTLE_AFTER_ENGINE_FAILURE = 4.0


@dataclass
class Budget:
    """What survives generations: this node's own failures and the backoff before the next generation."""
    failures: int = 0  # consecutive generations this node's engine failed
    last_failure: str = ""
    resume_at: float = 0.0  # no new generation before this (monotonic)


class Node:
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
        self.serving = reg.ServingRegistration(self.api, cfg, self.addr, self.heartbeat)
        self.membership = Membership(self.rdv, self.heartbeat, self.serving,
                                     reattach_window=cfg.reattach_window, engine_ok=self._engine_ok)
        self.leaving = Leaving(cfg, self.membership)
        self.budget = Budget()
        self.watcher = Watcher(cfg, self.rdv.keys.prefix, self.wake, self.helpers_stop)
        self.log = logs.get("sglang_fleet.node")
        self.health = health.NodeHealth(cfg)  # /livez /readyz /metrics: observes this loop once per cycle

    @property
    def gen(self) -> Generation:
        """This node's part in its current generation (membership.Generation, replaced whole)."""
        return self.membership.gen

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
                if self.stop_event.is_set() and not self.leaving.stopping:
                    sentence = self.leaving.begin_stop()
                    if sentence:
                        self.log.info(sentence)
                        last = sentence
                if self.leaving.done:
                    break
                step = self.cycle()
                if step.sentence and step.sentence != last:
                    if step.warning:
                        self.log.warning(step.sentence, retry_in=round(step.wait, 2))
                    else:
                        self.log.info(step.sentence)
                    last = step.sentence
                if step.reread:
                    self.membership.fresh = True
                self._sleep(step.wait)
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
            self.membership.fresh = True  # something changed: the next cycle reads Consul

    def request_stop(self, *_args) -> None:
        self.leaving.stop_signals += 1  # a second signal cuts a drain short
        self.stop_event.set()
        self.wake.set()

    # ---- one cycle: at most one action ----------------------------------------------------------------
    def cycle(self) -> Step:
        """One cycle as the loop runs it: Consul's errors become Steps, each one counted in the metrics."""
        return self.membership.guarded(self.leaving.stop_cycle if self.leaving.stopping else self.run_cycle,
                                       on_error=self.health.consul_error)

    def run_cycle(self) -> Step:
        if self.gen.ending is not None:
            return self.leaving.step_ending() or self._next_generation()
        now = time.monotonic()
        if now < self.budget.resume_at:
            return Step.waiting(None, self.budget.resume_at - now)
        step = self.membership.next()
        if step.action is Action.RUN:
            return self._supervise_engine()
        if step.action is Action.DRAIN:
            return self.leaving.drain_for_member(self.membership.view)
        return step

    def _next_generation(self) -> Step:
        """The generation is left: spend the budget (own failure), back off, start over."""
        ending: Ending = self.membership.reset().ending
        b = self.budget
        if ending.own_failure and b.failures >= self.cfg.max_failures:
            raise Fatal(f"engine failed in {b.failures} consecutive generation(s), budget "
                        f"FLEET_MAX_FAILURES={self.cfg.max_failures} spent; last: {b.last_failure}")
        delay = backoff(b.failures, self.cfg.backoff_base, self.cfg.backoff_max)
        b.resume_at = time.monotonic() + delay
        budget = f"failure {b.failures}/{self.cfg.max_failures}" if b.failures else "no failure counted"
        return Step.acted(f"restarting the group in {delay:.1f} s ({budget})")

    def _supervise_engine(self) -> Step:
        gen, a, b = self.gen, self.gen.assignment, self.budget
        engine, now = gen.engine, time.monotonic()
        if engine is None:
            return self._start_engine()
        state = engine.poll()
        if state is EngineState.STOPPING:  # a failed start being cleared away before it is retried
            return Step.waiting(None, STOP_POLL)
        if state is EngineState.BACKOFF:  # engine.poll() starts it again once the backoff is over
            return Step.waiting(None, min(0.5, max(0.0, engine.retry_at - now)))
        if state is EngineState.STARTING:
            if engine.pid != gen.announced_pid:  # started again after a backoff
                gen.announced_pid = engine.pid
                return Step.waiting(self._started(engine), 0.25)
            return Step.waiting(f"rank {a.rank} of {a.nnodes}, engine starting in generation {a.generation}", 0.25)
        if state is EngineState.RUNNING:
            if gen.ready_at is None:
                gen.ready_at = now
            if gen.rank == 0 and self.serving.wanted:
                return Step.acted(self.serving.register(a.generation))
            if b.failures and now - gen.ready_at >= self.cfg.stable_after:
                b.failures = 0
                return Step.acted(f"generation {a.generation} stable for {self.cfg.stable_after:g} s; "
                                  f"failure count reset")
            return Step.waiting(f"rank {a.rank} of {a.nnodes}, engine ready in generation {a.generation}", 0.5)
        # EXITED or UNHEALTHY: our engine failed. Stop the router sending to it before anything else.
        if self.serving.registered:
            return Step.acted(self.serving.withdraw())
        # Was it a peer's failure first (NCCL abort)? `since`: when the engine failed.
        reason = engine.reason
        settle = SETTLE_AFTER_ENGINE_FAILURE if self.cfg.nnodes > 1 else 0.0
        if now - engine.since < settle:
            return Step.waiting(f"{reason}; checking whether a peer left first", 0.25)
        # Only a one-node group retries a start in place: the peers of a multi-node group wait in SGLang's
        # TCPStore/NCCL rendezvous for the rank that failed and cannot take a lone restarted one back.
        if gen.ready_at is None and self.cfg.nnodes == 1 and engine.starts < self.cfg.start_attempts:
            delay = backoff(engine.starts, self.cfg.backoff_base, self.cfg.backoff_max)
            attempt = engine.starts
            engine.retry_later(delay)  # BACKOFF; engine.poll() starts the same launch again after it
            return Step.acted(f"engine start attempt {attempt}/{self.cfg.start_attempts} failed ({reason}); "
                              f"retrying in {delay:.1f} s")
        b.last_failure = reason
        step = self.membership.end(self.membership.view, f"{reason}; ending generation {a.generation}",
                                   own_failure=True)
        if gen.ending.own_failure:  # not when a peer had ended the generation first
            b.failures += 1
        return step

    def _start_engine(self) -> Step:
        a, gen = self.gen.assignment, self.gen
        spec = launch.build_launch(self.cfg, a.rank, a.nnodes, a.dist_init_addr, self.addr)
        for warning in spec.warnings:
            self.log.info(f"launch note: {warning}")
        gen.engine = Engine.from_config(self.cfg, a.rank, group=self.group, generation=a.generation)
        gen.engine.start(spec)
        gen.announced_pid = gen.engine.pid
        return Step.waiting(self._started(gen.engine), 0.25)

    def _started(self, engine: Engine) -> str:
        a = self.gen.assignment
        return (f"rank {a.rank} of {a.nnodes}: engine started (pid {engine.pid}, attempt {engine.starts}) "
                f"in generation {a.generation}")

    def _engine_ok(self) -> bool:
        """The engine of this generation is running and healthy (a re-attach keeps only such a group)."""
        engine = self.gen.engine
        return engine is not None and engine.poll() is EngineState.RUNNING

    # ---- shutdown --------------------------------------------------------------------------------------
    def shutdown(self, why: str) -> None:
        """Withdraw serving, stop the engine, destroy the session, deregister the heartbeat. Best effort."""
        steps = []
        if self.serving.registered:
            steps.append(self.serving.withdraw())
        engine = self.gen.engine
        if engine is not None and engine.state is not EngineState.STOPPED:
            steps.append(engine.stop())
        if self.gen.session:
            try:
                self.api.session_destroy(self.gen.session)
                steps.append("session destroyed")
            except ca.ConsulError as exc:
                steps.append(f"session not destroyed ({exc})")
            self.gen.session = None
        self.helpers_stop.set()
        self.heartbeat.join(timeout=3)
        try:
            self.api.deregister_service(reg.member_id(self.cfg))
            steps.append("heartbeat deregistered")
        except ca.ConsulError as exc:
            steps.append(f"heartbeat not deregistered ({exc})")
        self.log.info(f"{why}: " + "; ".join(steps))


def run(cfg: FleetConfig) -> int:
    """`sglang-fleet node`."""
    node = Node(cfg)
    health.serve(cfg, node.health)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    return node.run()


__all__ = ["Budget", "EX_FATAL", "Fatal", "Node", "SETTLE_AFTER_ENGINE_FAILURE", "run"]
