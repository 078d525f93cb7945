"""health.py: what /livez, /readyz and /metrics say about a node loop and a router agent.

The node is the real node.Node stepped one cycle at a time over the in-memory KV (tests/fake_consul.py)
and a scripted engine (test_node_loop's world); the HTTP endpoint is the real server on a free port. The running thing (a sim
group's endpoint, an engine killed) is in tests/integration/test_health_endpoint.py.
"""
from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from sglang_fleet import consul_api as ca
from sglang_fleet import health
from sglang_fleet.config import ConfigError, load_config
from sglang_fleet.engine import EngineState
from sglang_fleet.membership import Ending, Generation
from sglang_fleet.node import Budget
from rendezvous_contract import fleet_config as cfg
from test_node_loop import make_node, plain_logging, world  # noqa: F401 - fixtures used here

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "compose" / "grafana" / "sglang-fleet-dashboard.json"


def value(h, name, **labels):
    return h.registry.get_sample_value(name, labels)


def step(n, text):
    """One cycle until the node says `text`, observing after every cycle as the loop does."""
    sentence = None
    for _ in range(30):
        n.membership.fresh = True  # what the watcher thread does on every change
        sentence = n.run_cycle().sentence
        n.health.observe(n)
        if sentence and text in sentence:
            return sentence
    raise AssertionError(f"{n.node_name} never said {text!r}; last {sentence!r}")


def test_readiness_and_gauges_follow_a_one_node_group_through_a_failure(request):
    api, _calls, engines = request.getfixturevalue("world")
    n = make_node(api, "a", FLEET_NNODES=1, FLEET_TP_SIZE=1, FLEET_START_ATTEMPTS=1, FLEET_MAX_FAILURES=3)
    n.health.observe(n)
    assert n.health.readiness() == (False, "forming a group (generation None, rank None)")
    assert value(n.health, "sglang_fleet_generation") == -1
    step(n, "engine started")
    assert n.health.readiness() == (False, "engine starting in generation 0")
    assert value(n.health, "sglang_fleet_node_state", state="starting") == 1
    assert value(n.health, "sglang_fleet_rank") == 0
    assert value(n.health, "sglang_fleet_rendezvous_seconds_count") == 1

    engines["a"].state = EngineState.RUNNING
    step(n, "engine ready")
    ok, reason = n.health.readiness()
    assert ok and reason == "rank 0 of generation 0 serving"
    assert value(n.health, "sglang_fleet_node_ready") == 1
    assert value(n.health, "sglang_fleet_node_state", state="ready") == 1
    assert value(n.health, "sglang_fleet_node_state", state="starting") == 0

    engines["a"].state, engines["a"].reason, engines["a"].since = EngineState.EXITED, "engine exited with code 9", 0.0
    step(n, "withdrew serving registration")
    assert n.health.readiness() == (False, "engine failed in generation 0: engine exited with code 9")
    step(n, "ending generation 0")
    assert not n.health.readiness()[0]
    assert value(n.health, "sglang_fleet_engine_restarts_total", reason="engine_exited") == 1
    assert value(n.health, "sglang_fleet_failure_detection_seconds_count", cause="own_engine") == 1
    assert value(n.health, "sglang_fleet_failures") == 1
    assert value(n.health, "sglang_fleet_max_failures") == 3
    step(n, "restarting the group")
    assert value(n.health, "sglang_fleet_withdrawal_seconds_count", kind="generation_end") == 1


def test_an_in_place_start_retry_counts_as_a_restart(request):
    api, _calls, engines = request.getfixturevalue("world")
    n = make_node(api, "a", FLEET_NNODES=1, FLEET_TP_SIZE=1, FLEET_START_ATTEMPTS=2)
    step(n, "engine started (pid 4242, attempt 1)")
    engines["a"].state, engines["a"].reason = EngineState.EXITED, "engine exited with code 1 before ready"
    step(n, "start attempt 1/2 failed")
    assert value(n.health, "sglang_fleet_engine_restarts_total", reason="start_retry") is None
    step(n, "engine started (pid 4243, attempt 2)")
    assert value(n.health, "sglang_fleet_engine_restarts_total", reason="start_retry") == 1
    assert value(n.health, "sglang_fleet_failures") == 0


def failing(error):
    def read(*_args, **_kwargs):
        raise error
    return read


def test_the_node_loop_counts_each_consul_error_by_kind(request, monkeypatch):
    api, _calls, _engines = request.getfixturevalue("world")
    n = make_node(api, "a")
    for error in (ca.ConsulUnavailable("x"), ca.ConsulConflict("y"), ca.ConsulDenied("z")):
        monkeypatch.setattr(api, "kv_get_tree", failing(error))
        n.membership.fresh = True
        assert error.args[0] in n.cycle().sentence
    for kind in ("unavailable", "conflict", "denied"):
        assert value(n.health, "sglang_fleet_consul_errors_total", kind=kind) == 1


def test_rank_0_is_not_ready_before_it_registers_serving_and_a_rank_1_is():
    c = cfg(FLEET_NODE_NAME="a")
    h = health.NodeHealth(c)
    gen = Generation(number=4, rank=0, assignment=object(), engine=SimpleNamespace(state=EngineState.RUNNING, starts=1))
    node = SimpleNamespace(gen=gen, leaving=SimpleNamespace(stopping=False, drain_wait_until=None), budget=Budget(),
                           serving=SimpleNamespace(registered=False), membership=SimpleNamespace(view=None))
    h.observe(node)
    assert h.readiness() == (False, "rank 0 of generation 4: engine ready, not registered as serving (yet)")
    gen.rank = 1
    h.observe(node)
    assert h.readiness() == (True, "rank 1 of generation 4 serving")


