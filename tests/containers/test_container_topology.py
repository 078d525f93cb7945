"""The demo topology in containers: requests through the router, and the faults a real cluster meets
(a member killed, a member cut off the network, rank 0 stopped), seen from the outside only: the
router's worker list, Consul's keys and services, container states and logs."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import pytest
import requests

from containers_support import FLEET_IMAGE, PREFILL_GROUP, wait_until
from fleet_testing import smg_refused_for_want_of_a_worker


def network_ip(container, network: str) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]


def test_request_through_router_crosses_containers(demo, docker_client):
    answer = demo.wait_serving()
    assert "[sglang-fleet sim engine]" in answer["choices"][0]["message"]["content"]

    # SGLang's native API through the router: the decode group fetched the KV of the prefill group's
    # bootstrap room from the prefill container (rank 0's address on the docker network).
    r = requests.post(f"{demo.router_url}/generate", timeout=30,
                      json={"text": "across containers", "sampling_params": {"max_new_tokens": 4}})
    r.raise_for_status()
    meta = r.json()["meta_info"]
    prefill_rank0 = demo.rank_holder(PREFILL_GROUP, 0)
    assert meta["kv_from"].split(":")[0] == network_ip(demo.container(prefill_rank0), demo.network), meta
    info = demo.exec_python("decode-0", "import urllib.request as u; "
                            "print(u.urlopen('http://127.0.0.1:30000/server_info').read().decode())")
    assert '"kv_transfers": 0' not in info and '"kv_transfers"' in info, info

    # Every container reports healthy to Docker (HEALTHCHECK: supervisord programs + router /health).
    services = ["consul", "prefill-0", "prefill-1", "decode-0", "router"]
    wait_until(lambda: all(demo.container(s).attrs["State"].get("Health", {}).get("Status") == "healthy"
                           for s in services), 60, "every container to be healthy")

    # A node whose engine cannot start goes FATAL; its container stops with a non-zero status.
    crasher = docker_client.containers.run(
        FLEET_IMAGE, detach=True, network=demo.network, name=f"{demo.project}-crasher",
        environment={"CONSUL_HTTP_ADDR": "consul:8500", "FLEET_CLUSTER": "demo", "FLEET_ROLE": "regular",
                     "FLEET_MODEL_PATH": "sim/demo-model", "FLEET_GROUP": "crasher",
                     "FLEET_START_ATTEMPTS": "1", "FLEET_MAX_FAILURES": "1",
                     "SGLANG_FLEET_SIM_CRASH_AT_START": "1"})
    try:
        wait_until(lambda: (crasher.reload(), crasher.status == "exited")[1], 90, "the crashing node to exit")
        code = crasher.attrs["State"]["ExitCode"]
        print(f"crashing node exited with {code}")
        assert code != 0
    finally:
        crasher.remove(force=True)


def test_kill_of_prefill_rank1_ends_generation_and_rejoins(demo, docker_client):
    demo.wait_serving()
    g0 = demo.gen(PREFILL_GROUP)
    victim = demo.rank_holder(PREFILL_GROUP, 1)
    assert victim in ("prefill-0", "prefill-1")
    print(f"prefill rank 1 is {victim} in generation {g0}; docker kill")
    demo.container(victim).kill()

    wait_until(lambda: demo.gen(PREFILL_GROUP) > g0, 30, "the prefill group to end its generation")
    wait_until(lambda: "prefill" not in demo.worker_types(), 30, "the router to withdraw the prefill group")
    assert "decode" in demo.worker_types()

    demo.container(victim).start()
    demo.wait_serving()
    assert demo.gen(PREFILL_GROUP) > g0
    assert {demo.rank_holder(PREFILL_GROUP, 0), demo.rank_holder(PREFILL_GROUP, 1)} == {"prefill-0", "prefill-1"}


def test_network_disconnect_of_a_member_ends_generation_and_reforms(demo, docker_client):
    demo.wait_serving()
    g0 = demo.gen(PREFILL_GROUP)
    member = demo.rank_holder(PREFILL_GROUP, 1)
    network = docker_client.networks.get(demo.network)
    print(f"disconnecting {member} (prefill rank 1, generation {g0}) from {demo.network}")
    network.disconnect(demo.container(member))

    wait_until(lambda: demo.gen(PREFILL_GROUP) > g0, 30, "the prefill group to end its generation")
    wait_until(lambda: "prefill" not in demo.worker_types(), 30, "the router to withdraw the prefill group")

    network.connect(demo.container(member), aliases=[member])
    demo.wait_serving(timeout=150)
    assert {demo.rank_holder(PREFILL_GROUP, 0), demo.rank_holder(PREFILL_GROUP, 1)} == {"prefill-0", "prefill-1"}
    # The member rejoins once its own heartbeat reaches Consul again, so the group re-forms in the very
    # next generation. Joining earlier (on a check kept passing by a pass that arrived late) formed a
    # generation whose session lapsed 3 s later; the router could route to it as it died, and smg's
    # circuit breakers then answered 503 for 60 s (the decode's too).
    assert demo.gen(PREFILL_GROUP) == g0 + 1, demo.kv(f"sglang-fleet/demo/groups/{PREFILL_GROUP}/g{g0 + 1}/ended")


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    error: str = ""
    refused_no_worker: bool = False  # smg had no worker for it: it reached smg after the group was removed


def _no_worker(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    try:
        return response is not None and smg_refused_for_want_of_a_worker(response.json())
    except ValueError:
        return False


class Load:
    """Chat completions through the router from a few threads, each outcome recorded."""

    def __init__(self, demo, threads: int = 4):
        self.demo, self.outcomes, self.stop = demo, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            started = time.time()
            try:
                self.demo.chat("load during stop", max_tokens=12, timeout=30)
                self.outcomes.append(Outcome(started, time.time(), True))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                self.outcomes.append(Outcome(started, time.time(), False, str(exc)[:160], _no_worker(exc)))
                time.sleep(0.05)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=40)


class CatalogWatch(threading.Thread):
    """Blocking queries on Consul's catalog: records when a service ID stops being listed."""

    def __init__(self, demo, service_id: str):
        super().__init__(daemon=True)
        self.demo, self.service_id = demo, service_id
        self.withdrawn_at: float | None = None
        self.done = threading.Event()

    def run(self):
        index = 0
        while not self.done.is_set() and self.withdrawn_at is None:
            try:
                r = requests.get(f"{self.demo.consul_url}/v1/health/service/sglang", timeout=15,
                                 params={"index": index, "wait": "5s"})
                index = int(r.headers.get("X-Consul-Index", 0))
                if self.service_id not in {e["Service"]["ID"] for e in r.json()}:
                    self.withdrawn_at = time.time()
            except requests.RequestException:
                time.sleep(0.1)


