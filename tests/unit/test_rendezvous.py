"""Rendezvous protocol decisions on snapshots, over an in-memory KV with Consul's CAS/lock/txn semantics."""
from __future__ import annotations

import itertools

import pytest

from sglang_fleet import consul_api as ca
from sglang_fleet import rendezvous as rdv
from sglang_fleet.config import load_config


class FakeStore:
    """Just enough of Consul's KV for the protocol: ModifyIndex, cas, acquire, sessions (delete), txn."""

    def __init__(self):
        self.index = itertools.count(10)
        self.kv: dict[str, ca.KVEntry] = {}
        self.sessions: set[str] = set()

    def _set(self, key, value, session=None):
        if isinstance(value, str):
            value = value.encode()
        self.kv[key] = ca.KVEntry(key, value, next(self.index), session)

    def kv_get_tree(self, prefix, index=0, wait="10s"):
        return next(self.index), [e for k, e in sorted(self.kv.items()) if k.startswith(prefix)]

    def kv_cas(self, key, value, index):
        cur = self.kv.get(key)
        if (cur.modify_index if cur else 0) != index:
            raise ca.ConsulConflict(key)
        self._set(key, value, cur.session if cur else None)

    def kv_acquire(self, key, value, session):
        cur = self.kv.get(key)
        if cur and cur.session and cur.session != session:
            raise ca.ConsulConflict(key)
        self._set(key, value, session)

    def session_create(self, name, checks, *, lock_delay=0, behavior="delete", ttl=None):
        sid = f"s{next(self.index)}"
        self.sessions.add(sid)
        return sid

    def session_destroy(self, sid):
        self.sessions.discard(sid)
        for k in [k for k, e in self.kv.items() if e.session == sid]:
            del self.kv[k]

    def txn(self, ops):
        import base64
        for op in ops:  # checks first, all or nothing
            kv = op["KV"]
            cur = self.kv.get(kv["Key"])
            if kv["Verb"] in ("check-index", "cas") and (cur.modify_index if cur else 0) != kv["Index"]:
                raise ca.ConsulConflict(f"index {kv['Key']}")
            if kv["Verb"] == "check-session" and (not cur or cur.session != kv["Session"]):
                raise ca.ConsulConflict(f"session {kv['Key']}")
            if kv["Verb"] == "lock" and cur and cur.session and cur.session != kv["Session"]:
                raise ca.ConsulConflict(f"lock {kv['Key']}")
        for op in ops:
            kv = op["KV"]
            value = base64.b64decode(kv.get("Value") or "")
            if kv["Verb"] in ("set", "cas"):
                self._set(kv["Key"], value)
            elif kv["Verb"] == "lock":
                self._set(kv["Key"], value, kv["Session"])
            elif kv["Verb"] == "delete-tree":
                for k in [k for k in self.kv if k.startswith(kv["Key"])]:
                    del self.kv[k]
        return []


def cfg(**env):
    base = {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "m", "FLEET_GROUP": "g", "FLEET_NNODES": "2",
            "FLEET_TP_SIZE": "2", "FLEET_CLUSTER": "c", "FLEET_ADVERTISE_ADDR": "10.0.0.1"}
    base.update({k: str(v) for k, v in env.items()})
    return load_config(base)


def member(store, name, **env):
    c = cfg(FLEET_NODE_NAME=name, **env)
    return rdv.Rendezvous(store, c, name, f"10.0.0.{len(name)}", version="v1")


def join(r):
    r.ensure_generation()
    view = r.read()
    sid = r.create_session("hb")
    return view, sid


def test_rank_order_fixed_preferred_and_hashed():
    assert rdv.rank_order(4, "x", fixed=2) == [2]
    assert rdv.rank_order(4, "x", prefer_zero=True) == [0, 1, 2, 3]
    order = rdv.rank_order(4, "node-a")
    assert sorted(order) == [0, 1, 2, 3] and order == rdv.rank_order(4, "node-a")  # stable
    assert order == [(order[0] + i) % 4 for i in range(4)]  # wraps


def test_eight_members_claim_distinct_ranks_and_never_two():
    store = FakeStore()
    members = [member(store, f"n{i}", FLEET_NNODES=8, FLEET_TP_SIZE=8) for i in range(8)]
    sessions = {}
    for r in members:
        view, sid = join(r)
        sessions[r.node] = sid
        rank, sentence = r.claim_rank(r.read(), sid)
        assert rank is not None, sentence
    view = members[0].read()
    assert sorted(view.members) == list(range(8))
    assert len({m.session for m in view.members.values()}) == 8
    # Claiming again with the same session returns the rank already held.
    again, sentence = members[3].claim_rank(view, sessions["n3"])
    assert view.members[again].node == "n3" and sentence.startswith("holding rank")
    # A ninth member finds nothing free and says so.
    ninth = member(store, "n9", FLEET_NNODES=8, FLEET_TP_SIZE=8)
    _, sid = join(ninth)
    rank, sentence = ninth.claim_rank(ninth.read(), sid)
    assert rank is None and sentence == "all 8 ranks of generation 0 are taken; waiting for the next generation"