@pytest.mark.parametrize("cause, label", [("peer-left", "peer_left"), ("local-failure", "peer_engine_failed"),
                                         ("shutdown", "peer_stopped")])
def test_a_generation_ended_by_a_peer_counts_the_peer_s_cause(cause, label):
    ending = Ending(generation=2, reason="generation 2 ended by b: whatever", own_failure=False)
    seen = health.Seen(generation=2, rank=0, assignment=object(), engine=object(), ending=ending, drain=None,
                       awaiting_drain=False, stopping=False, registered=False, failures=0, resume_at=0.0,
                       view=SimpleNamespace(ended={2: {"cause": cause, "by": "b", "at": 100.0}}))
    assert health.restart_reason(seen) == label


def test_liveness_goes_stale_after_a_few_times_the_longest_loop_block():
    now = [1000.0]
    h = health.NodeHealth(cfg(FLEET_NODE_NAME="a", FLEET_BACKOFF_MAX=60), clock=lambda: now[0])
    assert h.live() == (True, "supervisor loop alive")
    now[0] += 3 * 60 - 1
    assert h.live()[0]
    now[0] += 2
    assert h.live() == (False, "supervisor loop stalled: no cycle for 181 s (limit 180 s)")


def test_consul_errors_are_counted_by_kind():
    h = health.NodeHealth(cfg(FLEET_NODE_NAME="a"))
    h.consul_error(ca.ConsulUnavailable("x"))
    h.consul_error(ca.ConsulUnavailable("y"))
    h.consul_error(ca.ConsulDenied("z"))
    assert value(h, "sglang_fleet_consul_errors_total", kind="unavailable") == 2
    assert value(h, "sglang_fleet_consul_errors_total", kind="denied") == 1


def test_router_is_ready_once_consul_was_read_and_smg_answers_and_measures_the_lag():
    now, alive = [10.0], [False]
    h = health.RouterHealth(cfg(FLEET_NODE_NAME="r"), lambda: alive[0], clock=lambda: now[0])
    assert h.readiness() == (False, "the router agent has not read Consul yet")
    h.consul_answered(changed=True)
    assert h.readiness() == (False, "smg does not answer its /liveness")
    alive[0] = True
    assert h.readiness()[0]
    now[0] = 12.5
    workers = [SimpleNamespace(worker_type="prefill"), SimpleNamespace(worker_type="decode"),
               SimpleNamespace(worker_type="decode")]
    h.changed("added", "decode")
    h.applied(workers, ("prefill", "decode"))
    assert value(h, "sglang_fleet_router_reconcile_lag_seconds_sum") == 2.5
    assert value(h, "sglang_fleet_router_workers", role="decode") == 2
    assert value(h, "sglang_fleet_router_reconcile_changes_total", action="added", role="decode") == 1
    h.applied(workers, ("prefill", "decode"))  # nothing new from Consul: no lag to measure
    assert value(h, "sglang_fleet_router_reconcile_lag_seconds_count") == 1


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_endpoint_answers_livez_readyz_and_metrics():
    h = health.NodeHealth(cfg(FLEET_NODE_NAME="a"))
    server = health.HealthServer(h, 0, host="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/livez") == (200, "supervisor loop alive\n")
        assert get(base + "/readyz") == (503, "supervisor starting\n")
        status, text = get(base + "/metrics")
        assert status == 200 and 'sglang_fleet_node_info{cluster="c",group="g",node="a",role="regular"} 1.0' in text
        assert get(base + "/nope")[0] == 404
    finally:
        server.close()


def test_a_taken_health_port_is_one_line_and_exit_78(capsys):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        c = cfg(FLEET_NODE_NAME="a", FLEET_HEALTH_PORT=port)
        with pytest.raises(SystemExit) as exit_:
            health.serve(c, health.NodeHealth(c))
    assert exit_.value.code == 78
    err = capsys.readouterr().err
    assert f"FLEET_HEALTH_PORT={port}: cannot listen there" in err and "Traceback" not in err


def test_health_port_zero_is_off_and_out_of_range_is_refused():
    c = cfg(FLEET_NODE_NAME="a", FLEET_HEALTH_PORT=0)
    assert health.serve(c, health.NodeHealth(c)) is None
    with pytest.raises(ConfigError, match="FLEET_HEALTH_PORT=70000: must be a port number"):
        load_config({"FLEET_NODE_NAME": "a", "FLEET_HEALTH_PORT": "70000"})


def fleet_metric_names() -> set[str]:
    """Every sample name the node's and the router's registries can expose."""
    c = cfg(FLEET_NODE_NAME="a")
    names: set[str] = set()
    for h in (health.NodeHealth(c), health.RouterHealth(c, lambda: True)):
        for metric in h.registry.collect():
            names.add(metric.name)
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(metric.type, ("",))
            names.update(metric.name + s for s in suffixes)
    return names


def test_the_grafana_dashboard_is_valid_json_and_names_only_fleet_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    named = {m for e in exprs for m in re.findall(r"\bsglang_fleet_[a-z_]+", e)}
    assert named, "the dashboard shows no fleet metric"
    assert named <= fleet_metric_names(), f"not in the registries: {sorted(named - fleet_metric_names())}"
    assert any("sglang:" in e for e in exprs) and any(re.search(r"\bsmg_", e) for e in exprs)


def test_operations_doc_lists_every_fleet_metric():
    doc = (ROOT / "docs" / "operations.md").read_text()
    c = cfg(FLEET_NODE_NAME="a")
    for h in (health.NodeHealth(c), health.RouterHealth(c, lambda: True)):
        for metric in h.registry.collect():
            exposed = metric.name + ("_total" if metric.type == "counter" else "")
            assert f"`{exposed}`" in doc, f"docs/operations.md does not list {exposed}"
