"""Health for schedulers and Prometheus metrics: one small HTTP endpoint on every node supervisor and in
the router agent (FLEET_HEALTH_PORT, default 9400, 0 = off).

  GET /livez    200 while the supervisor's loop is alive (it beats every cycle); 503 once the last beat is
                older than a few times the longest the loop may sleep or block.
  GET /readyz   node: 200 while this node is part of a serving generation (rank assigned, engine ready,
                rank 0 registered as serving); router: 200 once the agent has read Consul and smg answers.
                503 with a one-line reason otherwise.
  GET /metrics  Prometheus text (docs/operations.md lists every metric).

The loops own their state: the node loop hands itself to `NodeHealth.observe()` once per cycle, which
reads it once (`Seen.of`) and derives everything (state, readiness, transitions that feed counters and
histograms) in the loop's thread; the HTTP thread only reads what the last observation left. Each NodeHealth/RouterHealth has its own
CollectorRegistry, so tests can run several in one process.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from sglang_fleet import logs
from sglang_fleet.config import EX_CONFIG, ConfigError, FleetConfig

# No `<counter>_created` series: they double what is exposed and no panel or alert reads them.
disable_created_metrics()

PREFIX = "sglang_fleet_"
# /livez fails once the loop has not beaten for this many times its longest sleep or block.
STALE_FACTOR = 3.0
LOOP_MAX_BLOCK_FLOOR = 30.0  # the node loop's longest backoff after a Consul refusal (node.py)
NODE_STATES = ("rendezvous", "starting", "ready", "failed", "draining", "leaving", "backoff", "stopping")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# K/g<G>/ended causes (rendezvous.py) as restart reasons of a node whose generation somebody else ended.
PEER_CAUSES = {"peer-left": "peer_left", "local-failure": "peer_engine_failed", "state-lost": "state_lost",
               "shutdown": "peer_stopped"}

Verdict = tuple[bool, str]


class Beat:
    """The loop's heartbeat: `beat()` every cycle; `live()` says whether the last one is recent enough."""

    def __init__(self, max_block: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.stale_after = STALE_FACTOR * max_block
        self.at = clock()

    def beat(self) -> None:
        self.at = self.clock()

    def live(self) -> Verdict:
        age = self.clock() - self.at
        if age > self.stale_after:
            return False, f"supervisor loop stalled: no cycle for {age:.0f} s (limit {self.stale_after:.0f} s)"
        return True, "supervisor loop alive"


@dataclass(frozen=True)
class Seen:
    """What one observation reads of the node loop: its part in the current generation
    (membership.Generation), its way out (leaving.Leaving), its restart budget (node.Budget), its serving
    registration and the last view of the group. `of()` is the only place that knows the node's shape."""
    generation: int | None
    rank: int | None
    assignment: Any  # rendezvous.Assignment, None before the barrier
    engine: Any  # engine.Engine, None before it is started in this generation
    ending: Any  # membership.Ending, None unless the generation is being left
    drain: Any  # drain.Drain under way (rank 0)
    awaiting_drain: bool  # a member > 0 waits for rank 0's drain
    stopping: bool
    registered: bool  # serving registration (rank 0)
    failures: int
    resume_at: float
    view: Any  # rendezvous.GroupView last read, None before the first read

    @classmethod
    def of(cls, node: Any) -> "Seen":
        gen, leaving, budget = node.gen, node.leaving, node.budget
        return cls(generation=gen.number, rank=gen.rank, assignment=gen.assignment, engine=gen.engine,
                   ending=gen.ending, drain=gen.drain, awaiting_drain=leaving.drain_wait_until is not None,
                   stopping=leaving.stopping, registered=node.serving.registered, failures=budget.failures,
                   resume_at=budget.resume_at, view=node.membership.view)

    @property
    def starts(self) -> int:
        """Starts of the engine in its current series (child.Child.starts); 0 without an engine."""
        return self.engine.starts if self.engine is not None else 0

    def ended_record(self) -> dict | None:
        """K/g<G>/ended of the generation being left, as last read."""
        e = self.ending
        return self.view.ended.get(e.generation) if self.view is not None and e.generation is not None else None


def _state_of(seen: Seen, now: float) -> str:
    if seen.drain is not None or seen.awaiting_drain:
        return "draining"
    if seen.ending is not None:
        return "leaving"
    if seen.stopping:
        return "stopping"
    if seen.generation is None and now < seen.resume_at:
        return "backoff"
    if seen.assignment is None or seen.engine is None:
        return "rendezvous"
    state = seen.engine.state.name
    if state == "RUNNING":
        return "ready"
    return "failed" if state in ("EXITED", "UNHEALTHY", "FATAL") else "starting"


def _readiness(seen: Seen, state: str, max_failures: int) -> Verdict:
    g = seen.generation
    if state == "ready":
        if seen.rank == 0 and not seen.registered:
            return False, f"rank 0 of generation {g}: engine ready, not registered as serving (yet)"
        return True, f"rank {seen.rank} of generation {g} serving"
    why = {"rendezvous": f"forming a group (generation {g}, rank {seen.rank})",
           "starting": f"engine starting in generation {g}",
           "failed": f"engine failed in generation {g}: {seen.engine.reason if seen.engine else ''}",
           "draining": f"draining generation {g}",
           "leaving": f"leaving generation {seen.ending.generation if seen.ending else g}: "
                      f"{seen.ending.reason if seen.ending else ''}",
           "backoff": f"waiting before the next generation (failure {seen.failures}/{max_failures})",
           "stopping": "stopping"}[state]
    return False, why


def restart_reason(seen: Seen) -> str:
    """Why the generation that `seen.ending` leaves ended, as a short label."""
    e = seen.ending
    if e.own_failure:
        state = seen.engine.state.name.lower() if seen.engine is not None else "failed"
        return f"engine_{state}"
    record = seen.ended_record()
    if record and record.get("cause") in PEER_CAUSES:
        return PEER_CAUSES[record["cause"]]
    return e.cause


class NodeHealth:
    """Metrics and health of one node supervisor; `observe(node)` once per loop cycle (loop thread)."""

    def __init__(self, cfg: FleetConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.cfg, self.clock, self.wall = cfg, clock, wall
        self.beat = Beat(max(LOOP_MAX_BLOCK_FLOOR, cfg.backoff_max, cfg.stop_grace), clock)
        self.ready: Verdict = (False, "supervisor starting")
        r = self.registry = CollectorRegistry()
        self.info = Gauge(PREFIX + "node_info", "This supervisor (value 1).", ["cluster", "group", "node", "role"],
                          registry=r)
        self.info.labels(cfg.cluster, cfg.group or cfg.node_name, cfg.node_name, cfg.role).set(1)
        self.generation = Gauge(PREFIX + "generation", "Generation this node is in; -1: none.", registry=r)
        self.rank = Gauge(PREFIX + "rank", "This node's rank in its generation; -1: none.", registry=r)
        self.state = Gauge(PREFIX + "node_state", "1 for the state the node is in, 0 for the others.",
                           ["state"], registry=r)
        self.ready_gauge = Gauge(PREFIX + "node_ready", "1 while /readyz answers 200.", registry=r)
        self.restarts = Counter(PREFIX + "engine_restarts", "Engines stopped for a restart, by reason.",
                                ["reason"], registry=r)
        self.failures = Gauge(PREFIX + "failures", "Consecutive generations this node's engine failed.",
                              registry=r)
        self.max_failures = Gauge(PREFIX + "max_failures", "The restart budget (FLEET_MAX_FAILURES).",
                                  registry=r)
        self.max_failures.set(cfg.max_failures)
        self.rendezvous_s = Histogram(PREFIX + "rendezvous_seconds", "From looking for a generation to a "
                                      "passed barrier (rank and dist-init address known).",
                                      buckets=DURATION_BUCKETS, registry=r)
        self.detection_s = Histogram(PREFIX + "failure_detection_seconds", "From a failure to this node "
                                     "leaving its generation: own engine's failure (cause=own_engine) or the "
                                     "generation ended by a peer (cause=peer).", ["cause"],
                                     buckets=DURATION_BUCKETS, registry=r)
        self.withdrawal_s = Histogram(PREFIX + "withdrawal_seconds", "How long leaving took: a generation "
                                      "(kind=generation_end) or a drain (kind=drain).", ["kind"],
                                      buckets=DURATION_BUCKETS, registry=r)
        self.consul_errors = Counter(PREFIX + "consul_errors", "Consul errors the node loop met, by kind.",
                                     ["kind"], registry=r)
        self.generation.set(-1)
        self.rank.set(-1)
        self._prev: dict[str, Any] = {"ending": None, "drain": None, "assignment": None, "attempts": 0}
        self._seeking_since: float | None = None
        self._ending_since: float | None = None
        self._drain_since: float | None = None

    def consul_error(self, exc: BaseException) -> None:
        self.consul_errors.labels(type(exc).__name__.removeprefix("Consul").lower() or "error").inc()

    def observe(self, node: Any) -> None:
        """Reads the node after a cycle: gauges, readiness, and the transitions since the last one."""
        self.beat.beat()
        now = self.clock()
        seen = Seen.of(node)
        state = _state_of(seen, now)
        self.generation.set(-1 if seen.generation is None else seen.generation)
        self.rank.set(-1 if seen.rank is None else seen.rank)
        for s in NODE_STATES:
            self.state.labels(s).set(1 if s == state else 0)
        self.failures.set(seen.failures)
        self.ready = _readiness(seen, state, self.cfg.max_failures)
        self.ready_gauge.set(1 if self.ready[0] else 0)
        self._transitions(seen, state, now)

    def _transitions(self, seen: Seen, state: str, now: float) -> None:
        prev = self._prev
        if seen.ending is not None and prev["ending"] is None:  # a generation is being left
            self._ending_since, self._seeking_since = now, None
            if seen.engine is not None:
                self.restarts.labels(restart_reason(seen)).inc()
            self._detected(seen, now)
        elif seen.ending is None and prev["ending"] is not None and self._ending_since is not None:
            self.withdrawal_s.labels("generation_end").observe(now - self._ending_since)
            self._ending_since = None
        if seen.drain is not None and prev["drain"] is None:
            self._drain_since = now
        elif seen.drain is None and prev["drain"] is not None and self._drain_since is not None:
            self.withdrawal_s.labels("drain").observe(now - self._drain_since)
            self._drain_since = None
        if state == "rendezvous" and seen.assignment is None and self._seeking_since is None:
            self._seeking_since = now
        if seen.assignment is not None and prev["assignment"] is None and self._seeking_since is not None:
            self.rendezvous_s.observe(now - self._seeking_since)
            self._seeking_since = None
        # A one-node group's in-place start retry: the same generation, another start of the same engine.
        if seen.assignment is not None and seen.starts > prev["attempts"] > 0:
            self.restarts.labels("start_retry").inc()
        prev.update(ending=seen.ending, drain=seen.drain, assignment=seen.assignment,
                    attempts=seen.starts if seen.assignment is not None else 0)

    def _detected(self, seen: Seen, now: float) -> None:
        failed_at = seen.engine.since if seen.engine is not None else None  # when it failed
        if seen.ending.own_failure and failed_at is not None:
            self.detection_s.labels("own_engine").observe(max(0.0, now - failed_at))
            return
        record = seen.ended_record()
        if record and record.get("by") != self.cfg.node_name and isinstance(record.get("at"), (int, float)):
            self.detection_s.labels("peer").observe(max(0.0, self.wall() - record["at"]))

    def live(self) -> Verdict:
        return self.beat.live()

    def readiness(self) -> Verdict:
        return self.ready


class RouterHealth:
    """Metrics and health of the router agent; the agent calls the hooks from its loop and watch threads."""

    def __init__(self, cfg: FleetConfig, smg_alive: Callable[[], bool], clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock, self.smg_alive = cfg, clock, smg_alive
        self.beat = Beat(max(LOOP_MAX_BLOCK_FLOOR, cfg.backoff_max, cfg.router_quiet_window * 5), clock)
        self.consul_read = False
        self._changed_at: float | None = None  # first Consul change not applied yet
        r = self.registry = CollectorRegistry()
        self.reconciled = Counter(PREFIX + "router_reconcile_changes", "Workers changed in smg, by action "
                                  "(added, removed, replaced) and role.", ["action", "role"], registry=r)
        self.lag_s = Histogram(PREFIX + "router_reconcile_lag_seconds", "From a change seen in Consul to smg's "
                               "worker list matching it.", buckets=DURATION_BUCKETS, registry=r)
        self.workers = Gauge(PREFIX + "router_workers", "Workers routed at the last reconcile, by role.",
                             ["role"], registry=r)
        self.consul_errors = Counter(PREFIX + "router_consul_errors", "Consul errors of the router's watch.",
                                     ["kind"], registry=r)
        self.smg_starts = Counter(PREFIX + "router_smg_starts", "smg starts: the first, then one after each "
                                  "exit or change of mode.", registry=r)

    def consul_answered(self, changed: bool) -> None:
        """The watch got an answer; `changed`: it differs from the last one."""
        self.consul_read = True
        if changed and self._changed_at is None:
            self._changed_at = self.clock()

    def consul_error(self, exc: BaseException) -> None:
        self.consul_errors.labels(type(exc).__name__.removeprefix("Consul").lower() or "error").inc()

    def changed(self, action: str, role: str) -> None:
        self.reconciled.labels(action, role).inc()

    def applied(self, routed: list[Any], roles: tuple[str, ...]) -> None:
        """A reconcile went through: smg matches Consul's answer as of now."""
        for role in roles:
            self.workers.labels(role).set(sum(1 for w in routed if w.worker_type == role))
        if self._changed_at is not None:
            self.lag_s.observe(self.clock() - self._changed_at)
            self._changed_at = None

    def live(self) -> Verdict:
        return self.beat.live()

    def readiness(self) -> Verdict:
        if not self.consul_read:
            return False, "the router agent has not read Consul yet"
        if not self.smg_alive():
            return False, "smg does not answer its /liveness"
        return True, "smg answers; Consul read"


# ---- the HTTP endpoint ------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "sglang-fleet-health"

    def do_GET(self):  # noqa: N802 - http.server's name
        health = self.server.health
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            return self._send(200, generate_latest(health.registry), CONTENT_TYPE_LATEST)
        verdict = {"/livez": health.live, "/readyz": health.readiness}.get(path)
        if verdict is None:
            return self._send(404, b"not found: /livez, /readyz, /metrics\n")
        ok, reason = verdict()
        self._send(200 if ok else 503, f"{reason}\n".encode())

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):  # probes every few seconds: not worth a log line each
        pass


class HealthServer:
    """The endpoint in a daemon thread; `close()` stops it."""

    def __init__(self, health: NodeHealth | RouterHealth, port: int, host: str = ""):
        try:
            self.httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as exc:
            raise ConfigError([f"FLEET_HEALTH_PORT={port}: cannot listen there ({exc.strerror or exc}); "
                               f"choose a free port, or 0 to turn the health endpoint off"]) from None
        self.httpd.daemon_threads = True
        self.httpd.health = health
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(cfg: FleetConfig, health: NodeHealth | RouterHealth) -> HealthServer | None:
    """Starts the endpoint on FLEET_HEALTH_PORT (None when it is 0). A taken port: one line, exit 78."""
    if not cfg.health_port:
        return None
    try:
        server = HealthServer(health, cfg.health_port)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    logs.get("sglang_fleet.health").info(f"health endpoint on port {server.port}: /livez /readyz /metrics")
    return server


__all__ = ["Beat", "HealthServer", "NODE_STATES", "NodeHealth", "RouterHealth", "Seen", "restart_reason", "serve"]