def test_fixed_rank_held_waits_and_names_holder():
    store = FakeStore()
    a, b = member(store, "a", FLEET_NODE_RANK=1), member(store, "b", FLEET_NODE_RANK=1)
    _, sa = join(a)
    assert a.claim_rank(a.read(), sa)[0] == 1
    _, sb = join(b)
    rank, sentence = b.claim_rank(b.read(), sb)
    assert rank is None
    assert sentence == "rank 1 (FLEET_NODE_RANK) is held by a in generation 0; waiting for the next generation"


def test_leader_barrier_assignment_and_generation_end():
    store = FakeStore()
    a, b = member(store, "a", FLEET_RANK0=1), member(store, "bb")
    _, sa = join(a)
    _, sb = join(b)
    assert a.claim_rank(a.read(), sa)[0] == 0
    assert b.claim_rank(b.read(), sb)[0] == 1
    passed, why = rdv.barrier(a.read(), 0, 2)
    assert not passed and why == "waiting for rank 0 (a) to publish the leader of generation 0"
    with pytest.raises(ca.ConsulConflict):  # only the holder of rank 0 may publish
        b.publish_leader(b.read(), sb)
    a.publish_leader(a.read(), sa)
    view = b.read()
    assert rdv.barrier(view, 0, 2) == (True, "all 2 ranks present in generation 0")
    assignment = b.assignment(view, 1)
    assert assignment.dist_init_addr == f"{a.addr}:20000" and assignment.generation == 0
    assert rdv.departures(view, assignment) == []

    # rank 1's session dies: its key goes; that is a departure of the snapshot.
    store.session_destroy(sb)
    view = a.read()
    assert [m.node for m in rdv.departures(view, assignment)] == ["bb"]
    # Exactly one member wins the end of the generation.
    assert a.end_generation(view, "peer bb left", rdv.PEER_LEFT) is True
    assert b.end_generation(view, "late", rdv.PEER_LEFT) is False
    after = a.read()
    assert after.generation == 1 and after.members == {} and after.leader is None
    assert after.ended[0]["by"] == "a" and after.ended[0]["cause"] == rdv.PEER_LEFT
    # Publishing the leader of a generation that moved on fails.
    with pytest.raises(ca.ConsulConflict):
        a.publish_leader(view, sa)


def test_two_generations_later_only_the_last_tombstone_stays():
    store = FakeStore()
    a = member(store, "a")
    for _ in range(3):
        a.ensure_generation()
        assert a.end_generation(a.read(), "r", rdv.LOCAL_FAILURE)
    assert sorted(a.read().ended) == [2] and a.read().generation == 3


def test_fingerprint_ignores_per_host_flags_and_names_the_field():
    one = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--mem-fraction-static 0.8 --chunked-prefill-size 4096"), "v1")
    two = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--mem-fraction-static 0.7 --chunked-prefill-size 4096"), "v1")
    assert one == two
    store = FakeStore()
    a, b = member(store, "a", FLEET_TP_SIZE=4), member(store, "b", FLEET_TP_SIZE=2)
    for r in (a, b):
        _, sid = join(r)
        r.claim_rank(r.read(), sid)
    problems = rdv.fingerprint_mismatches(a.read(), a.fingerprint, "a")
    assert len(problems) == 1 and problems[0].startswith("b (rank ")
    assert problems[0].endswith("differs in tp_size: 2 there, 4 here")
    other = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--chunked-prefill-size 8192"), "v1")
    assert other["sglang_args"] != one["sglang_args"]


def test_parse_view_ignores_unheld_and_other_generation_keys():
    keys = rdv.Keys("c", "g")
    entries = [ca.KVEntry(keys.gen, b"2", 5), ca.KVEntry(keys.rank(2, 0), b'{"node":"a"}', 6, "s1"),
               ca.KVEntry(keys.rank(2, 1), b'{"node":"b"}', 7, None),  # released: not a member
               ca.KVEntry(keys.rank(1, 1), b'{"node":"old"}', 3, "s9"),
               ca.KVEntry(keys.ended(1), b'{"reason":"x","by":"a"}', 4)]
    view = rdv.parse_view(keys, 9, entries)
    assert view.generation == 2 and view.gen_index == 5
    assert list(view.members) == [0] and view.members[0].node == "a"
    assert view.ended == {1: {"reason": "x", "by": "a"}}
    assert rdv.barrier(view, 2, 2) == (False, "waiting for peers 1/2 in generation 2")
    assert rdv.barrier(view, 1, 2)[0] is False
    assert rdv.parse_view(keys, 1, []).generation is None
