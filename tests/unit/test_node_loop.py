"""The node loop's decisions, one cycle at a time, over the in-memory KV and a scripted engine.

Only pure decisions are tested here; the real thing (Consul, processes, kill -9) is in
tests/integration/test_node.py.
"""
from __future__ import annotations

import threading
import time

import pytest
import structlog

from sglang_fleet import drain as dr
from sglang_fleet import node as node_mod
from sglang_fleet.engine import EngineState
from fake_consul import FakeStore
from rendezvous_contract import fleet_config as cfg


class FakeAPI(FakeStore):
    address = "fake:8500"

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.services = {}

    def register_service(self, name, service_id, **kw):
        self.calls.append(("register", service_id))
        self.services[service_id] = kw

    def deregister_service(self, service_id):
        self.calls.append(("deregister", service_id))
        self.services.pop(service_id, None)

    def session_destroy(self, sid):
        self.calls.append(("session_destroy", sid))
        super().session_destroy(sid)



class ScriptedEngine:
    """Stands in for engine.Engine (its child's states): the test sets `.state`; start, stop and
    retry_later are recorded; after retry_later, poll() starts it again once the backoff is over."""

    def __init__(self, calls):
        self.calls = calls
        self._state, self.since = EngineState.STOPPED, time.monotonic()
        self.reason = "engine not started"
        self.pid = None
        self.starts = 0
        self.retry_at = None
        self.launch = None

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, state):
        self._state, self.since = state, time.monotonic()

    def start(self, launch):
        self.calls.append(("engine_start", launch.argv[launch.argv.index("--node-rank") + 1]))
        self.launch, self.starts = launch, self.starts + 1
        self.state, self.pid = EngineState.STARTING, 4241 + self.starts

    def poll(self):
        if self.state is EngineState.BACKOFF and time.monotonic() >= self.retry_at:
            self.start(self.launch)
        return self.state

    def retry_later(self, delay):
        self.calls.append(("engine_retry", delay))
        self.state, self.pid, self.retry_at = EngineState.BACKOFF, None, time.monotonic() + delay

    def stop(self, grace=None, wait=True):
        self.calls.append(("engine_stop",))
        self.state, self.pid = EngineState.STOPPED, None
        return "engine stopped"


