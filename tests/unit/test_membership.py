"""membership.Membership: one step at a time over tests/fake_consul.py, every step an explicit action with its
sentence and its wait. The node loop around it is tested in test_node_loop.py, the real thing in
tests/integration/test_node.py."""
from __future__ import annotations

import threading

import pytest
import structlog
from structlog.testing import capture_logs

from fake_consul import FakeStore
from rendezvous_contract import fleet_config as cfg
from sglang_fleet import consul_api as ca
from sglang_fleet import rendezvous as rdv
from sglang_fleet.membership import BARRIER_WAIT, Action, Ending, Generation, Membership, Step


class Beat:
    """What the membership reads of registration.Heartbeat: a registered check whose passes get through."""

    def __init__(self):
        self.check_id = "hb"
        self.registered = threading.Event()
        self.registered.set()
        self.re_registrations = 0
        self.last_error = None
        self.failed_at = None

    def keeping_up(self):
        return self.last_error is None


@pytest.fixture(autouse=True)
def plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def membership(store, name, **env) -> Membership:
    c = cfg(FLEET_NODE_NAME=name, **env)
    return Membership(rdv.Rendezvous(store, c, name, f"10.0.0.{len(name)}", version="v1"), Beat())


def step(m: Membership) -> Step:
    m.fresh = True  # what the watcher does on every change
    return m.guarded(m.next)


def test_every_step_to_the_barrier_is_one_explicit_action():
    store = FakeStore()
    a, b = membership(store, "a", FLEET_RANK0=1), membership(store, "bb")
    s = step(a)
    assert s == Step(Action.ACTED, "created generation 0 of group g", 0.0, reread=True)
    s = step(a)
    assert (s.action, s.sentence, s.reread) == (Action.ACTED, f"joined generation 0 with session {a.session[:8]}",
                                                True)
    assert step(a) == Step.acted("claimed rank 0 of 2 in generation 0")
    assert step(a) == Step.acted("published leader 10.0.0.1:20000 for generation 0")
    assert step(a) == Step(Action.WAIT, "waiting for peers 1/2 in generation 0", BARRIER_WAIT)
    step(b)
    assert step(b).sentence == "claimed rank 1 of 2 in generation 0"
    assert step(b) == Step.acted("barrier passed: rank 1 of 2 in generation 0, dist-init 10.0.0.1:20000")
    assert step(b) == Step(Action.RUN)
    assert step(a) == Step.acted("barrier passed: rank 0 of 2 in generation 0, dist-init 10.0.0.1:20000")
    assert (a.generation, a.rank, b.rank, a.assignment.sessions()) == (0, 0, 1, {0: a.session, 1: b.session})
    assert step(a) == Step(Action.RUN)


def test_a_departure_ends_the_generation_and_the_generation_object_is_replaced_whole():
    store = FakeStore()
    a, b = membership(store, "a", FLEET_RANK0=1), membership(store, "bb")
    while step(a).action is not Action.WAIT:
        pass
    while step(b).action is not Action.RUN:
        pass
    while step(a).action is not Action.RUN:
        pass
    store.session_destroy(b.session)  # its heartbeat lapsed
    assert step(a) == Step(Action.ENDED, "peer bb (rank 1) left; ending generation 0", reread=True)
    assert a.gen.ending == Ending(0, "peer bb (rank 1) left; ending generation 0", own_failure=False)
    assert step(b) == Step(Action.ENDED, "generation 0 ended by a: peer bb (rank 1) left; ending generation 0",
                           reread=True)
    session = a.session
    assert a.leave() == "left generation 0 (session destroyed)" and session not in store.sessions
    assert a.leave() is None
    old = a.reset()
    assert old.ending.generation == 0 and a.gen == Generation()  # nothing of generation 0 is left over
    s = step(a)
    assert (s.action, s.sentence.startswith("joined generation 1 with session")) == (Action.ACTED, True)


def test_settings_that_differ_are_a_disagreement_that_starts_nothing():
    store = FakeStore()
    a, b = membership(store, "a", FLEET_RANK0=1, FLEET_TP_SIZE=4), membership(store, "bb", FLEET_TP_SIZE=2)
    while step(a).action is not Action.WAIT:  # rank 0, leader published
        pass
    while step(b).action is not Action.DISAGREE:
        pass
    problem = "bb (rank 1) differs in tp_size: 2 there, 4 here"
    assert step(a) == Step(Action.DISAGREE, f"config mismatch in generation 0: {problem}; starting nothing",
                           BARRIER_WAIT, problems=(problem,))
    assert a.assignment is None


def test_no_session_while_the_heartbeat_does_not_reach_consul():
    store = FakeStore()
    a = membership(store, "a")
    step(a)
    a.heartbeat.last_error = "pass_ttl: ReadTimeout"
    assert step(a) == Step(Action.WAIT, "waiting for the heartbeat to reach Consul before joining generation 0 "
                                        "(pass_ttl: ReadTimeout)", 0.5)
    assert a.session is None and store.sessions == set()


class Flaky(FakeStore):
    """Reads fail with `error` while it is set."""
    error: Exception | None = None

    def kv_get_tree(self, prefix, index=0, wait="10s"):
        if self.error is not None:
            raise self.error
        return super().kv_get_tree(prefix, index, wait)


def test_consul_errors_are_returned_steps_with_their_sentence_and_backoff():
    store = Flaky()
    a = membership(store, "a")
    store.error = ca.ConsulUnavailable("kv_get_tree: connection refused")
    s = step(a)
    assert (s.action, s.sentence, s.reread, s.warning) == (
        Action.UNAVAILABLE, "Consul unavailable (kv_get_tree: connection refused); retrying", True, True)
    assert 0.5 <= s.wait <= 0.75 and a.consul_errors == 1  # backoff(1, 0.5, 5.0): base plus jitter
    store.error = ca.ConsulDenied("kv_get_tree: 403 Permission denied")
    s = step(a)
    assert (s.action, s.sentence, s.warning) == (
        Action.UNAVAILABLE, "Consul refused a request (kv_get_tree: 403 Permission denied); retrying", False)
    assert a.consul_errors == 2
    store.error = ca.ConsulConflict("kv_cas sglang-fleet/c/groups/g/gen: index 0 is stale")
    assert step(a) == Step.acted("lost a race in Consul (kv_cas sglang-fleet/c/groups/g/gen: index 0 is stale); "
                                 "re-reading")
    store.error = None
    with capture_logs() as logs:
        assert step(a) == Step.acted("created generation 0 of group g")
    assert [e["event"] for e in logs] == ["Consul answers again after 2 failed attempt(s)"]
    assert a.consul_errors == 0
