"""consul_api against a real Consul: error conversion at the boundary and the KV/session/txn helpers."""
from __future__ import annotations

import pytest

from sglang_fleet import consul_api as ca
from sglang_fleet.config import ConsulSettings

pytestmark = pytest.mark.integration


def test_kv_cas_lock_txn_and_sessions(consul_api, cluster_name):
    k = f"test/{cluster_name}"
    consul_api.kv_cas(f"{k}/gen", "0", 0)
    with pytest.raises(ca.ConsulConflict):
        consul_api.kv_cas(f"{k}/gen", "0", 0)
    _, gen = consul_api.kv_get(f"{k}/gen")
    assert gen.text == "0" and gen.modify_index > 0

    s1 = consul_api.session_create("t1", ["serfHealth"])
    s2 = consul_api.session_create("t2", ["serfHealth"])
    consul_api.kv_acquire(f"{k}/g0/ranks/0", ca.dumps({"node": "a"}), s1)
    consul_api.kv_acquire(f"{k}/g0/ranks/0", ca.dumps({"node": "a"}), s1)  # the holder again: fine
    with pytest.raises(ca.ConsulConflict):
        consul_api.kv_acquire(f"{k}/g0/ranks/0", "b", s2)

    consul_api.txn([ca.txn_check_index(f"{k}/gen", gen.modify_index),
                    ca.txn_check_session(f"{k}/g0/ranks/0", s1), ca.txn_lock(f"{k}/g0/leader", "L", s1)])
    with pytest.raises(ca.ConsulConflict, match="index"):
        consul_api.txn([ca.txn_check_index(f"{k}/gen", gen.modify_index + 1000), ca.txn_set(f"{k}/x", "y")])

    idx, tree = consul_api.kv_get_tree(f"{k}/")
    assert {e.key.rsplit("/", 1)[-1] for e in tree} == {"gen", "0", "leader"}
    # A blocking query with nothing changing under its prefix returns after its wait with the same index
    # (the highest ModifyIndex under the prefix: the leader key, written last) and the same keys.
    idx2, again = consul_api.kv_get_tree(f"{k}/g0/", index=idx, wait="1s")
    assert idx2 == idx and [e.key for e in again] == [f"{k}/g0/leader", f"{k}/g0/ranks/0"]

    consul_api.session_destroy(s1)  # behavior=delete: the keys it held go with it
    assert consul_api.session_info(s1) is None
    _, tree = consul_api.kv_get_tree(f"{k}/")
    assert [e.key for e in tree] == [f"{k}/gen"]
    # A write with an invalidated session is Consul's 500 "invalid session": not an outage to retry.
    with pytest.raises(ca.ConsulNotFound, match="invalid session"):
        consul_api.kv_acquire(f"{k}/g0/ranks/1", "a", s1)
    consul_api.session_destroy(s2)
    consul_api.kv_delete_tree(f"{k}/")
    assert consul_api.kv_get_tree(f"{k}/")[1] == []


def test_services_checks_and_health(consul_api, cluster_name):
    sid = f"svc-{cluster_name}"
    consul_api.register_service("fleet-test-svc", sid, address="127.0.0.9", port=1234, tags=["x"],
                                meta={"n": 1}, checks=[{"CheckID": sid, "TTL": "3s", "Status": "passing"}])
    _, entries = consul_api.health_service("fleet-test-svc", tag="x")
    assert [e["Service"]["ID"] for e in entries] == [sid]
    assert entries[0]["Service"]["Meta"] == {"n": "1"}
    consul_api.pass_ttl(sid)
    with pytest.raises(ca.ConsulNotFound):
        consul_api.pass_ttl(f"{sid}-unknown")
    consul_api.deregister_service(sid)
    consul_api.deregister_service(sid)  # idempotent
    assert consul_api.health_service("fleet-test-svc", passing=False)[1] == []


def test_unreachable_consul_is_unavailable():
    api = ca.ConsulAPI(ConsulSettings(http_addr="127.0.0.1:1"), timeout=1)
    for call in (api.leader, lambda: api.kv_get("x"), lambda: api.health_service("x", index=5)):
        with pytest.raises(ca.ConsulUnavailable):
            call()


def test_index_goes_backwards_resets_to_zero():
    assert ca.next_index(100, "50") == 0
    assert ca.next_index(100, "100") == 100
    assert ca.next_index(0, "0") == 1
    assert ca.next_index(5, None) == 0


def test_restart_is_unavailable_then_fine(fresh_consul_agent):
    api = fresh_consul_agent.api()
    api.kv_put("x/k", "v")
    idx, tree = api.kv_get_tree("x/")
    assert [e.key for e in tree] == ["x/k"]
    fresh_consul_agent.stop()
    with pytest.raises(ca.ConsulUnavailable):
        api.kv_get_tree("x/", index=idx, wait="1s")
    fresh_consul_agent.start()
    # The same client works again; the dev agent came back empty, under an index of its own: the next
    # blocking query starts over at 0 when that index is below the one we had (consul_api.next_index).
    idx2, tree = api.kv_get_tree("x/", index=idx, wait="1s")
    now, _ = api.kv_get_tree("x/")
    assert tree == [] and idx2 == (0 if now < idx else now)
