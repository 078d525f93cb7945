"""The rendezvous protocol's writes and reads, asserted the same way against tests/fake_consul.py's
FakeStore (tests/unit/test_rendezvous.py) and against a real Consul agent
(tests/integration/test_rendezvous_consul.py): what the unit tests of the node loop assume of the fake is
what Consul does.

A module that collects these imports them (`from rendezvous_contract import *`) and provides three
fixtures: `store` (a rendezvous.Store), `cluster` (a cluster name no other test uses on that store) and
`check_id` (a passing check that sessions may be bound to)."""
from __future__ import annotations

import pytest

from sglang_fleet import consul_api as ca
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import load_config
from sglang_fleet.contract import Keys


def fleet_config(**env):
    """A two-node sim group `g` of cluster `c` (FLEET_* overrides as keyword arguments)."""
    base = {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "m", "FLEET_GROUP": "g", "FLEET_NNODES": "2",
            "FLEET_TP_SIZE": "2", "FLEET_CLUSTER": "c", "FLEET_ADVERTISE_ADDR": "10.0.0.1"}
    base.update({k: str(v) for k, v in env.items()})
    return load_config(base)


class Group:
    """Members of one group on the store under test."""

    def __init__(self, store, cluster: str, check_id: str):
        self.store, self.cluster, self.check_id = store, cluster, check_id
        self.keys = Keys(cluster, "g")

    def member(self, name: str, **env) -> rdv.Rendezvous:
        c = fleet_config(FLEET_NODE_NAME=name, FLEET_CLUSTER=self.cluster, **env)
        return rdv.Rendezvous(self.store, c, name, f"10.0.0.{len(name)}", version="v1")

    def join(self, r: rdv.Rendezvous) -> str:
        """Creates K/gen if needed and a session; returns the session."""
        r.ensure_generation()
        return r.create_session(self.check_id)

    def ranked(self, r: rdv.Rendezvous) -> tuple[str, int]:
        session = self.join(r)
        rank, sentence = r.claim_rank(r.read(), session)
        assert rank is not None, sentence
        return session, rank


@pytest.fixture
def group(store, cluster, check_id) -> Group:
    return Group(store, cluster, check_id)


def test_the_generation_key_is_created_once_as_zero(group):
    a, b = group.member("a"), group.member("bb")
    a.ensure_generation()
    first = a.read()
    b.ensure_generation()  # lost the race: fine, and nothing changed
    again = b.read()
    assert (first.generation, again.generation) == (0, 0)
    assert again.gen_index == first.gen_index
    with pytest.raises(ca.ConsulConflict):
        group.store.kv_cas(group.keys.gen, "5", 0)  # cas=0: only while absent


def test_eight_members_claim_distinct_ranks_and_never_two(group):
    members = [group.member(f"n{i}", FLEET_NNODES=8, FLEET_TP_SIZE=8) for i in range(8)]
    sessions = {r.node: group.ranked(r)[0] for r in members}
    view = members[0].read()
    assert sorted(view.members) == list(range(8))
    assert {m.node: m.session for m in view.members.values()} == sessions
    # Claiming again with the same session returns the rank already held.
    again, sentence = members[3].claim_rank(view, sessions["n3"])
    assert view.members[again].node == "n3" and sentence == f"holding rank {again} of 8 in generation 0"
    # A ninth member finds nothing free and says so.
    ninth = group.member("n9", FLEET_NNODES=8, FLEET_TP_SIZE=8)
    sid = group.join(ninth)
    assert ninth.claim_rank(ninth.read(), sid) == (
        None, "all 8 ranks of generation 0 are taken; waiting for the next generation")


def test_fixed_rank_held_waits_and_names_holder(group):
    a, b = group.member("a", FLEET_NODE_RANK=1), group.member("b", FLEET_NODE_RANK=1)
    assert group.ranked(a)[1] == 1
    sb = group.join(b)
    assert b.claim_rank(b.read(), sb) == (
        None, "rank 1 (FLEET_NODE_RANK) is held by a in generation 0; waiting for the next generation")


def test_leader_barrier_assignment_and_generation_end(group):
    a, b = group.member("a", FLEET_RANK0=1), group.member("bb")
    sa, ra = group.ranked(a)
    sb, rb = group.ranked(b)
    assert (ra, rb) == (0, 1)
    assert rdv.barrier(a.read(), 0, 2) == (False, "waiting for rank 0 (a) to publish the leader of generation 0")
    with pytest.raises(ca.ConsulConflict):  # only the holder of rank 0 may publish
        b.publish_leader(b.read(), sb)
    assert a.publish_leader(a.read(), sa) == f"published leader {a.addr}:20000 for generation 0"
    view = b.read()
    assert dict(view.leader) == {"dist_init_addr": f"{a.addr}:20000", "url": f"http://{a.addr}:30000",
                                 "bootstrap_port": None}
    assert rdv.barrier(view, 0, 2) == (True, "all 2 ranks present in generation 0")
    assignment = b.assignment(view, 1)
    assert (assignment.rank, assignment.nnodes, assignment.dist_init_addr, assignment.generation) == (
        1, 2, f"{a.addr}:20000", 0)
    assert assignment.sessions() == {0: sa, 1: sb}
    assert rdv.departures(view, assignment) == []

    # rank 1's session dies: its key goes with it (behavior=delete); that is a departure of the snapshot.
    group.store.session_destroy(sb)
    view = a.read()
    assert sorted(view.members) == [0]
    assert [m.node for m in rdv.departures(view, assignment)] == ["bb"]
    # Exactly one member wins the end of the generation.
    assert a.end_generation(view, "peer bb left", rdv.PEER_LEFT) is True
    assert b.end_generation(view, "late", rdv.PEER_LEFT) is False
    after = a.read()
    assert (after.generation, dict(after.members), after.leader) == (1, {}, None)
    assert {k: after.ended[0][k] for k in ("reason", "by", "cause")} == {
        "reason": "peer bb left", "by": "a", "cause": rdv.PEER_LEFT}
    # Publishing the leader of a generation that moved on fails.
    with pytest.raises(ca.ConsulConflict):
        a.publish_leader(view, sa)


