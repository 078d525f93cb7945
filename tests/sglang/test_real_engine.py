"""The supervisor against the REAL engine: SGLang 0.5.23's `launch_server` on CPU, real Consul, real smg.

Two groups are shared by the tests that allow it (a 2-node group takes ~46 s to be ready on 2 cores):
- cluster `one`: a 1-node regular group behind its own router;
- cluster `two`: a 2-node group (TP 2 across the nodes, one core each) behind its own router; the tests
  that kill a member leave it serving again, the graceful-stop test ends it and runs last.
The engine-failing-at-start test has a group of its own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from fleet_processes import Router, Supervisor, Supervisors, http, real_env
from fleet_testing import (FLEET_BIN, descendants, kill_quietly, process_alive as alive,
                           smg_refused_for_want_of_a_worker, wait_until)
from sglang_fleet import rendezvous as rdv
from sglang_fleet.process_group import shm_files_of

pytestmark = pytest.mark.sglang

READY = 300.0  # seconds a group may take to serve on 2 busy cores
PROMPT = "The router sends each request to a healthy group"


# ---- helpers ---------------------------------------------------------------------------------------------
def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def serving(api, cluster: str, group: str) -> list[dict]:
    _, entries = api.health_service("sglang", tag=f"cluster:{cluster}", passing=True)
    return [e for e in entries if (e["Service"].get("Meta") or {}).get("group") == group]


def view(api, cluster: str, group: str) -> rdv.GroupView:
    keys = rdv.Keys(cluster, group)
    index, entries = api.kv_get_tree(keys.prefix)
    return rdv.parse_view(keys, index, entries)


def generate(url: str, prompt: str = PROMPT, tokens: int = 12, timeout: float = 60.0) -> tuple[int, object]:
    return http("POST", url + "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}, timeout=timeout)


def engine_pid(sup: Supervisor, since: int = 0) -> int:
    """The pid of the last engine the supervisor started (its launch_server)."""
    rec = sup.wait_for("engine started pid", timeout=READY, since=since)
    return int(sup.events("engine started pid", since)[-1].get("pid") or rec["pid"])


def engine_output(sup: Supervisor, contains: str, since: int = 0) -> list[dict]:
    return [r for r in sup.records()[since:] if r.get("event") == "engine_output" and contains in r.get("line", "")]


@dataclass
class Cluster:
    """One cluster of the tier: its supervisors, its router, and the Consul they share."""
    name: str
    sups: Supervisors
    router: Router
    members: list[Supervisor] = field(default_factory=list)

    def wait_serving(self, api, group: str, url: str, timeout: float = READY) -> None:
        self.sups.wait(lambda: serving(api, self.name, group), timeout, f"group {group} to register as serving")
        self.router.wait_workers(lambda ws: any(w["url"] == url and w.get("status") == "ready" for w in ws),
                                 f"the router to route to {url}", timeout=60)


@pytest.fixture(scope="module")
def real_settings(sglang_python, tiny_model) -> dict[str, str]:
    return real_env(sglang_python, tiny_model)


def _cluster(name: str, consul_agent, workdir: Path, env: dict[str, str]) -> Cluster:
    workdir.mkdir(parents=True, exist_ok=True)
    router = Router(consul_agent.addr, name, workdir, FLEET_ROUTER_MODE="regular", FLEET_ROUTER_POLICY="round_robin",
                    FLEET_ROUTER_RESYNC_INTERVAL="1")
    return Cluster(name, Supervisors(consul_agent, name, workdir, env), router)


@dataclass
class Sample:
    at: float
    registered: bool
    health: int | None  # /health of the engine, read just after Consul


@pytest.fixture(scope="module")
def one(consul_agent, real_settings, tmp_path_factory) -> Iterator[tuple[Cluster, list[Sample]]]:
    """A 1-node group, sampled while it starts: Consul's serving registration first, then /health."""
    c = _cluster("one", consul_agent, tmp_path_factory.mktemp("one"), real_settings)
    api = consul_agent.api()
    samples: list[Sample] = []
    try:
        sup = c.sups.start("solo", FLEET_GROUP="solo", FLEET_CPU_CORES="0")
        c.members = [sup]
        while not (samples and samples[-1].registered) and sup.alive():
            registered = bool(serving(api, "one", "solo"))
            try:
                health = http("GET", sup.http_url + "/health", timeout=5)[0]
            except OSError:
                health = None  # not listening yet
            samples.append(Sample(time.time(), registered, health))
            time.sleep(0.2)
        c.wait_serving(api, "solo", sup.http_url)
        yield c, samples
    finally:
        c.router.kill()
        c.sups.cleanup()
        api.close()


