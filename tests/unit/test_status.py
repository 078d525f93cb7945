"""`sglang-fleet status`: turning Consul's answers into the groups view (text and JSON)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleet_testing import free_port
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


def serving_entry(group, health="passing"):
    return {"Service": {"ID": f"sglang-c-{group}", "Address": "10.0.0.1", "Port": 30000,
                        "Meta": {"group": group, "role": "regular", "generation": "1"}},
            "Checks": [{"Name": "engine /health", "Status": health, "ServiceID": f"sglang-c-{group}"}]}


def one_group(nnodes=1, members=(("a", "passing"),), serving=("passing",), fatal=()):
    k = rdv.Keys("c", "g1")
    kv = [ca.KVEntry(k.gen, b"1", 5)]
    for rank, (node, _) in enumerate(members):
        kv.append(ca.KVEntry(k.rank(1, rank), b'{"node":"%s","addr":"10.0.0.%d","fingerprint":{"nnodes":%d}}'
                             % (node.encode(), rank + 1, nnodes), 6, "s"))
    kv += [ca.KVEntry(k.fatal(node), b'{"node":"%s","reason":"engine failed"}' % node.encode(), 9) for node in fatal]
    services = {"sglang-fleet-member": [member_entry("g1", node, "10.0.0.1", hb) for node, hb in members],
                "sglang": [serving_entry("g1", h) for h in serving]}
    return status.collect(Answers(kv, services), "c")


def routers(*differences):
    """router_view.router_view's answer with one router that differs from Consul as given."""
    return {"cluster": "c", "ok": not differences, "routers": [
        {"id": "r", "url": "http://r:8000", "mode": "regular", "passing": True, "error": None, "workers": [],
         "unmanaged": [], "differences": list(differences)}]}


@pytest.mark.parametrize("data, problem", [
    (lambda: one_group(serving=()), "group g1: not serving (no serving registration)"),
    (lambda: one_group(serving=("critical",)), "group g1: serving registration is critical"),
    (lambda: one_group(nnodes=2), "group g1: 1 of 2 ranks claimed"),
    (lambda: one_group(members=(("a", "critical"),)), "group g1: rank 0 (a) heartbeat critical"),
    (lambda: one_group(fatal=("b",)), "group g1: node b is FATAL: engine failed"),
    (lambda: status.collect(Answers([], {}), "c"), "cluster c has no group"),
    (lambda: {**one_group(), "routers": routers("http://x:1 is routed but no longer passes in Consul")},
     "http://x:1 is routed but no longer passes in Consul"),
    (lambda: {**one_group(), "routers": {"error": "router view unavailable: boom"}}, "router view unavailable: boom"),
])
def test_degraded_cluster_names_why(data, problem):
    assessed = status.assess(data())
    assert assessed["ok"] is False and problem in assessed["problems"]
    assert status.format_text(assessed).splitlines()[-1].startswith("DEGRADED: ")


def test_serving_group_without_router_is_healthy():
    data = status.assess({**one_group(), "routers": {"cluster": "c", "ok": True, "routers": []}})
    assert data["ok"] is True and data["problems"] == []
    assert status.format_text(data).splitlines()[-1] == "healthy"


def test_status_exits_2_when_consul_is_unreachable():
    port = free_port()  # a port nothing listens on
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    proc = subprocess.run([sys.executable, "-m", "sglang_fleet", "status"], capture_output=True, text=True,
                          env={**env, "CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}, timeout=60)
    assert proc.returncode == status.CONSUL_UNREADABLE == 2
    assert proc.stderr.startswith(f"sglang-fleet status: cannot read Consul at 127.0.0.1:{port}")


def test_status_help_documents_the_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "sglang_fleet", "status", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "0 healthy" in proc.stdout and "1 degraded" in proc.stdout and "2 Consul" in proc.stdout
