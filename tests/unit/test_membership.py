"""membership.Membership: one step at a time over tests/fake_consul.py, every step an explicit action with its
sentence and its wait. The node loop around it is tested in test_node_loop.py, the real thing in
tests/integration/test_node.py."""
from __future__ import annotations

import threading
import time

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
    assert a.gen.ending == Ending(0, "peer bb (rank 1) left; ending generation 0", own_failure=False,
                                  cause="peer_left")
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


# ---- re-attach after a Consul outage (docs/protocol.md "Re-attach after a Consul outage") ---------------
class Engines:
    """Whether each member's engine is still running and healthy (what node.Node._engine_ok reports)."""

    def __init__(self):
        self.failed: set[str] = set()

    def of(self, name):
        return lambda: name not in self.failed


def serving_pair(store, engines, window=15.0):
    """A 2-node group past its barrier (the state of a serving group), re-attach on."""
    a, b = (Membership(rdv.Rendezvous(store, cfg(FLEET_NODE_NAME=n, **env), n, f"10.0.0.{i}", version="v1"), Beat(),
                       reattach_window=window, engine_ok=engines.of(n))
            for i, (n, env) in enumerate((("a", {"FLEET_RANK0": "1"}), ("bb", {}))))
    for m in (a, b, a):
        while step(m).action not in (Action.RUN, Action.WAIT):
            pass
    assert (step(a).action, step(b).action) == (Action.RUN, Action.RUN)
    return a, b


def consul_outage(store, *members, lose_everything=False):
    """Consul did not answer each member once, then came back without their sessions (and, with
    `lose_everything`, without any key: a -dev agent restarted)."""
    store.error = ca.ConsulUnavailable("kv_get_tree: connection refused")
    for m in members:
        assert step(m).action is Action.UNAVAILABLE
    store.error = None
    for s in list(store.sessions):
        store.session_destroy(s)
    if lose_everything:
        store.kv.clear()


def until(m, action=Action.RUN, limit=20):
    """Steps `m` until `action` (or WAIT, when asked for something else); the sentences on the way."""
    said = []
    for _ in range(limit):
        s = step(m)
        said.append(s.sentence)
        if s.action is action or (s.action is Action.WAIT and action is not Action.WAIT):
            return s, said
    raise AssertionError(f"no {action} in {limit} steps: {said}")


def run_both(a, b):
    for _ in range(6):
        sa, sb = step(a), step(b)
        if sa.action is sb.action is Action.RUN:
            return
    raise AssertionError((sa, sb))


def test_both_members_reattach_to_the_same_generation_after_consul_lost_their_sessions(monkeypatch):
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    before = a.assignment
    consul_outage(store, a, b)
    s, said = until(a, Action.WAIT)
    assert said[0] == ("Consul lost the rank keys of a (rank 0), bb (rank 1) of generation 0; the engine is "
                       "healthy: re-attaching (FLEET_REATTACH_WINDOW=15 s)")
    assert "re-attaching: took rank 0 of generation 0 back" in said
    assert s.sentence.startswith("re-attaching to generation 0: waiting for bb (rank 1)")
    run_both(a, b)
    assert store.kv["sglang-fleet/c/groups/g/gen"].value == b"0"  # no new generation
    assert (a.generation, a.rank, b.rank) == (0, 0, 1)
    assert a.assignment.sessions() == {0: a.session, 1: b.session} != before.sessions()
    assert [m.node for m in a.assignment.members] == [m.node for m in before.members]
    # Re-attached members are ordinary members again: once the outage is a window old, a departure ends
    # the generation at once.
    later = time.monotonic() + 16
    monkeypatch.setattr(time, "monotonic", lambda: later)
    store.session_destroy(b.session)
    assert step(a) == Step(Action.ENDED, "peer bb (rank 1) left; ending generation 0", reread=True)


