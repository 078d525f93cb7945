"""The router end to end: real Consul, real smg, node supervisors running sim engines, all on loopback.

- PD: a 2-node prefill group and a 1-node decode group behind the router; /generate and OpenAI chat
  (streamed and not) through it; the decode fetched the prefill's bootstrap room. kill -9 of the
  prefill's rank 1: the router withdraws the prefill, requests meanwhile fail cleanly (no hang), and once
  the group re-forms requests go through again with nobody touching the router.
- regular: two 1-node groups; requests are spread over both; a worker added by hand survives every
  reconcile; `sglang-fleet status` shows both views; smg killed -> the agent starts it again and rebuilds
  the list.
- Consul down: smg keeps its workers; Consul back (empty): the router registers itself again, and the
  group stays in smg's list all along (held until it passes again, docs/protocol.md "Router"): smg's
  /workers is listed every 0.2 s from before the outage until the hold ends.
- API key: clients without it get 401; the agent manages the guarded worker API with it.
- kill -9 of the agent: smg goes with it (its whole process group), and a new agent binds the same ports.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from fleet_chaos import WorkerWatch
from fleet_processes import CLIENT_TIMEOUT, Router, answers, http
from fleet_testing import FLEET_BIN, free_port, wait_until
from sglang_fleet.process_group import group_alive
from sglang_fleet.sim_kv import kv_digest

pytestmark = pytest.mark.integration


def generate(router: Router, text: str, timeout: float = CLIENT_TIMEOUT):
    return http("POST", router.url + "/generate", {"text": text, "sampling_params": {"max_new_tokens": 8}},
                timeout=timeout)


def engine_requests(sup) -> int:
    status, info = http("GET", sup.http_url + "/server_info", timeout=5)
    return info["requests"] if status == 200 else -1


def router_service(consul_api, cluster: str) -> list[dict]:
    _, entries = consul_api.health_service("sglang-router", tag=f"cluster:{cluster}", passing=True)
    return entries


# ---- PD ------------------------------------------------------------------------------------------------
def test_pd_groups_through_the_router_and_prefill_rank1_kill9(supervisors, start_router, consul_api, cluster_name):
    import openai

    prefill = [supervisors.start(f"pf-n{r}", FLEET_ROLE="prefill", FLEET_GROUP="pf", FLEET_NNODES=2,
                                 FLEET_TP_SIZE=2, FLEET_NODE_RANK=r) for r in (0, 1)]
    decode = supervisors.start("dc-n0", FLEET_ROLE="decode", FLEET_GROUP="dc")
    router = start_router(FLEET_ROUTER_POLICY="round_robin")

    router.wait_workers(lambda ws: {(w["worker_type"], w["status"]) for w in ws} >= {("prefill", "ready"),
                                                                                      ("decode", "ready")},
                        "the router to list the prefill and the decode group", timeout=90)
    [pw] = [w for w in router.workers() if w["worker_type"] == "prefill"]
    assert pw["url"] == prefill[0].http_url
    assert pw["bootstrap_port"] == int(prefill[0].env["FLEET_BOOTSTRAP_PORT"])
    assert pw["labels"]["managed-by"] == "sglang-fleet" and pw["labels"]["sglang-fleet/group"] == "pf"
    wait_until(lambda: router_service(consul_api, cluster_name), 30, "the router's own registration to pass")

    # /generate through the router: the decode fetched the prefill's KV over its bootstrap port.
    status, body = generate(router, "hello through the router")
    assert status == 200, body
    meta = body["meta_info"]
    assert meta["kv_from"].endswith(f":{prefill[0].env['FLEET_BOOTSTRAP_PORT']}")
    # The decode's KV is the one the prefill stored for this prompt, in the room smg chose for it.
    assert isinstance(meta["bootstrap_room"], int) and meta["kv"] == kv_digest("hello through the router")
    status, info = http("GET", decode.http_url + "/server_info")
    assert info["kv_transfers"] >= 1

    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", timeout=CLIENT_TIMEOUT, max_retries=0)
    chat = client.chat.completions.create(model="sim/tiny-model", max_tokens=8,
                                          messages=[{"role": "user", "content": "hi from openai"}])
    assert "sim engine" in chat.choices[0].message.content
    stream = client.chat.completions.create(model="sim/tiny-model", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "stream me please"}])
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert "stream" in text

    # kill -9 of the prefill's rank 1 (supervisor and engine, as if the host died).
    prefill[1].kill9()
    router.wait_workers(lambda ws: not any(w["worker_type"] == "prefill" and w["status"] == "ready" for w in ws),
                        "the router to withdraw the prefill group", timeout=60)
    # No prefill: a clean error from the router (a hang would be the client's timeout: an exception).
    status, body = generate(router, "nobody to prefill this")
    assert (status, body["error"]["code"]) == (503, "no_available_workers"), body
    assert body["error"]["message"].startswith("No available servers: No available prefill workers"), body

    # A replacement for rank 1 joins; the group re-forms; the router routes to it again by itself.
    prefill[1] = supervisors.start("pf-n1b", FLEET_ROLE="prefill", FLEET_GROUP="pf", FLEET_NNODES=2,
                                   FLEET_TP_SIZE=2, FLEET_NODE_RANK=1)
    router.wait_workers(lambda ws: any(w["worker_type"] == "prefill" and w["status"] == "ready" for w in ws),
                        "the re-formed prefill group to be routed again", timeout=90)
    [pw2] = [w for w in router.workers() if w["worker_type"] == "prefill"]
    assert int(pw2["labels"]["sglang-fleet/generation"]) > int(pw["labels"]["sglang-fleet/generation"])
    status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(generate(router, "back again")),
                              30, "a request to succeed after the re-formation")
    assert body["meta_info"]["kv_from"]

    # SIGTERM: the router leaves Consul and stops smg.
    assert router.stop() == 0
    assert not router_service(consul_api, cluster_name)
    wait_until(lambda: not answers(router.url + "/liveness"), 10, "smg to be gone")


# ---- regular -------------------------------------------------------------------------------------------
@pytest.fixture
def hand_engine(tmp_path):
    """A sim engine nobody registers in Consul: the worker an operator adds to smg by hand."""
    port = free_port()
    with open(tmp_path / "hand-engine.log", "ab") as log:
        proc = subprocess.Popen([str(FLEET_BIN), "sim-engine", "--model-path", "sim/tiny-model", "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url + "/health"), 30, "the hand-started sim engine")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_regular_groups_spread_hand_added_survives_smg_restart(supervisors, start_router, hand_engine):
    groups = [supervisors.start(f"rg{i}", FLEET_ROLE="regular", FLEET_GROUP=f"rg{i}") for i in range(2)]
    router = start_router(FLEET_ROUTER_POLICY="round_robin", FLEET_ROUTER_RESYNC_INTERVAL="1")
    urls = {g.http_url for g in groups}
    router.wait_workers(lambda ws: {w["url"] for w in ws if w["status"] == "ready"} >= urls,
                        "the router to list both regular groups", timeout=90)
    assert router.events("starting smg")[-1]["mode"] == "regular"  # auto: only regular groups pass

    # Requests are spread over both groups.
    before = {g.name: engine_requests(g) for g in groups}
    for i in range(8):
        status, body = generate(router, f"spread request {i}")
        assert status == 200, body
    served = {g.name: engine_requests(g) - before[g.name] for g in groups}
    assert all(n > 0 for n in served.values()), served

    # A worker added by hand (no labels) survives every reconcile (resync every 1 s, plus Consul changes).
    status, body = http("POST", router.url + "/workers", {"url": hand_engine, "worker_type": "regular"},
                        key=router.admin_key())  # the operator's way in: the key file on the router's host
    assert status in (200, 202), body
    router.wait_workers(lambda ws: hand_engine in {w["url"] for w in ws if w["status"] == "ready"},
                        "the hand-added worker to be ready")

    # `sglang-fleet status` shows the router's workers beside Consul's, the hand-added one as such.
    env = dict(router.env, FLEET_ROLE="router")
    proc = subprocess.run([str(FLEET_BIN), "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [view] = json.loads(proc.stdout)["routers"]["routers"]
    assert {w["url"] for w in view["workers"]} == urls
    assert [w["url"] for w in view["unmanaged"]] == [hand_engine]
    assert view["differences"] == [], view

    groups[1].terminate()
    router.wait_workers(lambda ws: groups[1].http_url not in {w["url"] for w in ws},
                        "the router to withdraw the stopped group", timeout=60)
    time.sleep(2.5)
    assert hand_engine in router.ready_urls()

    # smg killed: the agent starts it again and adds every passing group again (not the hand-added one:
    # smg forgot it, and it is not ours to add).
    old_pid = router.smg_pid()
    os.killpg(old_pid, signal.SIGKILL)
    wait_until(lambda: router.smg_pid() != old_pid, 60, "the agent to start smg again")
    router.wait_workers(lambda ws: {w["url"] for w in ws if w["status"] == "ready"} == {groups[0].http_url},
                        "the rebuilt worker list", timeout=60)
    status, body = generate(router, "after the smg restart")
    assert status == 200, body
    assert router.events("smg exited; starting it again")


# ---- Consul outage ---------------------------------------------------------------------------------------
def test_consul_outage_keeps_workers_and_router_registers_again(fresh_consul_agent, make_supervisors,
                                                               start_router, cluster_name):
    sups = make_supervisors(fresh_consul_agent)
    group = sups.start("solo", FLEET_ROLE="regular", FLEET_GROUP="solo")
    router = start_router(consul=fresh_consul_agent, FLEET_ROUTER_RESYNC_INTERVAL="1")
    router.wait_workers(lambda ws: group.http_url in {w["url"] for w in ws if w["status"] == "ready"},
                        "the router to list the group", timeout=90)
    watch = WorkerWatch(router, interval=0.2)
    watch.start()
    try:
        fresh_consul_agent.stop()
        time.sleep(4)  # several resyncs and failed watches
        assert group.http_url in router.ready_urls()
        status, body = generate(router, "while consul is down")
        assert status == 200, body
        assert router.proc.poll() is None

        # A -dev agent comes back empty: the router registers itself again, the node its group; the group
        # stays listed meanwhile and the hold ends once it passes again.
        fresh_consul_agent.start()
        api = fresh_consul_agent.api()
        try:
            wait_until(lambda: router_service(api, cluster_name), 60, "the router to register itself again")
        finally:
            api.close()
        wait_until(lambda: router.events("every group routed before the Consul outage passes again"), 60,
                   "the router's hold to end with the group passing again")
        router.wait_workers(lambda ws: group.http_url in {w["url"] for w in ws if w["status"] == "ready"},
                            "the group to be routed after the outage", timeout=60)
    finally:
        watch.stop()
    assert len(watch.samples) > 20 and not watch.lacking(["solo"]), watch.lacking(["solo"])


# ---- API key -----------------------------------------------------------------------------------------------
def test_api_key_guards_clients_and_the_agent_uses_it(supervisors, start_router):
    group = supervisors.start("keyed", FLEET_ROLE="regular", FLEET_GROUP="keyed")
    router = start_router(FLEET_ROUTER_API_KEY="s3cret", FLEET_ROUTER_MODE="regular")
    router.wait_workers(lambda ws: group.http_url in {w["url"] for w in ws if w["status"] == "ready"},
                        "the agent to add the group through the guarded worker API", timeout=90)
    body = {"text": "with a key", "sampling_params": {"max_new_tokens": 4}}
    assert http("POST", router.url + "/generate", body)[0] == 401
    status, answer = http("POST", router.url + "/generate", body, key="s3cret")
    assert status == 200, answer


# ---- the agent's death -------------------------------------------------------------------------------------
def test_kill9_of_the_router_agent_takes_smg_along(start_router):
    """smg never outlives the agent: no orphan routing with a frozen worker list, no port held."""
    router = start_router(FLEET_ROUTER_MODE="regular")
    smg = wait_until(lambda: router.events("smg is answering") and router.smg_pid(), 60, "smg to answer")
    assert answers(router.url + "/liveness")
    os.kill(router.proc.pid, signal.SIGKILL)
    router.proc.wait(timeout=10)
    wait_until(lambda: not group_alive(smg), 10, "smg's whole process group to be gone")
    assert not answers(router.url + "/liveness")

    # Its ports are free: a new agent's smg binds the same ones.
    again = start_router(port=router.port, prom_port=router.prom_port, FLEET_ROUTER_MODE="regular")
    wait_until(lambda: again.events("smg is answering"), 60, "the new agent's smg to answer")
    assert answers(again.url + "/liveness")
    assert again.stop() == 0
