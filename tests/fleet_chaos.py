"""Consul outages under a serving fleet, measured: the scenarios of issue 11, shared by the chaos tier
(tests/chaos), the outage test of the integration tier (tests/integration/test_consul_outage.py) and
scripts/bench_chaos.py.

A scenario builds a Consul topology (tests/consul_cluster.py, or fleet_processes.ConsulAgent for `-dev`),
sim-engine groups of node supervisors and a router on top (tests/fleet_processes.py), sends requests
through the router all the time from a background thread (`Traffic`) while another thread lists the
router's workers (`WorkerWatch`), breaks Consul, repairs it, and returns an `OutageResult`: engine
restarts and generations joined per group, failed requests, worker-list samples that lacked a group
routed before, and the time from the repair until every group expected to serve passes in Consul and is
routed again, for good.

`check_untouched(result)` is the target of every scenario in which no engine died: no engine restart and
no new generation (else `ReattachMissing`), no failed request, no group ever missing from the router's
worker list (members re-attach to the same generation when Consul returns, docs/protocol.md).
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.error
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from consul_cluster import ConsulCluster
from fleet_processes import SIM_ENV, ConsulAgent, Router, Supervisor, Supervisors, http
from fleet_testing import wait_until
from sglang_fleet.consul_api import ConsulError

LABEL_GROUP = "sglang-fleet/group"
JOINED = re.compile(r"joined generation (\d+)")
ENGINE_STARTED = "engine started (pid"
RECOVER_TIMEOUT = 90.0


class ReattachMissing(AssertionError):
    """A group restarted its engines or moved to a new generation across a Consul outage in which none of
    its engines died: re-attach (docs/protocol.md "Re-attach after a Consul outage") did not hold."""


# ---- what flows and what is listed during a scenario ------------------------------------------------------
class Traffic(threading.Thread):
    """POST /generate through the router every `interval` s, each with a deadline; records every answer."""

    def __init__(self, router_url: str, interval: float = 0.2, timeout: float = 10.0):
        super().__init__(name="traffic", daemon=True)
        self.url, self.interval, self.timeout = router_url + "/generate", interval, timeout
        self.results: list[tuple[float, object]] = []  # (monotonic time, HTTP status or the error)
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            began = time.monotonic()
            try:
                status, _ = http("POST", self.url, {"text": f"chaos request {n}", "sampling_params":
                                                    {"max_new_tokens": 4}}, timeout=self.timeout)
            except (urllib.error.URLError, OSError) as exc:
                status = repr(exc)
            self.results.append((began, status))
            self.halt.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def failures(self) -> list[tuple[float, object]]:
        return [(t, s) for t, s in self.results if s != 200]

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=self.timeout + 5)


class WorkerWatch(threading.Thread):
    """Lists the router's workers every `interval` s: (monotonic time, {group: url}), or None when smg
    did not answer."""

    def __init__(self, router: Router, interval: float = 0.5):
        super().__init__(name="worker-watch", daemon=True)
        self.router, self.interval = router, interval
        self.samples: list[tuple[float, dict[str, str] | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                listed = {w.get("labels", {}).get(LABEL_GROUP, "?"): w["url"] for w in self.router.workers()}
            except (AssertionError, urllib.error.URLError, OSError):
                listed = None
            self.samples.append((time.monotonic(), listed))

    def lacking(self, groups: Iterable[str]) -> list[tuple[float, list[str]]]:
        """Samples in which one of `groups` was not listed at all."""
        groups = set(groups)
        return [(t, sorted(groups - set(listed or {}))) for t, listed in self.samples
                if listed is None or not groups <= set(listed)]

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# ---- the fleet --------------------------------------------------------------------------------------------
class Fleet:
    """Regular sim groups whose nodes talk to `nodes_consul`, and a router that talks to `router_consul`."""

    def __init__(self, nodes_consul, router_consul, cluster: str, workdir: Path):
        self.nodes_consul, self.router_consul, self.cluster = nodes_consul, router_consul, cluster
        self.sups = Supervisors(nodes_consul, cluster, workdir, SIM_ENV)
        self.workdir = workdir
        self.groups: dict[str, list[Supervisor]] = {}
        self.router: Router | None = None

    def group(self, name: str, nnodes: int) -> list[Supervisor]:
        self.groups[name] = self.sups.group(name, nnodes, FLEET_ROLE="regular")
        return self.groups[name]

    def add_member(self, group: str, name: str) -> Supervisor:
        """A replacement member of `group` (a new node name)."""
        nnodes = int(self.groups[group][0].env["FLEET_NNODES"])
        sup = self.sups.start(name, FLEET_ROLE="regular", FLEET_GROUP=group, FLEET_NNODES=nnodes, FLEET_TP_SIZE=nnodes)
        self.groups[group].append(sup)
        return sup

    def start_router(self) -> Router:
        self.router = Router(self.router_consul.addr, self.cluster, self.workdir, FLEET_ROUTER_MODE="regular",
                             FLEET_ROUTER_POLICY="round_robin", FLEET_ROUTER_RESYNC_INTERVAL="1")
        return self.router

    def passing_in_consul(self) -> set[str]:
        """Groups whose serving service passes, as any running Consul member of the fleet sees it."""
        for consul in (self.router_consul, self.nodes_consul):
            api = consul.api()
            try:
                _, entries = api.health_service("sglang", tag=f"cluster:{self.cluster}", passing=True)
                return {(e["Service"].get("Meta") or {}).get("group", "?") for e in entries}
            except ConsulError:
                continue
            finally:
                api.close()
        return set()

    def routed_ready(self) -> set[str]:
        return {w.get("labels", {}).get(LABEL_GROUP, "?") for w in self.router.workers() if w.get("status") == "ready"}

    def serving(self, groups: Iterable[str]) -> bool:
        groups = set(groups)
        try:
            return groups <= self.passing_in_consul() and groups <= self.routed_ready()
        except (AssertionError, urllib.error.URLError, OSError):
            return False

    def wait_serving(self, timeout: float = 90.0) -> None:
        try:
            wait_until(lambda: self.serving(self.groups), timeout, f"groups {sorted(self.groups)} to serve through "
                       "the router", interval=0.3)
        except AssertionError as exc:
            tails = "\n".join(f"--- {s.name}\n{s.tail(8)}" for g in self.groups.values() for s in g)
            raise AssertionError(f"{exc}\n{tails}\n--- router\n{self.router.tail(8)}") from None

    def cleanup(self) -> None:
        if self.router is not None:
            self.router.kill()
        self.sups.cleanup()


def joined_generations(sup: Supervisor, since: int = 0) -> list[int]:
    """The generations `sup` joined after log position `since`, in order."""
    return [int(m.group(1)) for e in sup.events(JOINED, since) if (m := JOINED.search(str(e["event"])))]


# ---- one measured outage -------------------------------------------------------------------------------------
@dataclass
class OutageResult:
    scenario: str
    outage_s: float  # from the first fault to the repair
    engine_restarts: dict[str, int]  # group -> engines started after the fault began
    generations_before: dict[str, int | None]
    generations_joined: dict[str, list[int]]  # group -> generations its members joined after the fault began
    pids_unchanged: dict[str, bool]  # group -> every member alive before and after kept its engine processes
    requests: int
    failed_requests: int
    first_failures: list[str]
    worker_list_lacking: dict[str, int]  # group -> samples of the router's list without it
    time_to_recover_s: float | None  # repair -> serving again for good (None: not within the timeout)
    serving_after: list[str]

    def as_json(self) -> dict:
        return asdict(self)


def measure(name: str, fleet: Fleet, fault: Callable[[], None], serving_after: Iterable[str],
            settle: float = 12.0) -> OutageResult:
    """Runs `fault` (it breaks Consul and returns once it is repaired) under traffic and measures."""
    serving_after = sorted(serving_after)
    fleet.wait_serving()
    members = [s for g in fleet.groups.values() for s in g]
    marks = {s.name: s.mark() for s in members}
    pids = {s.name: s.engine_pids() for s in members}
    gens = {g: max([gen for s in sups for gen in joined_generations(s)[-1:]], default=None)
            for g, sups in fleet.groups.items()}
    routed_before = sorted(fleet.groups)
    traffic, watch = Traffic(fleet.router.url), WorkerWatch(fleet.router)
    traffic.start()
    watch.start()
    began = time.monotonic()
    try:
        fault()
        repaired = time.monotonic()
        # Serving again for good: the end of the last sample that was not serving, `settle` s at least
        # (a group that re-forms does so a few seconds after Consul returns, while the old state still passes).
        last_bad: float | None = None
        recovered: float | None = None
        while time.monotonic() - repaired < RECOVER_TIMEOUT:
            now = time.monotonic()
            if fleet.serving(serving_after):
                if now - repaired >= settle:
                    recovered = (last_bad or repaired) - repaired
                    break
            else:
                last_bad = now
            time.sleep(0.3)
    finally:
        traffic.stop()
        watch.stop()
    groups_now = fleet.groups
    failures = traffic.failures()
    return OutageResult(
        scenario=name, outage_s=round(repaired - began, 1),
        engine_restarts={g: sum(len(s.events(ENGINE_STARTED, marks.get(s.name, 0))) for s in sups)
                         for g, sups in groups_now.items()},
        generations_before=gens,
        generations_joined={g: sorted({gen for s in sups for gen in joined_generations(s, marks.get(s.name, 0))})
                            for g, sups in groups_now.items()},
        pids_unchanged={g: all(s.engine_pids() == pids[s.name] for s in sups if s.name in pids and s.alive())
                        for g, sups in groups_now.items()},
        requests=len(traffic.results), failed_requests=len(failures),
        first_failures=[f"+{t - began:.1f}s: {s}" for t, s in failures[:5]],
        worker_list_lacking={g: len([1 for _, lack in watch.lacking(routed_before) if g in lack])
                             for g in routed_before},
        time_to_recover_s=None if recovered is None else round(recovered, 1), serving_after=serving_after)


def check_untouched(result: OutageResult, groups: Iterable[str] | None = None) -> None:
    """The target where no engine died: no engine restart, no new generation, no failed request, no
    group missing from the router's list at any time, every group serving again."""
    groups = sorted(groups if groups is not None else result.engine_restarts)
    moved = {g: (result.engine_restarts[g], result.generations_joined[g]) for g in groups
             if result.engine_restarts[g] or result.generations_joined[g] or not result.pids_unchanged[g]}
    if moved:
        raise ReattachMissing(f"{result.scenario}: groups restarted across the outage (engine starts, generations "
                              f"joined): {moved}; {result.failed_requests} of {result.requests} requests failed")
    assert result.time_to_recover_s is not None, f"{result.scenario}: not serving again: {result}"
    assert result.failed_requests == 0, f"{result.scenario}: {result.failed_requests} failed: {result.first_failures}"
    lacking = {g: n for g, n in result.worker_list_lacking.items() if g in groups and n}
    assert not lacking, f"{result.scenario}: the router's worker list lacked a group in {lacking} samples"


