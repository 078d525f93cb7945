"""The drain's decisions over a scripted clock and load, and the engine-load answer shapes (a real HTTP
server on 127.0.0.1 for the /v1/loads -> /get_load fallback)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_fleet import drain as dr


class Script:
    """A clock the test moves and a load that answers from a list (an exception is raised)."""

    def __init__(self, loads):
        self.now, self.loads = 100.0, list(loads)

    def clock(self):
        return self.now

    def load(self):
        value = self.loads.pop(0) if len(self.loads) > 1 else self.loads[0]
        if isinstance(value, Exception):
            raise value
        return value


def run(drain: dr.Drain, script: Script, limit: int = 100) -> list[str]:
    said = []
    for _ in range(limit):
        step = drain.step()
        if step.sentence:
            said.append(step.sentence)
        if step.done:
            return said
        script.now += max(step.wait, 0.01)
    raise AssertionError(f"the drain never ended; said {said}")


def test_waits_the_router_pickup_then_two_empty_reads():
    script = Script([0])
    drain = dr.Drain(script.load, timeout=30, pickup=2.0, clock=script.clock)
    said = run(drain, script)
    assert said[-1].startswith("drained: no requests in flight after ")
    assert script.now - 100.0 >= 2.0  # never before the router could have dropped this group


def test_reports_requests_in_flight_until_none_are_left():
    script = Script([3, 3, 2, 1, 1, 0, 0])
    drain = dr.Drain(script.load, timeout=30, pickup=0.0, clock=script.clock)
    said = run(drain, script)
    assert said[:-1] == ["draining: 3 requests in flight", "draining: 2 requests in flight",
                            "draining: 1 request in flight", "draining: 0 requests in flight"]
    assert said[-1].startswith("drained: no requests in flight")
    assert drain.outcome == said[-1]


def test_a_single_empty_read_between_busy_ones_does_not_end_it():
    script = Script([2, 0, 1, 0, 0])
    drain = dr.Drain(script.load, timeout=30, pickup=0.0, clock=script.clock)
    said = run(drain, script)
    assert said[:-1] == ["draining: 2 requests in flight", "draining: 0 requests in flight",
                         "draining: 1 request in flight", "draining: 0 requests in flight"]
    assert said[-1].startswith("drained")


def test_timeout_stops_waiting_for_requests_that_never_finish():
    script = Script([5])
    drain = dr.Drain(script.load, timeout=4, pickup=2.0, clock=script.clock)
    said = run(drain, script)
    assert said[-1] == ("drain timeout: 5 requests still in flight after 4 s (FLEET_DRAIN_TIMEOUT); "
                        "stopping the engine anyway")
    assert 104.0 <= script.now < 105.0


def test_unreadable_load_waits_the_pickup_time_only():
    script = Script([dr.LoadUnavailable("/v1/loads: Connection refused")])
    drain = dr.Drain(script.load, timeout=30, pickup=2.0, clock=script.clock)
    assert drain.start() == "draining (load unreadable: /v1/loads: Connection refused)"
    said = run(drain, script)
    assert said == ["drained: the engine's load is unreadable (/v1/loads: Connection refused); waited 2.0 s "
                    "for the router only"]


def test_a_busy_engine_that_answered_before_is_asked_again():
    slow = dr.LoadUnavailable("/v1/loads: timed out", transient=True)
    script = Script([2, slow, slow, 1, slow, 0, 0])
    drain = dr.Drain(script.load, timeout=30, pickup=0.0, clock=script.clock)
    said = run(drain, script)
    assert said[-1].startswith("drained: no requests in flight")
    script = Script([1, slow])
    drain = dr.Drain(script.load, timeout=3, pickup=0.0, clock=script.clock)
    assert run(drain, script)[-1].startswith("drain timeout: the engine's load is unreadable (/v1/loads: timed out)")
    # A refused connection (the engine is gone) ends it at once, after the pickup time.
    script = Script([1, dr.LoadUnavailable("/v1/loads: [Errno 111] Connection refused")])
    drain = dr.Drain(script.load, timeout=30, pickup=0.0, clock=script.clock)
    assert run(drain, script)[-1].startswith("drained: the engine's load is unreadable (/v1/loads: [Errno 111]")


def test_pickup_never_exceeds_the_timeout():
    script = Script([dr.LoadUnavailable("x")])
    drain = dr.Drain(script.load, timeout=0.5, pickup=2.0, clock=script.clock)
    run(drain, script)
    assert script.now - 100.0 < 1.0


def test_in_flight_reads_sglang_0_5_23_and_older_answers():
    v1 = {"timestamp": "t", "version": "0.5.23", "loads": [
        {"dp_rank": 0, "num_running_reqs": 2, "num_waiting_reqs": 1},
        {"dp_rank": 1, "num_running_reqs": 0, "num_waiting_reqs": 0,
         "disaggregation": {"mode": "prefill", "prefill_bootstrap_queue_reqs": 1,
                            "prefill_inflight_queue_reqs": 3, "kv_transfer_speed_gb_s": 9.5}}]}
    assert dr.in_flight(dr.V1_LOADS, v1) == 7
    assert dr.in_flight(dr.GET_LOAD, [{"dp_rank": 0, "num_reqs": 4, "num_waiting_reqs": 1, "num_tokens": 9},
                                      {"dp_rank": 1, "num_reqs": 1}]) == 5
    with pytest.raises(dr.LoadUnavailable, match="unexpected answer from /v1/loads"):
        dr.in_flight(dr.V1_LOADS, {"detail": "Not Found"})


@pytest.fixture
def engine_http():
    """An engine's HTTP port on 127.0.0.1 serving the paths given in `routes` ({path: (code, body)})."""
    routes: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = routes.get(self.path, (404, {"detail": "Not Found"}))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", routes
    srv.shutdown()
    srv.server_close()


def test_requests_in_flight_prefers_v1_loads_and_falls_back_to_get_load(engine_http):
    url, routes = engine_http
    routes[dr.GET_LOAD] = (200, [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 0, "num_tokens": 0}])
    assert dr.requests_in_flight(url) == 3
    routes[dr.V1_LOADS] = (200, {"loads": [{"dp_rank": 0, "num_running_reqs": 1, "num_waiting_reqs": 0}]})
    assert dr.requests_in_flight(url) == 1
    routes[dr.V1_LOADS] = (503, {})
    with pytest.raises(dr.LoadUnavailable, match="/v1/loads answered HTTP 503"):
        dr.requests_in_flight(url)
    routes.clear()
    with pytest.raises(dr.LoadUnavailable, match="/get_load answered HTTP 404"):
        dr.requests_in_flight(url)


def test_requests_in_flight_of_a_dead_engine_is_unavailable():
    with pytest.raises(dr.LoadUnavailable):
        dr.requests_in_flight("http://127.0.0.1:9", timeout=1)  # the discard port: nothing listens


def test_drain_timeout_setting():
    from sglang_fleet.config import ConfigError, load_config
    base = {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "m"}
    assert load_config(base).drain_timeout == 30.0
    assert load_config({**base, "FLEET_DRAIN_TIMEOUT": "0"}).drain_timeout == 0.0
    with pytest.raises(ConfigError, match="FLEET_DRAIN_TIMEOUT=-1.0: must be zero or more seconds"):
        load_config({**base, "FLEET_DRAIN_TIMEOUT": "-1"})