def test_two_generations_later_only_the_last_tombstone_stays(group):
    a = group.member("a")
    a.ensure_generation()
    for _ in range(3):
        assert a.end_generation(a.read(), "r", rdv.LOCAL_FAILURE)
    view = a.read()
    assert sorted(view.ended) == [2] and view.generation == 3


def test_fingerprint_mismatch_names_node_rank_and_field(group):
    a, b = group.member("a", FLEET_TP_SIZE=4, FLEET_RANK0=1), group.member("b", FLEET_TP_SIZE=2)
    group.ranked(a)
    group.ranked(b)
    assert rdv.fingerprint_mismatches(a.read(), a.fingerprint, "a") == [
        "b (rank 1) differs in tp_size: 2 there, 4 here"]
    assert rdv.fingerprint_mismatches(a.read(), b.fingerprint, "b") == [
        "a (rank 0) differs in tp_size: 4 there, 2 here"]


def test_drain_keys_are_written_only_in_the_current_generation(group):
    a, b = group.member("a", FLEET_RANK0=1), group.member("bb")
    group.ranked(a)
    group.ranked(b)
    view = b.read()
    assert b.request_drain(view, 1) is True
    view = a.read()
    assert {k: view.draining[k] for k in ("by", "rank")} == {"by": "bb", "rank": 1} and view.drained is None
    assert a.confirm_drained(view, "drained: no requests in flight") is True
    view = b.read()
    assert {k: view.drained[k] for k in ("by", "how")} == {"by": "a", "how": "drained: no requests in flight"}
    assert a.end_generation(view, "stopping", rdv.SHUTDOWN) is True
    assert b.request_drain(view, 1) is False and a.confirm_drained(view, "late") is False
    after = a.read()
    assert (after.generation, after.draining, after.drained) == (1, None, None)


def test_a_destroyed_session_cannot_claim(group):
    a = group.member("a")
    sa = group.join(a)
    group.store.session_destroy(sa)
    with pytest.raises(ca.ConsulNotFound, match="invalid session"):
        a.claim_rank(a.read(), sa)
    assert a.read().members == {}


def test_a_blocking_read_without_change_returns_the_same_index_and_keys(group):
    a = group.member("a")
    group.ranked(a)
    view = a.read()
    again = a.read(index=view.index, wait="1s")
    assert again.index == view.index
    assert (again.generation, again.gen_index, dict(again.members)) == (view.generation, view.gen_index,
                                                                        dict(view.members))


def test_reattach_takes_back_only_an_absent_key_in_the_same_generation(group):
    a, b = group.member("a", FLEET_RANK0=1), group.member("bb")
    sa, _ = group.ranked(a)
    sb, _ = group.ranked(b)
    me = a.read().members[1]
    group.store.session_destroy(sb)  # the outage took bb's session and its key
    new = b.create_session(group.check_id)
    view = b.read()
    b.reclaim_rank(view, me, new)
    back = b.read().members[1]
    assert (back.session, back.node, back.pid, back.started) == (new, "bb", me.pid, me.started)
    with pytest.raises(ca.ConsulConflict):  # held (here by itself): check-not-exists fails
        b.reclaim_rank(b.read(), me, new)
    group.store.session_destroy(new)
    c = group.member("c", FLEET_NODE_RANK=1)  # a replacement is first
    assert group.ranked(c)[1] == 1
    late = b.create_session(group.check_id)
    with pytest.raises(ca.ConsulConflict):
        b.reclaim_rank(b.read(), me, late)
    assert b.read().members[1].node == "c"
    group.store.session_destroy(late)
    with pytest.raises(ca.ConsulConflict):  # a dead session takes nothing (Consul: 409, rolled back)
        a.reclaim_rank(a.read(), a.read().members[0], late)


def test_rank_0_recreates_a_lost_generation_key_only_where_it_is_absent(group):
    a = group.member("a")
    assert a.recreate_generation(3) == "Consul lost the group's keys: re-created generation 3 to re-attach to it"
    view = a.read()
    assert view.generation == 3
    _, entries = group.store.kv_get_tree(group.keys.recreated(3))
    assert {k: entries[0].json()[k] for k in ("by", "generation")} == {"by": "a", "generation": 3}
    with pytest.raises(ca.ConsulConflict):
        group.member("bb").recreate_generation(3)


__all__ = [name for name in dict(globals()) if name.startswith("test_")] + ["group"]
