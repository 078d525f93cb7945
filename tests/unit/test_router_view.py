"""`sglang-fleet status`'s router part: differences between smg's workers and Consul's passing groups."""
from __future__ import annotations

from sglang_fleet.router_state import DesiredWorker
from sglang_fleet.router_view import _compare, format_router_view
from sglang_fleet.smg_client import RouterWorker

C = "c1"


def d(url, wtype="decode", group="g"):
    return DesiredWorker(url=url, worker_type=wtype, cluster=C, group=group, generation="1", service_id="s")


def w(desired, **over):
    fields = dict(id="01", url=desired.url, worker_type=desired.worker_type, labels=desired.labels())
    fields.update(over)
    return RouterWorker(**fields)


def test_in_sync_has_no_differences_and_hand_added_is_not_one():
    a, b = d("http://a:1"), d("http://b:2", "prefill")
    hand = RouterWorker(id="02", url="http://hand:3", worker_type="decode", labels={})
    assert _compare([a, b], [w(a), w(b), hand], C, "pd") == []


def test_each_kind_of_difference_is_one_sentence():
    missing, wrong, draining, sick, gone = (d("http://m:1"), d("http://w:2"), d("http://dr:3"), d("http://s:4"),
                                            d("http://gone:5"))
    regular = d("http://r:6", "regular")
    diffs = _compare([missing, wrong, draining, sick, regular],
                     [w(wrong, worker_type="prefill"), w(draining, status="draining"), w(sick, is_healthy=False),
                      w(gone)], C, "pd")
    assert len(diffs) == 6
    text = "\n".join(diffs)
    for part in ("http://m:1 (decode, group g) passes in Consul but the router does not list it",
                 "http://w:2: router has it as prefill, Consul as decode",
                 "http://dr:3 (decode) passes in Consul but the router is draining it",
                 "http://s:4 (decode) passes in Consul but the router marks it unhealthy",
                 "http://gone:5 (decode) is routed but no longer passes in Consul",
                 "http://r:6 (regular, group g) passes in Consul but this router runs in pd mode"):
        assert part in text


def test_format_router_view_lines():
    view = {"cluster": C, "problems": [], "routers": [{
        "id": "sglang-router-c1-r", "url": "http://r:8000", "mode": "pd", "passing": True, "error": None,
        "workers": [{"url": "http://a:1", "worker_type": "decode", "status": "ready", "healthy": True,
                     "group": "g", "generation": "1"}],
        "unmanaged": [{"url": "http://h:2", "worker_type": "decode", "status": "ready", "healthy": True,
                       "group": None, "generation": None}],
        "differences": ["something differs"]}]}
    text = format_router_view(view)
    assert "sglang-router-c1-r at http://r:8000 (pd mode, passing): 1 managed worker(s), 1 added by hand" in text
    assert "group g gen 1" in text and "added by hand" in text and "! something differs" in text
    assert "(no sglang-router registered)" in format_router_view({"cluster": C, "routers": []})


def test_only_a_router_on_this_host_gets_the_local_key_file():
    from sglang_fleet.router_view import _on_this_host
    assert _on_this_host("127.0.0.1")
    assert not _on_this_host("192.0.2.7")  # TEST-NET-1: never an address of this host
