"""The engine's API key on the REAL engine: SGLang 0.5.23's `launch_server` on CPU gets FLEET_ENGINE_API_KEY
through sglang-fleet's 0600 --config file, refuses requests without it, and still becomes ready and
registers as serving (its /health stays open; the supervisor's probes and smg's worker entry carry the key).
SGLang logs its resolved arguments, the key among them: the supervisor's log shows *** instead.
"""
from __future__ import annotations

import pytest

from fleet_processes import http
from sglang_fleet.config import load_config
from sglang_fleet.launch import key_config

pytestmark = pytest.mark.sglang

READY = 300.0  # seconds a group may take to serve on 2 busy cores
KEY = "real-engine-key-3c9d"
GENERATE = {"text": "The router sends each request", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


def test_a_keyed_real_engine_refuses_strangers_and_still_serves_through_the_router(supervisors, start_router,
                                                                                   consul_api, cluster_name):
    sup = supervisors.start("keyed", FLEET_GROUP="keyed", FLEET_CPU_CORES="0", FLEET_ENGINE_API_KEY=KEY)
    router = start_router(FLEET_ROUTER_MODE="regular", FLEET_ENGINE_API_KEY=KEY, FLEET_ROUTER_RESYNC_INTERVAL="1")

    def serving():
        _, entries = consul_api.health_service("sglang", tag=f"cluster:{cluster_name}", passing=True)
        return [e for e in entries if (e["Service"].get("Meta") or {}).get("group") == "keyed"]
    supervisors.wait(serving, READY, "the keyed group to register as serving")
    router.wait_workers(lambda ws: any(w["url"] == sup.http_url and w.get("status") == "ready" for w in ws),
                        "the router to route to the keyed engine", timeout=60)

    # Straight to the engine: refused without the key (or with another), served with it.
    assert http("POST", sup.http_url + "/generate", GENERATE, timeout=60)[0] == 401
    assert http("POST", sup.http_url + "/generate", GENERATE, timeout=60, key="not-the-key")[0] == 401
    status, body = http("POST", sup.http_url + "/generate", GENERATE, timeout=60, key=KEY)
    assert status == 200, body
    # Through the router with the client key (the engine key).
    assert http("POST", router.url + "/generate", GENERATE, timeout=60)[0] == 401
    status, body = http("POST", router.url + "/generate", GENERATE, timeout=60, key=KEY)
    assert status == 200, body

    keys_file, _ = key_config(load_config(sup.env))
    assert not keys_file.exists()  # SGLang read it while parsing its arguments
    assert any(r.get("event") == "engine_output" and "server_args=" in r.get("line", "") for r in sup.records())
    assert KEY not in sup.text()
    assert router.stop() == 0
