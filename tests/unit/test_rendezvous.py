"""Rendezvous protocol decisions on snapshots; its writes over tests/fake_consul.py (rendezvous_contract.py: the
same assertions run against a real Consul in tests/integration/test_rendezvous_consul.py)."""
from __future__ import annotations

import pytest

from fake_consul import FakeStore
from rendezvous_contract import *  # noqa: F401,F403 - the contract tests, run here over the fake
from rendezvous_contract import fleet_config as cfg
from sglang_fleet import consul_api as ca
from sglang_fleet import rendezvous as rdv
from sglang_fleet.contract import Keys


@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def cluster():
    return "c"


@pytest.fixture
def check_id():
    return "hb"  # the fake binds sessions to nothing


def test_rank_order_fixed_preferred_and_hashed():
    assert rdv.rank_order(4, "x", fixed=2) == [2]
    assert rdv.rank_order(4, "x", prefer_zero=True) == [0, 1, 2, 3]
    order = rdv.rank_order(4, "node-a")
    assert sorted(order) == [0, 1, 2, 3] and order == rdv.rank_order(4, "node-a")  # stable
    assert order == [(order[0] + i) % 4 for i in range(4)]  # wraps


def test_fingerprint_ignores_per_host_flags():
    one = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--mem-fraction-static 0.8 --chunked-prefill-size 4096"), "v1")
    two = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--mem-fraction-static 0.7 --chunked-prefill-size 4096"), "v1")
    assert one == two and one["sglang_args"] == [["chunked-prefill-size", "4096"]]
    other = rdv.fingerprint(cfg(FLEET_SGLANG_ARGS="--chunked-prefill-size 8192"), "v1")
    assert other["sglang_args"] == [["chunked-prefill-size", "8192"]]


def test_parse_view_ignores_unheld_and_other_generation_keys():
    keys = Keys("c", "g")
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
