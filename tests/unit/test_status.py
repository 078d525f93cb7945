"""`sglang-fleet status`: turning Consul's answers into the groups view (text and JSON)."""
from __future__ import annotations

from sglang_fleet import consul_api as ca
from sglang_fleet import rendezvous as rdv
from sglang_fleet import status


class Answers:
    address = "127.0.0.1:8500"

    def __init__(self, kv, services):
        self.kv, self.services = kv, services

    def kv_get_tree(self, prefix, index=0, wait="10s"):
        return 7, [e for e in self.kv if e.key.startswith(prefix)]

    def health_service(self, name, tag=None, passing=True, index=0, wait="10s"):
        return 7, self.services.get(name, [])


def member_entry(group, node, addr, status_="passing"):
    return {"Service": {"ID": f"sglang-fleet-c-{group}-{node}", "Address": addr,
                        "Meta": {"cluster": "c", "group": group, "node": node}},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "x", "Status": status_}]}


def test_groups_members_waiting_serving_and_last_end():
    k = rdv.Keys("c", "g1")
    fp = b'{"node":"%s","addr":"%s","fingerprint":{"nnodes":2}}'
    kv = [ca.KVEntry(k.gen, b"3", 5),
          ca.KVEntry(k.rank(3, 0), fp % (b"a", b"10.0.0.1"), 6, "s1"),
          ca.KVEntry(k.rank(3, 1), fp % (b"b", b"10.0.0.2"), 7, "s2"),
          ca.KVEntry(k.leader(3), b'{"dist_init_addr":"10.0.0.1:20000","url":"http://10.0.0.1:30000"}', 8, "s1"),
          ca.KVEntry(k.ended(2), b'{"reason":"peer x (rank 1) left; ending generation 2","by":"a"}', 4)]
    services = {
        "sglang-fleet-member": [member_entry("g1", "a", "10.0.0.1"), member_entry("g1", "b", "10.0.0.2", "critical"),
                                member_entry("g1", "spare", "10.0.0.3")],
        "sglang": [{"Service": {"ID": "sglang-c-g1", "Address": "10.0.0.1", "Port": 30000,
                                "Meta": {"group": "g1", "role": "prefill", "generation": "3", "bootstrap_port": "8998"}},
                    "Checks": [{"Name": "engine /health", "Status": "passing", "ServiceID": "sglang-c-g1"}]}],
    }
    data = status.collect(Answers(kv, services), "c")
    (g,) = data["groups"]
    assert g["generation"] == 3 and g["nnodes"] == 2
    assert [(m["rank"], m["node"], m["heartbeat"]) for m in g["members"]] == [(0, "a", "passing"), (1, "b", "critical")]
    assert [w["node"] for w in g["waiting"]] == ["spare"]
    assert g["leader"]["dist_init_addr"] == "10.0.0.1:20000"
    assert g["serving"]["health"] == "passing" and g["serving"]["bootstrap_port"] == 8998
    assert g["last_ended"]["generation"] == 2
    text = status.format_text(data)
    assert "group g1  generation 3  members 2/2  leader 10.0.0.1:20000" in text
    assert "rank 1  b" in text and "heartbeat critical" in text
    assert "serving sglang-c-g1 prefill http://10.0.0.1:30000 bootstrap_port 8998 generation 3: passing" in text
    assert "generation 2 ended by a: peer x (rank 1) left" in text


def test_empty_cluster():
    data = status.collect(Answers([], {}), "c")
    assert data["groups"] == [] and status.format_text(data).startswith("cluster c (Consul 127.0.0.1:8500): 0 group")


def test_router_view_error_is_one_readable_line():
    data = status.collect(Answers([], {}), "c")
    data["routers"] = {"error": "router view unavailable: health_service: 500 No cluster leader"}
    assert status.format_text(data).splitlines()[-1] == \
        "routers: router view unavailable: health_service: 500 No cluster leader"


def test_a_fatal_node_is_shown_with_its_reason():
    k = rdv.Keys("c", "g1")
    kv = [ca.KVEntry(k.gen, b"4", 5),
          ca.KVEntry(k.fatal("b"), b'{"node":"b","reason":"engine failed in 2 consecutive generation(s)","at":1}', 9)]
    data = status.collect(Answers(kv, {}), "c")
    (g,) = data["groups"]
    assert g["fatal"] == [{"node": "b", "reason": "engine failed in 2 consecutive generation(s)", "at": 1}]
    assert g["members"] == [] and g["generation"] == 4
    assert "  FATAL   b: engine failed in 2 consecutive generation(s)" in status.format_text(data).splitlines()