def test_a_peer_whose_session_dies_after_this_member_reattached_is_adopted_not_a_departure():
    """Consul invalidates the sessions one after the other: a finished first while b's old session still
    held b's key; b's key then goes and comes back under a new session."""
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    old_b = b.session
    store.error = ca.ConsulUnavailable("kv_get_tree: connection refused")
    assert (step(a).action, step(b).action) == (Action.UNAVAILABLE, Action.UNAVAILABLE)
    store.error = None
    store.session_destroy(a.session)  # a's session first
    s, said = until(a, Action.RUN)
    assert said[-2].startswith("re-attached to generation 0: all 2 members back after")
    store.session_destroy(old_b)  # then b's
    s, said = until(b, Action.RUN)
    assert "re-attaching: took rank 1 of generation 0 back" in said
    assert step(a) == Step.acted("bb re-attached to generation 0 with a new session")
    assert step(a) == Step(Action.RUN) and a.assignment.sessions()[1] == b.session != old_b


def test_rank_0_recreates_the_generation_when_consul_lost_everything():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    consul_outage(store, a, b, lose_everything=True)
    s, said = until(b, Action.WAIT)
    assert s.sentence == "re-attaching: waiting for rank 0 (a) to re-create generation 0"
    s, said = until(a, Action.WAIT)
    assert "Consul lost the group's keys: re-created generation 0 to re-attach to it" in said
    assert store.kv["sglang-fleet/c/groups/g/g0/recreated"].json()["by"] == "a"
    run_both(a, b)
    assert (a.generation, b.generation, a.gen.ending, b.gen.ending) == (0, 0, None, None)


def test_a_member_that_died_during_the_outage_ends_the_generation_when_the_window_is_over(monkeypatch):
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines, window=5.0)
    consul_outage(store, a, b)  # b never comes back
    s, _ = until(a, Action.WAIT)
    assert s.sentence.startswith("re-attaching to generation 0: waiting for bb (rank 1)")
    later = time.monotonic() + 6
    monkeypatch.setattr(time, "monotonic", lambda: later)
    s = step(a)
    assert (s.action, s.sentence) == (Action.ENDED, "bb (rank 1) did not re-attach to generation 0 within "
                                                    "FLEET_REATTACH_WINDOW=5 s; ending it")
    assert store.kv["sglang-fleet/c/groups/g/gen"].value == b"1"


def test_a_member_whose_engine_failed_does_not_reattach_and_ends_the_generation():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    consul_outage(store, a, b)
    engines.failed.add("bb")  # its NCCL peer died, or it did
    s = step(b)
    assert (s.action, s.sentence) == (Action.ENDED, "my rank key in generation 0 is gone (heartbeat missed?); "
                                                    "rejoining")
    s, said = until(a, Action.ENDED)
    assert s.sentence == ("generation 0 ended by bb: my rank key in generation 0 is gone (heartbeat missed?); "
                          "rejoining")


def test_a_replacement_that_took_a_rank_during_the_outage_ends_the_generation():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    consul_outage(store, a, b)
    c = membership(store, "c")  # started during the outage; Consul answers it first
    s, said = until(c, Action.WAIT)
    assert any(x and x.startswith("claimed rank 1 of 2 in generation 0") for x in said)
    s, said = until(b, Action.ENDED)
    assert s.sentence == "my rank key in generation 0 is gone (heartbeat missed?); rejoining"
    s, said = until(a, Action.ENDED)
    assert s.action is Action.ENDED and a.gen.ending.generation == 0


def test_two_nodes_claiming_one_rank_the_cas_decides_and_the_loser_ends_the_generation():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    consul_outage(store, a, b)
    until(b, Action.WAIT)  # b re-attached first: rank 1 is its own again
    c = membership(store, "c", FLEET_NODE_RANK=1)  # a second claimant of rank 1
    s, _ = until(c, Action.WAIT)
    assert s.sentence == "rank 1 (FLEET_NODE_RANK) is held by bb in generation 0; waiting for the next generation"
    run_both(a, b)  # the holder keeps it, the group continues


def test_without_an_outage_a_lost_key_is_a_departure_as_before():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines)
    store.session_destroy(b.session)  # its heartbeat lapsed; Consul itself never failed
    assert step(a) == Step(Action.ENDED, "peer bb (rank 1) left; ending generation 0", reread=True)


def test_window_zero_is_the_old_behaviour():
    store, engines = Flaky(), Engines()
    a, b = serving_pair(store, engines, window=0.0)
    consul_outage(store, a, b)
    assert step(a).sentence == "my rank key in generation 0 is gone (heartbeat missed?); rejoining"