@pytest.fixture(scope="module")
def two(consul_agent, real_settings, tmp_path_factory) -> Iterator[Cluster]:
    """A 2-node group, TP 2 across the nodes; node tp-a prefers rank 0. Each engine rank gets one core."""
    c = _cluster("two", consul_agent, tmp_path_factory.mktemp("two"), real_settings)
    api = consul_agent.api()
    try:
        c.members = [c.sups.start("tp-a", **member_env(0)), c.sups.start("tp-b", **member_env(1))]
        # tp-a prefers rank 0, but a generation that ends while the group forms re-claims the ranks afresh.
        c.sups.wait(lambda: serving(api, "two", "tp"), READY, "group tp to register as serving")
        c.wait_serving(api, "tp", by_rank(api, c)[0].http_url)
        yield c
    finally:
        c.router.kill()
        c.sups.cleanup()
        api.close()


def member_env(core: int) -> dict[str, str]:
    return {"FLEET_GROUP": "tp", "FLEET_NNODES": "2", "FLEET_TP_SIZE": "2", "FLEET_CPU_CORES": str(core),
            "FLEET_RANK0": "1" if core == 0 else "0"}


def by_rank(api, c: Cluster) -> dict[int, Supervisor]:
    v = view(api, c.name, "tp")
    live = {s.name: s for s in c.sups.started if s.alive()}
    return {r: live[m.node] for r, m in v.members.items() if m.node in live}


# ---- one node --------------------------------------------------------------------------------------------
def test_one_node_registers_only_after_readiness_and_serves_chat(one, consul_api):
    import openai

    c, samples = one
    [sup] = c.members
    # Registered in Consul => the engine had answered /health 200 (and SGLang keeps it 200 once Up).
    assert samples[-1].registered
    assert all(s.health == 200 for s in samples if s.registered), samples
    assert any(s.health != 200 for s in samples), "the engine was never seen loading: sampling started too late"
    assert engine_output(sup, "The server is fired up and ready to roll!")
    [entry] = serving(consul_api, "one", "solo")
    assert entry["Service"]["Meta"]["model"] == sup.env["FLEET_MODEL_PATH"]

    client = openai.OpenAI(base_url=c.router.url + "/v1", api_key="none", timeout=60, max_retries=0)
    model = sup.env["FLEET_MODEL_PATH"]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert chat.model == model and chat.usage.completion_tokens == 8 and text
    assert "sim engine" not in text
    streamed = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == text
    # The router answered with what the engine itself answers for the same greedy request.
    direct = http("POST", sup.http_url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0})
    assert direct[0] == 200 and direct[1]["choices"][0]["message"]["content"] == text