@pytest.fixture(autouse=True)
def plain_logging():
    """Another test may have run `cli.main` (logs.configure onto pytest's captured, since closed, stdout)."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def world(monkeypatch):
    calls: list = []
    engines: dict = {}

    def from_config(c, rank, **ctx):
        engines[c.node_name] = ScriptedEngine(calls)
        return engines[c.node_name]

    monkeypatch.setattr(node_mod.Engine, "from_config", staticmethod(from_config))
    api = FakeAPI(calls)
    return api, calls, engines


def make_node(api, name, **env):
    n = node_mod.Node(cfg(FLEET_NODE_NAME=name, FLEET_ADVERTISE_ADDR=f"10.0.0.{len(name)}",
                          FLEET_BACKOFF_BASE=0, **env), api=api)
    n.heartbeat.registered.set()
    n.heartbeat.last_pass = float("inf")  # no heartbeat thread here: its passes reach Consul
    return n


def cycle_until(n, text, limit=30):
    seen = []
    for _ in range(limit):
        n.membership.fresh = True  # what the watcher thread does on every change
        sentence = n.run_cycle().sentence
        seen.append(sentence)
        if sentence and text in sentence:
            return sentence
    raise AssertionError(f"{n.node_name} never said {text!r}; said {seen}")


def test_group_forms_registers_and_peer_leaving_costs_no_budget(world):
    api, calls, engines = world
    a, b = make_node(api, "a", FLEET_RANK0=1), make_node(api, "bb")
    cycle_until(a, "claimed rank 0 of 2 in generation 0")
    assert cycle_until(a, "waiting for") == "waiting for peers 1/2 in generation 0"
    cycle_until(b, "claimed rank 1 of 2 in generation 0")
    cycle_until(a, "barrier passed: rank 0 of 2 in generation 0, dist-init 10.0.0.1:20000")
    cycle_until(b, "barrier passed: rank 1 of 2")
    cycle_until(a, "engine started")
    cycle_until(b, "engine started")
    assert cycle_until(a, "engine starting") == "rank 0 of 2, engine starting in generation 0"
    engines["a"].state = engines["bb"].state = EngineState.RUNNING
    assert "registered serving service sglang-c-g (regular)" in cycle_until(a, "registered serving")
    assert cycle_until(a, "engine ready") == "rank 0 of 2, engine ready in generation 0"
    assert cycle_until(b, "engine ready") == "rank 1 of 2, engine ready in generation 0"
    assert [c for c in calls if c[0] == "register"] == [("register", "sglang-c-g")]

    # bb's session dies (kill -9: heartbeat TTL): a ends the generation; withdraw, then stop, then leave.
    api.session_destroy(b.membership.session)
    assert cycle_until(a, "left") == "peer bb (rank 1) left; ending generation 0"
    del calls[:]
    assert cycle_until(a, "restarting") == "restarting the group in 0.0 s (no failure counted)"
    assert [c[0] for c in calls] == ["deregister", "engine_stop", "session_destroy"]
    assert a.budget.failures == 0 and a.rdv.read().generation == 1
    assert cycle_until(a, "joined generation 1")


def test_own_engine_failure_spends_budget_then_fatal(world):
    api, calls, engines = world
    n = make_node(api, "solo", FLEET_NNODES=1, FLEET_TP_SIZE=1, FLEET_GROUP="", FLEET_MAX_FAILURES=2,
                  FLEET_START_ATTEMPTS=1)
    for gen in (0, 1):
        cycle_until(n, "engine started")
        engines["solo"].state = EngineState.EXITED
        engines["solo"].reason = "engine exited with code 1 before ready"
        assert cycle_until(n, "ending generation") == \
            f"engine exited with code 1 before ready; ending generation {gen}"
        if gen == 0:
            assert cycle_until(n, "restarting") == "restarting the group in 0.0 s (failure 1/2)"
    with pytest.raises(node_mod.Fatal, match="FLEET_MAX_FAILURES=2 spent; last: engine exited with code 1"):
        for _ in range(10):
            n.run_cycle()


def test_rank0_withdraws_at_once_when_its_engine_fails(world):
    api, calls, engines = world
    a, b = serving_pair(api, engines)
    del calls[:]
    engines["a"].state, engines["a"].reason = EngineState.UNHEALTHY, "engine stuck: /health failed 3 times"
    # Withdrawn before the settle time that looks for a peer's failure: the router stops sending now.
    assert cycle_until(a, "withdrew", limit=3) == "withdrew serving registration sglang-c-g"
    assert cycle_until(a, "checking whether a peer left first", limit=3)
    assert calls == [("deregister", "sglang-c-g")]


def test_start_attempts_retry_within_the_generation(world):
    api, calls, engines = world
    n = make_node(api, "solo", FLEET_NNODES=1, FLEET_TP_SIZE=1, FLEET_GROUP="", FLEET_START_ATTEMPTS=2)
    cycle_until(n, "engine started (pid 4242, attempt 1)")
    engines["solo"].state, engines["solo"].reason = EngineState.EXITED, "engine exited with code 1 before ready"
    assert "engine start attempt 1/2 failed" in cycle_until(n, "start attempt")
    cycle_until(n, "engine started (pid 4243, attempt 2)")
    assert n.budget.failures == 0 and n.membership.generation == 0
    assert [c for c in calls if c[0] == "engine_retry"] == [("engine_retry", 0)]


def test_a_failed_start_in_a_multinode_group_ends_the_generation_at_once(world, monkeypatch):
    """SGLang's peers wait in its rendezvous for the failed rank: no lone retry, whatever FLEET_START_ATTEMPTS."""
    monkeypatch.setattr(node_mod, "SETTLE_AFTER_ENGINE_FAILURE", 0.0)
    api, calls, engines = world
    a, b = make_node(api, "a", FLEET_RANK0=1, FLEET_START_ATTEMPTS=3), make_node(api, "bb", FLEET_START_ATTEMPTS=3)
    cycle_until(a, "claimed rank 0")
    cycle_until(b, "claimed rank 1")
    for n in (a, b):
        cycle_until(n, "engine started (pid 4242, attempt 1)")
    engines["bb"].state, engines["bb"].reason = EngineState.EXITED, "engine exited with code 1 before ready"
    assert cycle_until(b, "ending generation") == "engine exited with code 1 before ready; ending generation 0"
    assert b.gen.engine.starts == 1 and b.budget.failures == 1
    assert cycle_until(a, "ended").startswith("generation 0 ended by bb: engine exited with code 1 before ready")