# ---- the scenarios -------------------------------------------------------------------------------------------
@dataclass
class ScenarioEnv:
    """Where scenarios run; everything started through `stack` is killed when it closes."""
    consul_bin: str
    workdir: Path
    cluster: str
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def consul_cluster(self, servers: int, clients: int = 0) -> ConsulCluster:
        cluster = ConsulCluster(self.consul_bin, self.workdir / "consul", servers=servers, clients=clients)
        self.stack.callback(cluster.kill_all)
        return cluster.start()

    def dev_agent(self) -> ConsulAgent:
        agent = ConsulAgent(self.consul_bin, self.workdir)
        self.stack.callback(agent.stop)
        agent.start()
        return agent

    def fleet(self, nodes_consul, router_consul=None, groups: dict[str, int] | None = None) -> Fleet:
        fleet = Fleet(nodes_consul, router_consul or nodes_consul, self.cluster, self.workdir)
        self.stack.callback(fleet.cleanup)
        for name, nnodes in (groups or {"g": 2}).items():
            fleet.group(name, nnodes)
        fleet.start_router()
        return fleet


def down(member, seconds: float) -> Callable[[], None]:
    """kill -9 of a Consul member (a ConsulMember or a -dev ConsulAgent), `seconds` down, started again."""
    def fault() -> None:
        stop = getattr(member, "kill9", None) or member.stop
        stop()
        time.sleep(seconds)
        member.start()
    return fault


