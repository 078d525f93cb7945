"""registration.py: the heartbeat's view of whether it reaches Consul, and the serving registration's life."""
from __future__ import annotations

import threading
import time

from sglang_fleet import consul_api as ca
from sglang_fleet import registration as reg
from rendezvous_contract import fleet_config as cfg


def test_heartbeat_keeps_up_only_while_its_own_recent_passes_succeed():
    hb = reg.Heartbeat(cfg(FLEET_NODE_NAME="a"), "10.0.0.1", threading.Event())

    class Agent:
        fail = False

        def register_service(self, *a, **kw):
            pass

        def pass_ttl(self, check_id):
            if self.fail:
                raise ca.ConsulUnavailable("pass_ttl: ReadTimeout")

    agent = Agent()
    assert not hb.keeping_up()  # no pass yet
    hb._beat(agent)
    assert hb.registered.is_set() and hb.keeping_up()
    assert not hb.keeping_up(now=time.monotonic() + reg.KEEPING_UP_BEATS * hb.interval + 0.1)  # stuck in a beat
    agent.fail = True
    hb._beat(agent)
    assert not hb.keeping_up() and "ReadTimeout" in hb.last_error
    agent.fail = False
    hb._beat(agent)
    assert hb.keeping_up() and hb.last_error is None


class Catalog:
    """The agent's service catalog, as far as the serving registration uses it."""

    def __init__(self, fail_deregister: bool = False):
        self.services: dict[str, dict] = {}
        self.fail_deregister = fail_deregister

    def register_service(self, name, service_id, **kw):
        self.services[service_id] = {"name": name, **kw}

    def deregister_service(self, service_id):
        if self.fail_deregister:
            raise ca.ConsulUnavailable("deregister: connection refused")
        self.services.pop(service_id, None)


def test_serving_registration_registers_withdraws_and_closes_for_a_drain():
    c = cfg(FLEET_NODE_NAME="a", FLEET_ROLE="prefill", FLEET_BOOTSTRAP_PORT=8998)
    hb = reg.Heartbeat(c, "10.0.0.1", threading.Event())
    catalog = Catalog()
    serving = reg.ServingRegistration(catalog, c, "10.0.0.1", hb)
    assert serving.wanted and not serving.registered
    assert serving.register(3) == ("registered serving service sglang-c-g (prefill) at http://10.0.0.1:30000 "
                                   "for generation 3")
    svc = catalog.services["sglang-c-g"]
    assert (svc["name"], svc["tags"], svc["meta"]["generation"], svc["meta"]["bootstrap_port"]) == (
        "sglang", ["prefill", "cluster:c"], "3", "8998")
    assert hb._serving_check == "sglang-c-g-supervisor" and not serving.wanted  # its TTL check is passed now
    assert serving.withdraw() == "withdrew serving registration sglang-c-g"
    assert catalog.services == {} and hb._serving_check is None and serving.wanted
    serving.register(3)
    assert serving.close() == "withdrew serving registration sglang-c-g"
    assert catalog.services == {} and not serving.wanted  # closed: not registered again in this generation
    assert serving.close() == "was not serving"
    serving.reopen()
    assert serving.wanted


def test_a_failed_withdrawal_says_the_ttl_check_lapses():
    c = cfg(FLEET_NODE_NAME="a")
    hb = reg.Heartbeat(c, "10.0.0.1", threading.Event())
    serving = reg.ServingRegistration(Catalog(fail_deregister=True), c, "10.0.0.1", hb)
    serving.register(0)
    assert serving.withdraw() == ("could not withdraw serving registration (deregister: connection refused); "
                                  "its TTL check lapses in 3 s")
    assert not serving.registered and hb._serving_check is None  # no more passes: it goes critical