def test_session_invalidated_while_waiting_for_a_rank_rejoins(world):
    api, calls, engines = world
    a, b = make_node(api, "a", FLEET_NODE_RANK=0), make_node(api, "bb", FLEET_NODE_RANK=0)
    cycle_until(a, "claimed rank 0 of 2 in generation 0")
    cycle_until(b, "rank 0 (FLEET_NODE_RANK) is held by a in generation 0")
    api.session_destroy(b.membership.session)  # bb's heartbeat lapsed while it waited
    api.session_destroy(a.membership.session)  # then rank 0 frees up: bb must not retry its dead session forever
    assert cycle_until(b, "is gone") == "my session in generation 0 is gone (heartbeat missed?); rejoining"
    cycle_until(b, "joined generation 0 with session")
    cycle_until(b, "claimed rank 0 of 2 in generation 0")
    assert b.budget.failures == 0


def test_no_session_while_the_own_heartbeat_does_not_reach_consul(world):
    # A member back from a network partition: Consul would accept a session (a pass sent during the
    # partition arrived late, so the check passes for one TTL), but this node's heartbeat thread still
    # cannot reach Consul. A session now would lapse with the check and end the generation it formed.
    api, calls, engines = world
    a, b = make_node(api, "a", FLEET_RANK0=1), make_node(api, "bb")
    cycle_until(a, "claimed rank 0 of 2 in generation 0")
    b.heartbeat.last_pass, b.heartbeat.last_error = None, "pass_ttl: ReadTimeout"
    sentence = cycle_until(b, "waiting for the heartbeat")
    assert sentence == ("waiting for the heartbeat to reach Consul before joining generation 0 "
                        "(pass_ttl: ReadTimeout)")
    for _ in range(3):
        b.membership.fresh = True
        b.run_cycle()
    assert b.membership.session is None and api.sessions == {a.membership.session}
    assert cycle_until(a, "waiting for") == "waiting for peers 1/2 in generation 0"

    b.heartbeat.last_error, b.heartbeat.last_pass = None, time.monotonic()  # its passes get through again
    cycle_until(b, "joined generation 0 with session")
    cycle_until(b, "claimed rank 1 of 2 in generation 0")


def test_a_wake_just_after_a_timed_out_sleep_is_not_lost(world):
    api, calls, engines = world

    class LateWake(threading.Event):
        """The watcher's set() lands between wait() timing out and the loop looking at the event."""
        late = True

        def wait(self, timeout=None):
            woke = super().wait(timeout)
            if self.late:
                self.late = False
                self.set()
                return False
            return woke

    n = make_node(api, "a")
    n.wake, n.membership.fresh = LateWake(), False
    n._sleep(0.01)
    n._sleep(0.5)
    assert n.membership.fresh  # the change is read in the next cycle, not up to RE_READ_EVERY later


# ---- graceful stop: drain before any engine of the group stops -----------------------------------------
@pytest.fixture
def loads(monkeypatch):
    """The engine's answers to 'how many requests in flight' (the last one repeats); no router pickup wait."""
    values: list = [0]
    monkeypatch.setattr(dr, "ROUTER_PICKUP", 0.0)
    monkeypatch.setattr(dr, "requests_in_flight",
                        lambda url, timeout=2.0, api_key=None: values.pop(0) if len(values) > 1 else values[0])
    return values