def single_server_killed(env: ScenarioEnv, seconds: float, nodes_on_client: bool = False) -> OutageResult:
    """A persistent single-server Consul killed for `seconds`; the 2-node group and the router talk to the
    server itself (issue 11's reproduction) or to a client agent of it."""
    consul = env.consul_cluster(servers=1, clients=1 if nodes_on_client else 0)
    fleet = env.fleet(consul.clients[0] if nodes_on_client else consul.servers[0])
    where = "client agent" if nodes_on_client else "server"
    return measure(f"single server killed {seconds:g} s (nodes on the {where})", fleet,
                   down(consul.servers[0], seconds), ["g"])


def leader_killed(env: ScenarioEnv, seconds: float = 10.0) -> OutageResult:
    """3 servers; the leader killed (an election follows), started again after `seconds`."""
    consul = env.consul_cluster(servers=3, clients=1)
    fleet = env.fleet(consul.clients[0])

    def fault() -> None:
        leader = consul.wait_leader()
        leader.kill9()
        consul.wait_leader(other_than=leader)
        time.sleep(seconds)
        leader.start()
        consul.wait_ready(members=[leader])
    return measure("leader of 3 servers killed (election)", fleet, fault, ["g"])


def quorum_lost(env: ScenarioEnv, seconds: float = 30.0) -> OutageResult:
    """3 servers; the leader and one follower killed (no quorum) for `seconds`, then both started again."""
    consul = env.consul_cluster(servers=3, clients=1)
    fleet = env.fleet(consul.clients[0])

    def fault() -> None:
        leader = consul.wait_leader()
        victims = [leader, next(s for s in consul.servers if s is not leader)]
        for s in victims:
            s.kill9()
        time.sleep(seconds)
        for s in victims:
            s.start()
        consul.wait_ready()
    return measure(f"2 of 3 servers killed {seconds:g} s (no quorum)", fleet, fault, ["g"])