def test_plan_and_doctor_agree_with_what_ran(one):
    c, _ = one
    [sup] = c.members
    pid = engine_pid(sup)
    ran_argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    ran_env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
    out = subprocess.run([str(FLEET_BIN), "plan", "--json"], env=sup.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    v = plan["argv"]
    # plan assumes rank 0's own address for dist-init, as the rendezvous gave it: the whole argv agrees.
    assert v == ran_argv
    assert v[v.index("--device") + 1] == "cpu"
    for name in ("SGLANG_USE_CPU_ENGINE", "SGLANG_CPU_OMP_THREADS_BIND", "LD_PRELOAD", "NCCL_SOCKET_IFNAME"):
        assert plan["env"].get(name) == ran_env.get(name), name
    assert ran_env["SGLANG_USE_CPU_ENGINE"] == "1" and ran_env["SGLANG_CPU_OMP_THREADS_BIND"] == "0"
    assert "libiomp5.so" in ran_env["LD_PRELOAD"]
    assert not [k for k in ran_env if k.startswith(("FLEET_", "CONSUL_"))]

    env = {**sup.env, "FLEET_HTTP_PORT": str(int(sup.env["FLEET_HTTP_PORT"]) + 1)}  # its own port is in use
    out = subprocess.run([str(FLEET_BIN), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["sglang"]["status"] == "ok" and "SGLang 0.5.23" in checks["sglang"]["detail"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    want = "ok" if "amx_bf16" in cpuinfo else "warn"
    assert checks["cpu"]["status"] == want and "SGLANG_CPU_OMP_THREADS_BIND=0" in checks["cpu"]["detail"]
    assert checks["gpu"]["status"] == "skip" and checks["nccl"]["status"] == "skip"
    assert checks["model"]["status"] == "ok" and checks["config"]["status"] == "ok"
    assert "device cpu: 1 TP rank(s) on cores 0" in checks["config"]["detail"]


# ---- two nodes -------------------------------------------------------------------------------------------
def test_two_node_group_serves_from_rank0_and_matches_one_node(two, one, consul_api):
    ranks = by_rank(consul_api, two)
    # Claimed in Consul: tp-a prefers rank 0, but whoever claims first may hold it.
    assert sorted(s.name for s in ranks.values()) == ["tp-a", "tp-b"] and set(ranks) == {0, 1}
    rank0, rank1 = ranks[0], ranks[1]
    for sup, rank in ((rank0, 0), (rank1, 1)):
        argv = Path(f"/proc/{engine_pid(sup)}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--node-rank") + 1] == str(rank) and argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--dist-init-addr") + 1] == f"{rank0.addr}:{rank0.env['FLEET_DIST_PORT']}"
    # Rank 1 runs SGLang's dummy health server on its port: health only.
    assert engine_output(rank1, "Dummy health check server started")
    assert http("GET", rank1.http_url + "/health", timeout=10)[0] == 200
    assert http("GET", rank1.http_url + "/v1/models", timeout=10)[0] == 404
    assert http("GET", rank0.http_url + "/v1/models", timeout=10)[0] == 200
    [entry] = serving(consul_api, "two", "tp")
    assert entry["Service"]["Address"] == rank0.addr and entry["Service"]["Meta"]["nnodes"] == "2"

    status, body = generate(two.router.url)
    assert status == 200, body
    ref_status, ref = generate(one[0].router.url)
    assert ref_status == 200, ref
    assert body["text"] == ref["text"] and body["meta_info"]["completion_tokens"] == 12


# The sim engine is the stand-in where the real one cannot run (PD): it must answer as the real one does.
RANK0_REQUESTS = [("GET", "/health"), ("GET", "/health_generate"), ("GET", "/v1/models"), ("GET", "/model_info"),
                  ("GET", "/get_model_info"), ("GET", "/server_info"), ("GET", "/get_server_info"),
                  ("GET", "/v1/loads"), ("GET", "/metrics"), ("GET", "/flush_cache"), ("POST", "/flush_cache"),
                  ("GET", "/no-such-path"), ("POST", "/generate"), ("POST", "/v1/chat/completions")]
RANK1_REQUESTS = [("GET", "/health"), ("GET", "/health_generate"), ("GET", "/ping"), ("GET", "/metrics"),
                  ("GET", "/v1/models"), ("GET", "/model_info"), ("POST", "/generate")]


def answers_to(url: str, requests: list[tuple[str, str]], model: str) -> dict[str, int]:
    bodies = {"/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
              "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 2}}
    return {f"{m} {path}": http(m, url + path, bodies.get(path) if m == "POST" else None, timeout=30)[0]
            for m, path in requests}


def test_the_sim_answers_like_the_real_engine(one, two, consul_agent, consul_api, tmp_path):
    from fleet_processes import SIM_ENV

    real0, real1 = one[0].members[0], by_rank(consul_api, two)[1]
    model = real0.env["FLEET_MODEL_PATH"]
    sims = Supervisors(consul_agent, "sim-twin", tmp_path, {**SIM_ENV, "FLEET_MODEL_PATH": model})
    try:
        sims.start("twin-a", **member_env(0))
        sims.start("twin-b", **member_env(1))
        sims.wait(lambda: serving(consul_api, "sim-twin", "tp"), READY, "the sim group to serve")
        sim_ranks = by_rank(consul_api, Cluster("sim-twin", sims, two.router))
        assert engine_output(sim_ranks[0], "sim engine")  # it says what it is
        assert answers_to(sim_ranks[0].http_url, RANK0_REQUESTS, model) == answers_to(real0.http_url, RANK0_REQUESTS,
                                                                                       model)
        assert answers_to(sim_ranks[1].http_url, RANK1_REQUESTS, model) == answers_to(real1.http_url, RANK1_REQUESTS,
                                                                                       model)
        real_info = http("GET", real0.http_url + "/model_info")[1]
        sim_info = http("GET", sim_ranks[0].http_url + "/model_info")[1]
        for key in ("model_path", "served_model_name", "disaggregation_mode", "is_generation"):
            assert key in real_info and key in sim_info, key
            assert sim_info[key] == real_info[key], (key, sim_info[key], real_info[key])
    finally:
        sims.cleanup()


def test_kill9_of_rank1_supervisor_kills_its_engine_stops_rank0_withdraws_and_a_replacement_serves(
        two, consul_api):
    ranks = by_rank(consul_api, two)
    rank0, rank1 = ranks[0], ranks[1]
    g = view(consul_api, "two", "tp").generation
    old_engine = descendants(rank0.proc.pid)
    assert old_engine
    mark0 = rank0.mark()
    rank1.kill9(with_engine=False)  # the supervisor only: its engine must die with it (PR_SET_PDEATHSIG)
    assert rank1.descendants, "rank 1's engine processes were not seen before the kill"

    wait_until(lambda: not any(alive(p) for p in rank1.descendants), 30, "rank 1's engine to die with its supervisor")
    wait_until(lambda: not any(alive(p) for p in old_engine), 60, "rank 0's engine (every process) to stop")
    assert not [p for p in descendants(rank0.proc.pid) if alive(p)]  # (a zombie waits for its reaping)
    assert not serving(consul_api, "two", "tp")
    two.router.wait_workers(lambda ws: rank0.http_url not in {w["url"] for w in ws}, "the router to drop the group")
    # Which node holds rank 0 is the rendezvous' choice (tp-a only prefers it): names come from the ranks.
    rank0.wait_for(f"peer {rank1.name} (rank 1) left; ending generation {g}", since=mark0)
    ended = view(consul_api, "two", "tp").ended[g]
    assert ended["by"] == rank0.name and f"peer {rank1.name} (rank 1) left" in ended["reason"]

    replacement = two.sups.start(rank1.name, **member_env(0 if rank1.name == "tp-a" else 1))
    wait_until(lambda: len(by_rank(consul_api, two)) == 2, 120, "the replacement to hold a rank")
    two.wait_serving(consul_api, "tp", by_rank(consul_api, two)[0].http_url)
    assert view(consul_api, "two", "tp").generation > g
    assert generate(two.router.url)[0] == 200
    assert replacement.alive() and rank0.alive()


def test_kill9_of_rank1_engine_only_restarts_the_group_together(two, consul_api):
    ranks = by_rank(consul_api, two)
    rank0, rank1 = ranks[0], ranks[1]
    g = view(consul_api, "two", "tp").generation
    marks = {s.name: s.mark() for s in (rank0, rank1)}
    old0 = engine_pid(rank0)
    # SGLang on CPU maps a /dev/shm all-reduce buffer per engine and never unlinks it when it is killed.
    old_shm = {path: os.stat(path).st_ino for sup in (rank0, rank1)
               for path in shm_files_of(list(descendants(sup.proc.pid))) if os.path.exists(path)}
    assert any("deepspeed_allreduce_buffer" in path for path in old_shm), old_shm
    kill_quietly(engine_pid(rank1), signal.SIGKILL)  # launch_server only; the supervisor lives

    rank1.wait_for(re.compile(r"engine exited with code -9"), timeout=30, since=marks[rank1.name])
    wait_until(lambda: view(consul_api, "two", "tp").generation > g, 60, "the generation to end")
    wait_until(lambda: not alive(old0), 60, "rank 0's old engine to stop")
    for sup in (rank0, rank1):  # both start an engine again, in the next generation
        sup.wait_for(re.compile(rf"engine started \(pid \d+, attempt 1\) in generation {g + 1}"), timeout=120,
                     since=marks[sup.name])
    # Ranks are claimed afresh in every generation: whoever rejoined first may hold rank 0 now.
    wait_until(lambda: len(by_rank(consul_api, two)) == 2, 60, "both members to hold a rank again")
    two.wait_serving(consul_api, "tp", by_rank(consul_api, two)[0].http_url)
    assert engine_pid(rank0) != old0
    assert generate(two.router.url)[0] == 200
    ended = view(consul_api, "two", "tp").ended[g]
    assert ended["by"] == rank1.name and "exited with code -9" in ended["reason"]
    # Both supervisors removed what their stopped engines left in /dev/shm (a new engine may use a name again).
    left = [path for path, ino in old_shm.items() if os.path.exists(path) and os.stat(path).st_ino == ino]
    assert left == []
    assert rank1.events(re.compile(r"engine stopped .*removed \d+ file\(s\) it left in /dev/shm"),
                        since=marks[rank1.name])


# A Load status: smg refused the request for want of a worker (it reached smg after the router removed the
# group, and never reached an engine).
REFUSED_NO_WORKER = 0


class Load:
    """Clients sending long greedy requests through the router, one after another, each recorded."""

    def __init__(self, url: str, clients: int = 2, tokens: int = 96):
        self.url, self.tokens = url, tokens
        self.results: list[tuple[float, float, int]] = []  # (sent, answered, status)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            try:
                status, body = generate(self.url, tokens=self.tokens, timeout=120)
                status = REFUSED_NO_WORKER if smg_refused_for_want_of_a_worker(body) else status
            except OSError:
                status = -1
            self.results.append((sent, time.time(), status))

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def test_graceful_stop_of_rank0_drains_requests_in_flight(two, consul_api):
    ranks = by_rank(consul_api, two)
    rank0, rank1 = ranks[0], ranks[1]
    load = Load(two.router.url)
    wait_until(lambda: sum(s == 200 for _, _, s in load.results) >= 2, 120, "requests through the router")
    mark0, mark1 = rank0.mark(), rank1.mark()
    engine0 = descendants(rank0.proc.pid)
    rank0.terminate(signal.SIGTERM)
    assert rank0.wait_exit(timeout=120) == 0
    rank1.wait_for("engine stopped", timeout=90, since=mark1)
    load.join()

    withdrew = ts(rank0.wait_for("withdrew serving registration", since=mark0))
    before = [r for r in load.results if r[0] < withdrew and r[2] != REFUSED_NO_WORKER]
    in_flight = [r for r in before if r[1] > withdrew]
    failed = [r for r in before if r[2] != 200]
    assert in_flight, "no request was in flight when rank 0 withdrew: the drain was not exercised"
    assert failed == [], f"{len(failed)} of {len(before)} requests sent before the withdrawal failed"
    # SGLang's own graceful exit ran, and nothing needed SIGKILL.
    assert engine_output(rank0, "SIGTERM received", mark0) and engine_output(rank0, "Gracefully exiting", mark0)
    stopped = rank0.wait_for("engine stopped", since=mark0)["event"]
    assert "after SIGTERM" in stopped and "SIGKILL" not in stopped
    assert engine0 and not any(alive(p) for p in engine0)
    two.sups.wait(lambda: not rank1.engine_pids(), 60, "rank 1's engine to stop (and be reaped) once rank 0 left")


# ---- a node whose engine cannot start -----------------------------------------------------------------------
def test_engine_failing_on_one_node_ends_the_generation_then_that_node_is_fatal(supervisors, consul_api,
                                                                              cluster_name, tmp_path, tiny_model):
    # The model path is relative: present in node ok's working directory, missing in node bad's.
    good_dir, bad_dir = tmp_path / "ok", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    (good_dir / "model").symlink_to(tiny_model)
    common = {"FLEET_GROUP": "broken", "FLEET_NNODES": "2", "FLEET_TP_SIZE": "2", "FLEET_MODEL_PATH": "model",
              "FLEET_MAX_FAILURES": "2", "FLEET_START_ATTEMPTS": "3"}
    good = supervisors.start("ok", cwd=good_dir, FLEET_RANK0="1", FLEET_CPU_CORES="0", **common)
    bad = supervisors.start("bad", cwd=bad_dir, FLEET_CPU_CORES="1", **common)

    assert bad.wait_exit(timeout=240) == 1
    fatal = bad.wait_for("FATAL: engine failed in 2 consecutive generation(s)")
    assert "engine exited with code" in fatal["event"]
    # No lone retry of the failed rank: each failed start ended the generation for both.
    assert not bad.events("engine start attempt") and len(bad.events("ending generation")) == 2
    assert good.alive()
    # The healthy node is back in a fresh generation, alone, waiting for its peer: not hung, not failed.
    g = view(consul_api, cluster_name, "broken").generation
    good.wait_for(f"waiting for peers 1/2 in generation {g}", timeout=60)
    wait_until(lambda: not good.engine_pids(), 60, "the healthy node's engine to be stopped")
    assert not good.events("failure 1/2") and not good.events("FATAL")

    out = subprocess.run([str(FLEET_BIN), "status", "--json"], env=good.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1, out.stderr  # degraded: the group does not serve, a node is FATAL
    assert any(p.startswith("group broken: node bad is FATAL") for p in json.loads(out.stdout)["problems"])
    [group] = [g for g in json.loads(out.stdout)["groups"] if g["group"] == "broken"]
    [entry] = group["fatal"]
    assert entry["node"] == "bad" and "engine exited with code" in entry["reason"]
    assert group["last_ended"]["by"] == "bad"
