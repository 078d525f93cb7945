"""router_state.py, the router's pure decisions: Consul entries -> desired workers, reconcile, mode choice."""
from __future__ import annotations

from sglang_fleet.router_state import DesiredWorker, OutageHold, choose_mode, desired_from_services, reconcile
from sglang_fleet.smg_client import RouterWorker

CLUSTER = "c1"


def entry(group, role, port, *, addr="10.0.0.1", gen="3", bootstrap=None, cluster=CLUSTER, node_addr="10.9.9.9"):
    meta = {"cluster": cluster, "group": group, "generation": gen, "role": role}
    if bootstrap is not None:
        meta["bootstrap_port"] = str(bootstrap)
    return {"Node": {"Node": "n", "Address": node_addr},
            "Service": {"ID": f"sglang-{cluster}-{group}", "Service": "sglang", "Tags": [role, f"cluster:{cluster}"],
                        "Address": addr, "Port": port, "Meta": meta},
            "Checks": []}


def want(url, wtype="decode", bport=None, group="g", gen="1"):
    return DesiredWorker(url=url, worker_type=wtype, bootstrap_port=bport, cluster=CLUSTER, group=group,
                         generation=gen, service_id=f"sglang-{CLUSTER}-{group}")


def have(d: DesiredWorker, wid="01a2-0000", status="ready", **over):
    labels = d.labels()
    labels.update(over.pop("labels", {}))
    fields = dict(url=d.url, worker_type=d.worker_type,
                  bootstrap_port=d.bootstrap_port if d.worker_type == "prefill" else None)
    fields.update(over)
    return RouterWorker(id=wid, labels=labels, status=status, **fields)


def hand_added(url, wtype="regular"):
    return RouterWorker(id="01a2-hand", url=url, worker_type=wtype, labels={"served_model_name": "m"})


# ---- Consul entries -> desired -----------------------------------------------------------------------
def test_desired_from_services_reads_role_address_and_bootstrap_port():
    workers, problems = desired_from_services(
        [entry("p", "prefill", 30000, bootstrap=8998), entry("d", "decode", 30001, addr="")], CLUSTER)
    assert problems == []
    assert [(w.url, w.worker_type, w.bootstrap_port, w.group, w.generation) for w in workers] == [
        ("http://10.0.0.1:30000", "prefill", 8998, "p", "3"),
        ("http://10.9.9.9:30001", "decode", None, "d", "3"),  # no service address: the node's
    ]
    assert workers[0].body() == {
        "url": "http://10.0.0.1:30000", "worker_type": "prefill", "bootstrap_port": 8998,
        "labels": {"managed-by": "sglang-fleet", "sglang-fleet/cluster": CLUSTER, "sglang-fleet/group": "p",
                   "sglang-fleet/generation": "3", "sglang-fleet/service-id": "sglang-c1-p"}}
    assert "bootstrap_port" not in workers[1].body()


def test_desired_role_from_tags_when_meta_lacks_it_and_ipv6_is_bracketed():
    e = entry("r", "regular", 30000, addr="fd00::5")
    del e["Service"]["Meta"]["role"]
    workers, _ = desired_from_services([e], CLUSTER)
    assert workers[0].worker_type == "regular" and workers[0].url == "http://[fd00::5]:30000"


def test_unusable_entries_are_reported_not_routed():
    bad_role = entry("x", "router", 1)
    bad_port = entry("y", "prefill", 2, bootstrap="abc")
    dup = entry("z", "decode", 3)
    dup2 = entry("z2", "decode", 3)
    workers, problems = desired_from_services([bad_role, bad_port, dup, dup2], CLUSTER)
    assert [w.group for w in workers] == ["z"]
    assert len(problems) == 3
    assert any("sglang-c1-x" in p and "role" in p for p in problems)
    assert any("bootstrap_port='abc'" in p for p in problems)
    assert any("also registered" in p for p in problems)


# ---- reconcile ------------------------------------------------------------------------------------------
def test_empty_router_gets_everything_added():
    desired = [want("http://a:1", "prefill", 9), want("http://b:2", "decode")]
    add, remove = reconcile(desired, [], CLUSTER)
    assert add == desired and remove == []


def test_in_sync_is_a_no_op():
    desired = [want("http://a:1", "prefill", 9), want("http://b:2", "decode")]
    actual = [have(desired[0], "1"), have(desired[1], "2")]
    assert reconcile(desired, actual, CLUSTER) == ([], [])


def test_unmanaged_workers_are_never_removed():
    actual = [hand_added("http://hand:1"), hand_added("http://hand:2", "decode")]
    assert reconcile([], actual, CLUSTER) == ([], [])
    assert reconcile([want("http://a:1")], actual, CLUSTER) == ([want("http://a:1")], [])


def test_workers_of_another_cluster_are_not_ours():
    other = have(want("http://o:1"), labels={"sglang-fleet/cluster": "other"})
    assert reconcile([], [other], CLUSTER) == ([], [])


def test_a_desired_url_held_by_a_hand_added_worker_is_left_alone():
    d = want("http://a:1", "decode")
    assert reconcile([d], [hand_added("http://a:1", "decode")], CLUSTER) == ([], [])


def test_empty_desired_removes_all_managed_and_only_managed():
    d1, d2 = want("http://a:1", "prefill", 9), want("http://b:2", "decode")
    actual = [have(d1, "1"), have(d2, "2"), hand_added("http://hand:3")]
    add, remove = reconcile([], actual, CLUSTER)
    assert add == [] and [w.id for w in remove] == ["1", "2"]