def log_time(line: str) -> float:
    """Docker's timestamp of a `docker logs -t` line, as epoch seconds."""
    from datetime import datetime
    stamp = line.split(" ", 1)[0]
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (frac or "0"))


def logged_withdrawal(lines: list[str]) -> float | None:
    """The node's own timestamp of its withdrawal (its JSON log line, written once Consul answered). The
    catalog watch sees the withdrawal a few ms later; a request sent in between finds no prefill group
    left in the router (503 at once): it was never in flight."""
    for line in lines:
        if "withdrew serving registration" in line:
            try:
                stamp = json.loads(line.split(" ", 1)[1])["timestamp"]
            except (ValueError, KeyError, IndexError):
                return None
            return log_time(stamp)
    return None


@pytest.mark.demo_env(FLEET_DEMO_TOKEN_DELAY="0.05")
def test_stop_of_rank0_withdraws_registration_before_the_engine_stops(demo, docker_client):
    demo.wait_serving()
    rank0 = demo.rank_holder(PREFILL_GROUP, 0)
    serving_id = demo.serving_id(PREFILL_GROUP)
    assert serving_id in demo.serving_ids()
    watch = CatalogWatch(demo, serving_id)
    watch.start()
    container = demo.container(rank0)

    with Load(demo) as load:
        time.sleep(2)  # requests in flight
        stop_at = time.time()
        container.stop(timeout=60)
        stopped_at = time.time()
        time.sleep(2)
    watch.done.set()
    watch.join(timeout=10)

    container.reload()
    logs = container.logs(timestamps=True).decode(errors="replace").splitlines()
    sigterm_lines = [ln for ln in logs if "stopping on SIGTERM" in ln]
    assert watch.withdrawn_at is not None, "the serving registration was never withdrawn"
    assert sigterm_lines, "\n".join(logs[-30:])
    engine_sigterm_at = log_time(sigterm_lines[0])
    withdrawn_at = min(watch.withdrawn_at, logged_withdrawal(logs) or watch.withdrawn_at)

    # A request sent in the instant of the withdrawal may reach smg after the router removed the group:
    # smg refuses it for want of a prefill worker (it never reached the engine), so it counts as after.
    before = [o for o in load.outcomes if o.started < withdrawn_at and not o.refused_no_worker]
    failed_before = [o for o in before if not o.ok]
    failed_after = [o for o in load.outcomes if o not in before and not o.ok]
    print(f"docker stop of {rank0} (prefill rank 0) took {stopped_at - stop_at:.2f} s, exit code "
          f"{container.attrs['State']['ExitCode']}")
    print(f"registration withdrawn {withdrawn_at - stop_at:+.3f} s after the stop began (seen by the catalog "
          f"watch {watch.withdrawn_at - stop_at:+.3f} s), engine got SIGTERM {engine_sigterm_at - stop_at:+.3f} s")
    print(f"requests: {len(load.outcomes)} sent, {len(before)} started before the withdrawal "
          f"({len(failed_before)} failed), {len(failed_after)} failed after it (no prefill group left)")
    for o in failed_before + failed_after[:5]:
        print(f"  failed: started {o.started - stop_at:+.3f} s, ended {o.ended - stop_at:+.3f} s: {o.error}")

    assert container.attrs["State"]["ExitCode"] == 0  # a stop is not a failure
    # Consul's watch wakes a few ms after the deregistration; the log line travels through two pipes.
    assert watch.withdrawn_at <= engine_sigterm_at + 0.5
    # The node drained (FLEET_DRAIN_TIMEOUT) between the withdrawal and the engine's SIGTERM.
    assert any("drained: " in ln for ln in logs), "\n".join(logs[-30:])
    assert not failed_before, f"{len(failed_before)} request(s) that started before the withdrawal failed"