def client_agent_restarted(env: ScenarioEnv, seconds: float = 20.0) -> OutageResult:
    """The client agent the nodes and the router talk to killed for `seconds` and started again (same data
    dir: an agent upgrade or a crash); long enough for the servers to mark its node failed."""
    consul = env.consul_cluster(servers=3, clients=1)
    fleet = env.fleet(consul.clients[0])

    def fault() -> None:
        down(consul.clients[0], seconds)()
        consul.wait_ready(members=[consul.clients[0]])
    return measure(f"client agent killed {seconds:g} s and restarted", fleet, fault, ["g"])


def dev_agent_restarted_empty(env: ScenarioEnv, seconds: float = 5.0) -> OutageResult:
    """A `-dev` agent (state in memory only) killed and started again: Consul comes back empty."""
    agent = env.dev_agent()
    fleet = env.fleet(agent)
    return measure("-dev agent restarted empty", fleet, down(agent, seconds), ["g"])


def member_dies_during_outage(env: ScenarioEnv, seconds: float = 20.0, replacement: bool = False) -> OutageResult:
    """A -dev agent down for `seconds` and back empty; meanwhile kill -9 of one member of group `a` (its engine
    too), and with `replacement` a new node for group `a` started while Consul is still down. Group `b`
    (1 node) only rides the outage. A -dev agent because Consul then loses every session for sure: on a
    persistent server a member whose heartbeat reaches the restarted agent within its TTL keeps its
    session today, and whether it does is a race (seen both ways for the same 1-node group)."""
    agent = env.dev_agent()
    fleet = env.fleet(agent, groups={"a": 2, "b": 1})

    def fault() -> None:
        agent.stop()
        time.sleep(seconds / 4)
        victim = fleet.groups["a"][1]
        victim.kill9(with_engine=True)
        fleet.groups["a"].remove(victim)
        if replacement:
            fleet.add_member("a", "a-n1-replacement")
        time.sleep(seconds * 3 / 4)
        agent.start()
    what = "replacement started" if replacement else "no replacement"
    return measure(f"member of group a killed during a {seconds:g} s outage of a -dev agent ({what})", fleet,
                   fault, ["a", "b"] if replacement else ["b"])


__all__ = ["Fleet", "OutageResult", "ReattachMissing", "ScenarioEnv", "Traffic", "WorkerWatch",
           "check_untouched", "client_agent_restarted", "dev_agent_restarted_empty", "down", "joined_generations",
           "leader_killed", "measure", "member_dies_during_outage", "quorum_lost", "single_server_killed"]