def test_gone_group_is_removed_new_group_added():
    d1, d2, d3 = want("http://a:1"), want("http://b:2"), want("http://c:3")
    add, remove = reconcile([d1, d3], [have(d1, "1"), have(d2, "2")], CLUSTER)
    assert add == [d3] and [w.id for w in remove] == ["2"]


def test_changed_type_or_bootstrap_port_or_generation_is_replaced():
    old = want("http://a:1", "prefill", 9, gen="1")
    for new in (want("http://a:1", "decode", gen="1"), want("http://a:1", "prefill", 10, gen="1"),
                want("http://a:1", "prefill", 9, gen="2"), want("http://a:1", "prefill", 9, group="h", gen="1")):
        add, remove = reconcile([new], [have(old, "1")], CLUSTER)
        assert add == [new] and [w.id for w in remove] == ["1"], new


def test_draining_worker_is_not_removed_again_nor_re_added_yet():
    d = want("http://a:1")
    assert reconcile([], [have(d, "1", status="draining")], CLUSTER) == ([], [])
    assert reconcile([d], [have(d, "1", status="draining")], CLUSTER) == ([], [])


def test_unhealthy_but_listed_worker_is_kept_consul_decides():
    d = want("http://a:1")
    assert reconcile([d], [have(d, "1", is_healthy=False)], CLUSTER) == ([], [])


# ---- mode ---------------------------------------------------------------------------------------------
def test_choose_mode():
    assert choose_mode("pd", {"regular"}, None) == "pd"
    assert choose_mode("regular", {"prefill"}, "pd") == "regular"
    assert choose_mode("auto", set(), None) == "pd"
    assert choose_mode("auto", set(), "regular") == "regular"  # nothing passing: keep what runs
    assert choose_mode("auto", {"regular"}, "pd") == "regular"
    assert choose_mode("auto", {"prefill", "decode"}, "regular") == "pd"
    assert choose_mode("auto", {"regular", "decode"}, None) == "pd"


def test_worker_body_carries_the_engines_key_only_when_there_is_one():
    d = DesiredWorker(url="http://10.0.0.1:30000", worker_type="regular", cluster="c", group="g", generation="1")
    assert "api_key" not in d.body()
    assert d.body("ek")["api_key"] == "ek"


# ---- the hold across a Consul outage ------------------------------------------------------------------------
def test_outage_hold_keeps_routed_groups_until_consul_lists_them_again():
    a, b = want("http://a:1", group="a"), want("http://b:2", group="b")
    hold = OutageHold(30.0)
    hold.consul_lost([a, b])
    # Still unreachable: whatever the last answer says, both stay.
    assert hold.desired([], now=0.0) == ([a, b], "")
    hold.consul_back(now=100.0)
    # Back, but empty (a -dev agent) or partial (rank 0 of b re-registering): nothing is withdrawn.
    assert hold.desired([], now=101.0) == ([a, b], "")
    assert hold.desired([a], now=110.0) == ([a, b], "")
    assert hold.active
    # b passes again, in another generation: it is Consul's version that counts; the hold ends.
    b2 = want("http://b:2", group="b", gen="2")
    assert hold.desired([a, b2], now=111.0) == ([a, b2], "every group routed before the Consul outage passes "
                                                         "again; hold ended")
    assert not hold.active
    assert hold.desired([a], now=112.0) == ([a], "")  # afterwards Consul rules: b withdrawn at once


def test_outage_hold_ends_after_its_window_and_withdraws_what_never_came_back():
    a, b = want("http://a:1", group="a"), want("http://b:2", group="b")
    hold = OutageHold(30.0)
    hold.consul_lost([a, b])
    hold.consul_back(now=100.0)
    assert hold.desired([a], now=129.9) == ([a, b], "")
    desired, sentence = hold.desired([a], now=130.0)
    assert desired == [a] and "http://b:2 still not passing 30 s after Consul answered again" in sentence


def test_outage_hold_second_outage_keeps_the_first_list_and_zero_disables_it():
    a, b = want("http://a:1", group="a"), want("http://b:2", group="b")
    hold = OutageHold(30.0)
    hold.consul_lost([a, b])
    hold.consul_back(now=100.0)
    hold.consul_lost([a])  # the incomplete list applied meanwhile is not what was routed before
    hold.consul_back(now=200.0)
    assert hold.desired([], now=229.0) == ([a, b], "")
    off = OutageHold(0)
    off.consul_lost([a, b])
    off.consul_back(now=1.0)
    assert off.desired([], now=1.0) == ([], "") and not off.active


def test_outage_hold_lets_go_of_the_old_url_of_a_group_back_at_a_new_one():
    """A replacement became rank 0 during the outage: the group passes again at its address; the old one,
    a node that left the group, is not routed any more."""
    a, b = want("http://a:1", group="a"), want("http://b:2", group="b")
    hold = OutageHold(30.0)
    hold.consul_lost([a, b])
    hold.consul_back(now=100.0)
    a_moved = want("http://a-new:1", group="a", gen="2")
    assert hold.desired([a_moved], now=101.0) == ([a_moved, b], "")
    assert hold.desired([a_moved, b], now=102.0) == ([a_moved, b], "every group routed before the Consul outage "
                                                                   "passes again; hold ended")
