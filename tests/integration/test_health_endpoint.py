"""The health endpoint (FLEET_HEALTH_PORT) of a running node supervisor and router agent: real Consul, real
smg, the sim engine. A 1-node group becomes ready and routed; its /metrics and the router's show it; the
engine (started with --enable-metrics) serves SGLang's metrics; its engine killed, the node answers 503
until the group serves again in the next generation.
"""
from __future__ import annotations

import os
import re
import signal

import pytest

from fleet_processes import http
from fleet_testing import wait_until

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    status, body = http("GET", url, timeout=5)
    return status, body if isinstance(body, str) else str(body)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else None


def metric(url: str, name: str, **labels: str) -> float | None:
    status, text = get(url + "/metrics")
    return sample(text, name, **labels) if status == 200 else None


def test_health_endpoint_of_a_sim_group_and_the_router_and_503_when_the_engine_dies(supervisors, start_router):
    # A long backoff after the failure keeps the node out of service long enough to be seen.
    node = supervisors.start("hz-n0", FLEET_GROUP="hz", FLEET_NNODES=1, FLEET_TP_SIZE=1,
                             FLEET_BACKOFF_BASE=5, FLEET_BACKOFF_MAX=5)
    router = start_router(FLEET_ROUTER_QUIET_WINDOW=0, FLEET_ROUTER_MODE="regular")  # one smg start

    wait_until(lambda: get(node.health_url + "/readyz")[0] == 200, 60, "the node's /readyz to answer 200")
    assert get(node.health_url + "/readyz") == (200, "rank 0 of generation 0 serving\n")
    assert get(node.health_url + "/livez") == (200, "supervisor loop alive\n")
    status, text = get(node.health_url + "/metrics")
    assert status == 200
    assert sample(text, "sglang_fleet_generation") == 0 and sample(text, "sglang_fleet_rank") == 0
    assert sample(text, "sglang_fleet_node_state", state="ready") == 1
    assert sample(text, "sglang_fleet_node_ready") == 1
    assert sample(text, "sglang_fleet_rendezvous_seconds_count") == 1
    assert sample(text, "sglang_fleet_node_info", cluster=node.env["FLEET_CLUSTER"], group="hz", node="hz-n0",
                  role="regular") == 1

    # The engine runs with --enable-metrics (FLEET_ENGINE_METRICS on by default) and serves /metrics.
    status, engine_text = get(node.http_url + "/metrics")
    assert status == 200 and sample(engine_text, "sglang:num_running_reqs") is not None

    # The router: Consul read, smg answering, the group added.
    wait_until(lambda: metric(router.health_url, "sglang_fleet_router_workers", role="regular") == 1, 60,
               "the router's metrics to count the group")
    assert get(router.health_url + "/readyz") == (200, "smg answers; Consul read\n")
    assert get(router.health_url + "/livez")[0] == 200
    status, text = get(router.health_url + "/metrics")
    assert sample(text, "sglang_fleet_router_reconcile_changes_total", action="added", role="regular") == 1
    assert sample(text, "sglang_fleet_router_reconcile_lag_seconds_count") >= 1
    assert sample(text, "sglang_fleet_router_smg_starts_total") == 1

    # The engine dies: /readyz says 503 with the reason until the next generation serves.
    engine_pid = max(p for p in node.engine_pids() if "sim-engine" in open(f"/proc/{p}/cmdline").read())
    os.kill(engine_pid, signal.SIGKILL)
    answers: list[tuple[int, str]] = []

    def not_ready():
        answers.append(get(node.health_url + "/readyz"))
        return answers[-1][0] == 503

    wait_until(not_ready, 20, "the node's /readyz to answer 503", interval=0.05)
    reason = answers[-1][1]
    assert re.match(r"(engine failed in generation 0|leaving generation 0|waiting before the next generation)",
                    reason), reason
    wait_until(lambda: get(node.health_url + "/readyz") == (200, "rank 0 of generation 1 serving\n"), 60,
               "the node to serve again in generation 1")
    status, text = get(node.health_url + "/metrics")
    assert sample(text, "sglang_fleet_engine_restarts_total", reason="engine_exited") == 1
    assert sample(text, "sglang_fleet_failure_detection_seconds_count", cause="own_engine") == 1
    assert sample(text, "sglang_fleet_withdrawal_seconds_count", kind="generation_end") == 1
    assert sample(text, "sglang_fleet_generation") == 1
    assert get(node.health_url + "/livez")[0] == 200