def serving_pair(api, engines, **env):
    a, b = make_node(api, "a", FLEET_RANK0=1, **env), make_node(api, "bb", **env)
    cycle_until(a, "claimed rank 0")
    cycle_until(b, "claimed rank 1")
    for n in (a, b):
        cycle_until(n, "engine started")
    engines["a"].state = engines["bb"].state = EngineState.RUNNING
    cycle_until(a, "registered serving")
    cycle_until(b, "engine ready")
    return a, b


def test_rank0_stop_withdraws_then_drains_keeping_its_rank_then_stops(world, loads):
    api, calls, engines = world
    a, b = serving_pair(api, engines)
    loads[:] = [2, 2, 1, 0, 0]
    del calls[:]
    a.request_stop()
    assert a.leaving.begin_stop() == "stop requested: withdrew serving registration sglang-c-g; draining: 2 requests in flight"
    said = []
    while a.gen.drain is not None:
        said.append(a.leaving.stop_cycle().sentence)
    assert "draining: 1 request in flight" in said and said[-1].startswith("drained: no requests in flight after")
    # Only the registration is gone: the engine still runs, the rank key is still held, the peer serves on.
    assert calls == [("deregister", "sglang-c-g")]
    assert a.rdv.read().members[0].session == a.membership.session and a.gen.engine.state is EngineState.RUNNING
    assert cycle_until(b, "engine ready") == "rank 1 of 2, engine ready in generation 0"


def test_member_stop_asks_rank0_to_drain_and_waits_for_it(world, loads):
    api, calls, engines = world
    a, b = serving_pair(api, engines)
    loads[:] = [1, 0, 0]
    del calls[:]
    b.request_stop()
    assert b.leaving.begin_stop() == ("stop requested; asked rank 0 (a) to withdraw and drain generation 0 first "
                               "(waiting up to 35 s)")
    assert b.leaving.stop_cycle().sentence == "waiting for rank 0 to drain generation 0"
    assert cycle_until(a, "is stopping") == ("bb is stopping: withdrew serving registration sglang-c-g; "
                                             "draining: 1 request in flight")
    told = cycle_until(a, "told bb")
    assert told.startswith("drained: no requests in flight after") and told.endswith("; told bb to go on stopping")
    assert b.leaving.stop_cycle().sentence.startswith("rank 0 drained generation 0 (drained: no requests in flight")
    assert b.leaving.drain_wait_until is None  # the loop goes on to shutdown(): engine, session, heartbeat
    # Rank 0 does not register again while the member leaves; nothing was stopped on its side.
    assert cycle_until(a, "engine ready") == "rank 0 of 2, engine ready in generation 0"
    assert calls == [("deregister", "sglang-c-g")]


def test_member_stop_gives_up_waiting_when_the_generation_ends(world, loads):
    api, calls, engines = world
    a, b = serving_pair(api, engines)
    b.request_stop()
    b.leaving.begin_stop()
    api.session_destroy(a.membership.session)  # rank 0 dies meanwhile
    assert b.leaving.stop_cycle().sentence == "a (rank 0) left generation 0; stopping"


def test_no_drain_when_disabled_or_after_a_failure(world, loads):
    api, calls, engines = world
    a, b = serving_pair(api, engines, FLEET_DRAIN_TIMEOUT=0)
    a.request_stop()
    assert a.leaving.begin_stop() is None and a.gen.drain is None  # shutdown() withdraws and stops at once
    c = make_node(api, "solo", FLEET_NNODES=1, FLEET_TP_SIZE=1, FLEET_GROUP="")
    cycle_until(c, "engine started")
    engines["solo"].state = EngineState.RUNNING
    cycle_until(c, "registered serving")
    engines["solo"].state, engines["solo"].reason = EngineState.EXITED, "engine exited with code 1 while running"
    cycle_until(c, "ending generation")
    c.request_stop()
    assert c.leaving.begin_stop() is None  # the engine is dead: nothing in flight can be saved
