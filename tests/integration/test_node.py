"""Node supervisors as real processes against a real Consul, FLEET_ENGINE=sim, each on its own 127.0.0.x.

Assertions are on the loop's sentences (the JSON log) and on Consul's state, never on timings.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import urllib.request

import pytest

from fleet_testing import FLEET_BIN, process_alive as alive, wait_until
from sglang_fleet import rendezvous as rdv

pytestmark = pytest.mark.integration

READY = re.compile(r"^rank (\d+) of (\d+), engine ready in generation (\d+)$")
BARRIER = re.compile(r"^barrier passed: rank (\d+) of (\d+) in generation (\d+), dist-init (\S+)$")


def group_view(api, cluster: str, group: str) -> rdv.GroupView:
    keys = rdv.Keys(cluster, group)
    _, entries = api.kv_get_tree(keys.prefix)
    return rdv.parse_view(keys, 0, entries)


def serving(api, cluster: str, group: str, passing: bool = True) -> list[dict]:
    _, entries = api.health_service("sglang", tag=f"cluster:{cluster}", passing=passing)
    return [e["Service"] for e in entries if (e["Service"].get("Meta") or {}).get("group") == group]


def serving_generation(api, cluster, group) -> int | None:
    svcs = serving(api, cluster, group)
    return int(svcs[0]["Meta"]["generation"]) if svcs else None


def ready(sup, generation: int | None = None, since: int = 0, timeout: float = 60) -> tuple[int, int]:
    """Waits for 'rank r of N, engine ready in generation G'; returns (rank, generation)."""
    pattern = READY if generation is None else re.compile(rf"^rank (\d+) of (\d+), engine ready in generation "
                                                          rf"({generation})$")
    rec = sup.wait_for(pattern, timeout=timeout, since=since)
    m = pattern.search(rec["event"])
    return int(m.group(1)), int(m.group(3))


def engine_argv(sup) -> list[list[str]]:
    out = []
    for pid in sup.engine_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except OSError:
            continue
        if "sim-engine" in argv:
            out.append(argv)
    return out


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def run_status(env: dict, *args: str, expect: int | None = None) -> subprocess.CompletedProcess | None:
    """`sglang-fleet status`; with `expect`, None unless it exited with that status."""
    proc = subprocess.run([str(FLEET_BIN), "status", *args], env=env, capture_output=True, text=True, timeout=60)
    return proc if expect is None or proc.returncode == expect else None


def test_two_and_four_node_groups_form_then_status_and_graceful_leave(supervisors, consul_api, cluster_name):
    two = supervisors.group("pair", 2)
    four = supervisors.group("quad", 4)
    for members, n in ((two, 2), (four, 4)):
        ranks = sorted(ready(s)[0] for s in members)
        assert ranks == list(range(n))
        dist = {BARRIER.search(s.events(BARRIER)[0]["event"]).group(4) for s in members}
        assert len(dist) == 1
        # Every engine really got the same dist-init address and its own rank.
        argvs = [engine_argv(s)[0] for s in members]
        assert {flag(a, "--dist-init-addr") for a in argvs} == dist
        assert sorted(int(flag(a, "--node-rank")) for a in argvs) == list(range(n))
        assert {flag(a, "--nnodes") for a in argvs} == {str(n)}

    view = group_view(consul_api, cluster_name, "quad")
    assert sorted(view.members) == [0, 1, 2, 3]
    assert len({m.session for m in view.members.values()}) == 4
    svc = wait_until(lambda: serving(consul_api, cluster_name, "pair"), 30, "serving registration of pair")[0]
    leader = next(s for s in two if s.events("registered serving service"))
    assert svc["ID"] == f"sglang-{cluster_name}-pair"
    assert svc["Address"] == leader.addr and svc["Port"] == int(leader.env["FLEET_HTTP_PORT"])
    assert set(svc["Tags"]) == {"regular", f"cluster:{cluster_name}"}
    assert svc["Meta"]["nnodes"] == "2" and svc["Meta"]["generation"] == str(view.generation or 0)
    assert "bootstrap_port" not in svc["Meta"]
    assert len([s for s in four if s.events("registered serving service")]) == 1

    # `sglang-fleet status --json` shows both groups with ranks and the serving registration.
    # Exit 0 once both groups serve with passing checks (the HTTP check may need one interval).
    out = wait_until(lambda: run_status(two[0].env, "--json", expect=0), 30, "status exit 0 (healthy)")
    assert json.loads(out.stdout)["ok"] is True and json.loads(out.stdout)["problems"] == []
    status = {g["group"]: g for g in json.loads(out.stdout)["groups"]}
    assert sorted(m["rank"] for m in status["pair"]["members"]) == [0, 1]
    assert {m["heartbeat"] for m in status["pair"]["members"]} == {"passing"}
    assert status["pair"]["serving"]["health"] == "passing"
    assert status["quad"]["nnodes"] == 4
    text = subprocess.run([str(FLEET_BIN), "status"], env=two[0].env, capture_output=True, text=True, timeout=60)
    assert "group pair" in text.stdout and "serving sglang-" in text.stdout and text.stdout.endswith("healthy\n")

    # SIGTERM: graceful leave, exit 0, everything of this node withdrawn; the peer goes back to waiting.
    leaver = next(s for s in two if not s.events("registered serving service"))
    stayer = next(s for s in two if s is not leaver)
    mark = stayer.mark()
    leaver.terminate()
    assert leaver.wait_exit(30) == 0
    assert leaver.events("shutdown requested")
    assert "heartbeat deregistered" in leaver.events("shutdown requested")[-1]["event"]
    assert not engine_argv(leaver)
    stayer.wait_for(re.compile(r"left; ending generation|ended by"), since=mark)
    stayer.wait_for("waiting for peers 1/2", since=mark)
    wait_until(lambda: not serving(consul_api, cluster_name, "pair", passing=False), 30,
               "serving registration of pair withdrawn")
    # A group not serving: status says why and exits 1 (degraded); the quad group still serves.
    degraded = run_status(two[0].env, "--json")
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    assert "group pair: not serving (no serving registration)" in json.loads(degraded.stdout)["problems"]
    assert not [p for p in json.loads(degraded.stdout)["problems"] if p.startswith("group quad")]
    _, members = consul_api.health_service("sglang-fleet-member", tag=f"cluster:{cluster_name}", passing=False)
    assert leaver.name not in {(e["Service"]["Meta"] or {}).get("node") for e in members}


def test_fixed_ranks_and_rank0_preference(supervisors, consul_api, cluster_name):
    fixed = [supervisors.start("fx-a", FLEET_GROUP="fixed", FLEET_NNODES=3, FLEET_TP_SIZE=3, FLEET_NODE_RANK=2),
             supervisors.start("fx-b", FLEET_GROUP="fixed", FLEET_NNODES=3, FLEET_TP_SIZE=3, FLEET_NODE_RANK=0),
             supervisors.start("fx-c", FLEET_GROUP="fixed", FLEET_NNODES=3, FLEET_TP_SIZE=3, FLEET_NODE_RANK=1)]
    # Several preferring nodes would race for 0; one is the realistic case. Its name hashes to rank 1.
    names = [f"pref-{i}" for i in range(20)]
    other = next(n for n in names if rdv.rank_order(2, n)[0] == 0)
    pref_name = next(n for n in names if rdv.rank_order(2, n)[0] == 1)
    pref = supervisors.start(pref_name, FLEET_GROUP="pref", FLEET_NNODES=2, FLEET_TP_SIZE=2, FLEET_RANK0=1)
    pref.wait_for("claimed rank 0")
    plain = supervisors.start(other, FLEET_GROUP="pref", FLEET_NNODES=2, FLEET_TP_SIZE=2)
    assert [ready(s)[0] for s in fixed] == [2, 0, 1]
    assert ready(pref)[0] == 0 and ready(plain)[0] == 1
    view = group_view(consul_api, cluster_name, "fixed")
    assert {r: m.node for r, m in view.members.items()} == {0: "fx-b", 1: "fx-c", 2: "fx-a"}


@pytest.mark.parametrize("victim", ["rank1", "rank0", "engine", "rank1-supervisor-only"])
def test_kill9_ends_generation_and_replacement_serves_next(victim, supervisors, consul_api, cluster_name):
    members = supervisors.group("kg", 2)
    ranks = {ready(s)[0]: s for s in members}
    wait_until(lambda: serving_generation(consul_api, cluster_name, "kg") is not None, 30, "serving registration")
    g = serving_generation(consul_api, cluster_name, "kg")
    target = ranks[0] if victim == "rank0" else ranks[1]
    survivor = ranks[1] if target is ranks[0] else ranks[0]
    marks = {s.name: s.mark() for s in members}
    orphans = set()
    if victim == "engine":
        engine_pid = max(p for p in target.engine_pids() if "sim-engine" in open(f"/proc/{p}/cmdline").read())
        os.kill(engine_pid, signal.SIGKILL)
    elif victim == "rank1-supervisor-only":
        orphans = target.engine_pids()
        assert orphans
        target.kill9(with_engine=False)
        # The engine runs in its own session, yet dies with its supervisor (PR_SET_PDEATHSIG=SIGKILL).
        wait_until(lambda: not any(alive(p) for p in orphans), 10, "the engine to die with its supervisor")
    else:
        target.kill9()

    # The generation ends, every engine of it is stopped, the serving registration disappears.
    survivor.wait_for(re.compile(rf"ending generation {g}|generation {g} ended by"), since=marks[survivor.name])
    survivor.wait_for("engine stopped", since=marks[survivor.name])
    wait_until(lambda: serving_generation(consul_api, cluster_name, "kg") != g, 30,
               f"serving registration of generation {g} to disappear")
    if victim == "engine":
        target.wait_for("engine stopped", since=marks[target.name])
        # Nothing to replace: the same two nodes serve again.
        replacement = target
    else:
        survivor.wait_for(f"waiting for peers 1/2 in generation {g + 1}", since=marks[survivor.name])
        assert not survivor.events("FATAL")
        assert "no failure counted" in survivor.events("restarting the group", since=marks[survivor.name])[0]["event"]
        replacement = supervisors.start("kg-new", FLEET_GROUP="kg", FLEET_NNODES=2, FLEET_TP_SIZE=2)
    assert ready(survivor, g + 1, since=marks[survivor.name])[1] == g + 1
    assert ready(replacement, g + 1, since=marks.get(replacement.name, 0))[1] == g + 1
    wait_until(lambda: serving_generation(consul_api, cluster_name, "kg") == g + 1, 30,
               f"serving registration of generation {g + 1}")
    view = group_view(consul_api, cluster_name, "kg")
    assert view.generation == g + 1 and sorted(view.members) == [0, 1]
    assert view.ended[g]["by"] in {s.name for s in members}


def test_config_mismatch_starts_nothing_and_names_the_field(supervisors, consul_api, cluster_name):
    tp = [supervisors.start("tp-a", FLEET_GROUP="mtp", FLEET_NNODES=2, FLEET_TP_SIZE=2),
          supervisors.start("tp-b", FLEET_GROUP="mtp", FLEET_NNODES=2, FLEET_TP_SIZE=4)]
    model = [supervisors.start("mo-a", FLEET_GROUP="mmodel", FLEET_NNODES=2, FLEET_TP_SIZE=2),
             supervisors.start("mo-b", FLEET_GROUP="mmodel", FLEET_NNODES=2, FLEET_TP_SIZE=2,
                               FLEET_MODEL_PATH="sim/other-model")]
    rec = tp[0].wait_for("config mismatch")
    assert "tp-b (rank" in rec["event"] and "differs in tp_size: 4 there, 2 here" in rec["event"]
    assert "starting nothing" in rec["event"]
    tp[1].wait_for(re.compile(r"tp-a \(rank \d\) differs in tp_size: 2 there, 4 here"))
    model[1].wait_for(re.compile(r"mo-a \(rank \d\) differs in model_path: 'sim/tiny-model' there"))
    model[0].wait_for("differs in model_path")
    for s in tp + model:
        assert not s.events("engine started") and not engine_argv(s)
    assert not serving(consul_api, cluster_name, "mtp", passing=False)
    assert not serving(consul_api, cluster_name, "mmodel", passing=False)


def test_duplicate_fixed_rank_waits_and_says_why(supervisors, consul_api, cluster_name):
    a = supervisors.start("dup-a", FLEET_GROUP="dup", FLEET_NNODES=2, FLEET_TP_SIZE=2, FLEET_NODE_RANK=1)
    a.wait_for("claimed rank 1")
    b = supervisors.start("dup-b", FLEET_GROUP="dup", FLEET_NNODES=2, FLEET_TP_SIZE=2, FLEET_NODE_RANK=1)
    rec = b.wait_for("rank 1 (FLEET_NODE_RANK) is held by dup-a")
    assert "waiting for the next generation" in rec["event"]
    zero = supervisors.start("dup-z", FLEET_GROUP="dup", FLEET_NNODES=2, FLEET_TP_SIZE=2, FLEET_NODE_RANK=0)
    assert ready(a)[0] == 1 and ready(zero)[0] == 0
    assert not b.events("claimed rank") and not b.events("engine started")
    view = group_view(consul_api, cluster_name, "dup")
    assert {r: m.node for r, m in view.members.items()} == {0: "dup-z", 1: "dup-a"}

    # When the holder dies, the waiting node takes rank 1 in the next generation.
    g = view.generation
    a.kill9()
    assert ready(b, g + 1)[0] == 1


def test_engine_crashing_at_start_ends_the_generation_then_fatal(supervisors, consul_api, cluster_name):
    healthy = supervisors.start("cr-ok", FLEET_GROUP="crash", FLEET_NNODES=2, FLEET_TP_SIZE=2,
                                FLEET_MAX_FAILURES=2)
    crashing = supervisors.start("cr-bad", FLEET_GROUP="crash", FLEET_NNODES=2, FLEET_TP_SIZE=2,
                                 FLEET_MAX_FAILURES=2, FLEET_START_ATTEMPTS=2, SGLANG_FLEET_SIM_CRASH_AT_START=1)
    assert crashing.wait_exit(120) == 1
    # A multi-node group never retries one rank alone (its peers wait in SGLang's rendezvous): each
    # failed start ends the generation, FLEET_START_ATTEMPTS=2 notwithstanding.
    assert not crashing.events("engine start attempt")
    assert len(crashing.events("engine exited with code 1 before ready; ending generation")) == 2
    assert crashing.events("restarting the group in")[0]["event"].endswith("(failure 1/2)")
    fatal = crashing.events("FATAL")
    assert len(fatal) == 1 and "FLEET_MAX_FAILURES=2" in fatal[0]["event"] and "exited with code 1" in fatal[0]["event"]
    _, members = consul_api.health_service("sglang-fleet-member", tag=f"cluster:{cluster_name}", passing=False)
    assert "cr-bad" not in {(e["Service"]["Meta"] or {}).get("node") for e in members}
    assert not serving(consul_api, cluster_name, "crash", passing=False)
    # The peer lost nothing of its own budget and waits for a replacement.
    assert healthy.alive() and not healthy.events("FATAL")
    assert all("no failure counted" in r["event"] for r in healthy.events("restarting the group"))
    healthy.wait_for(re.compile(r"waiting for peers 1/2 in generation [1-9]"))


def test_consul_restarted_empty_underneath_a_serving_group_it_reattaches(fresh_consul_agent, make_supervisors,
                                                                         cluster_name):
    """A -dev agent killed for 20 s comes back empty: rank 0 re-creates generation 0, both members take their
    rank keys back, rank 0 registers again; the engines never stop (docs/protocol.md "Re-attach ...")."""
    sups = make_supervisors(fresh_consul_agent)
    members = sups.group("cr", 2)
    rank0 = next(s for s in members if ready(s)[0] == 0)
    api = fresh_consul_agent.api()
    wait_until(lambda: serving(api, cluster_name, "cr"), 30, "serving registration")
    pids = {s.name: s.engine_pids() for s in members}
    marks = {s.name: s.mark() for s in members}
    fresh_consul_agent.restart(down_for=20.0)
    for s in members:
        rec = s.wait_for("Consul unavailable", since=marks[s.name])
        assert "the engine keeps running" in rec["event"]
        # What is lost when it looks depends on whether rank 0 was quicker: the keys or its own key.
        s.wait_for(re.compile(r"^Consul lost .* of generation 0; the engine is healthy: re-attaching"),
                   since=marks[s.name])
        s.wait_for("re-attached to generation 0: all 2 members back", since=marks[s.name], timeout=30)
    rank0.wait_for("Consul lost the group's keys: re-created generation 0 to re-attach to it", since=marks[rank0.name])
    wait_until(lambda: serving_generation(api, cluster_name, "cr") == 0, 30, "serving registration after the restart")
    view = group_view(api, cluster_name, "cr")
    assert (view.generation, sorted(view.members)) == (0, [0, 1])
    for s in members:
        assert s.engine_pids() == pids[s.name]  # not one engine restarted
        assert not s.events("leaving generation") and not s.events("ending generation")
        assert s.alive() and not s.events("FATAL") and not s.events("Traceback")
    api.close()


def test_a_member_killed_while_consul_is_down_ends_the_generation_once_consul_is_back(
        fresh_consul_agent, make_supervisors, cluster_name):
    sups = make_supervisors(fresh_consul_agent)
    members = sups.group("cd", 2, FLEET_REATTACH_WINDOW="8")
    for s in members:
        ready(s)
    survivor, dead = members
    marks = {s.name: s.mark() for s in members}
    fresh_consul_agent.stop()
    survivor.wait_for("Consul unavailable", since=marks[survivor.name])
    dead.kill9()  # its supervisor and its engine
    fresh_consul_agent.start()
    # Its NCCL peer gone, the survivor's engine aborts (or it waits the window out): either way no re-attach.
    ended = re.compile(rf"(did not re-attach to generation 0 within FLEET_REATTACH_WINDOW=8 s; ending it"
                       rf"|^the engine failed while re-attaching|{dead.name} .*left; ending generation 0"
                       rf"|my rank key in generation 0 is gone|^Consul lost its state \(the group's keys are gone\))")
    survivor.wait_for(ended, since=marks[survivor.name], timeout=60)
    survivor.wait_for(re.compile(r"^waiting for peers 1/2 in generation \d+$"), since=marks[survivor.name],
                      timeout=60)
    assert not survivor.events("re-attached to generation 0", since=marks[survivor.name])
    assert survivor.alive() and not survivor.events("FATAL") and not survivor.events("Traceback")


def test_sixteen_supervisors_in_eight_groups_form(supervisors, consul_api, cluster_name):
    groups = {f"s{i}": supervisors.group(f"s{i}", 2) for i in range(8)}
    for name, members in groups.items():
        ranks = sorted(ready(s, timeout=120)[0] for s in members)
        assert ranks == [0, 1], name
        assert len({BARRIER.search(s.events(BARRIER)[0]["event"]).group(4) for s in members}) == 1
    wait_until(lambda: all(serving(consul_api, cluster_name, g) for g in groups), 60,
               "all 8 serving registrations")


# ---- graceful stop: nothing in flight is lost --------------------------------------------------------
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROMPT = " ".join(f"w{i}" for i in range(20))  # the sim echoes words: 16 tokens at 0.25 s = 4 s a request


class InFlight:
    """`count` /generate requests to one engine at once, each outcome recorded."""

    def __init__(self, url: str, count: int):
        self.url, self.results = url, []
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _one(self):
        body = json.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 16}}).encode()
        req = urllib.request.Request(self.url + "/generate", data=body, headers={"Content-Type": "application/json"})
        try:
            with _NO_PROXY.open(req, timeout=60) as resp:
                self.results.append((resp.status, json.loads(resp.read())["text"][:30]))
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome
            self.results.append((None, repr(exc)))

    def running(self) -> int:
        with _NO_PROXY.open(self.url + "/v1/loads", timeout=5) as resp:
            return json.loads(resp.read())["loads"][0]["num_running_reqs"]

    def join(self):
        for t in self.threads:
            t.join(timeout=90)
        return self.results


DRAINED = re.compile(r"drained: no requests in flight after")
DRAINING = re.compile(r"draining: (\d+) requests? in flight")


def serving_pair_under_load(supervisors, consul_api, cluster_name, group: str, requests: int):
    """A serving 2-node group with slow tokens and `requests` requests in flight on rank 0:
    (rank 0, rank 1, the load)."""
    members = supervisors.group(group, 2, SGLANG_FLEET_SIM_TOKEN_DELAY=0.25)
    ranks = {ready(s)[0]: s for s in members}
    wait_until(lambda: serving(consul_api, cluster_name, group), 30, "serving registration")
    load = InFlight(ranks[0].http_url, requests)
    wait_until(lambda: load.running() == requests, 20, f"{requests} requests in flight")
    return ranks[0], ranks[1], load


def test_rank0_sigterm_withdraws_then_drains_then_stops(supervisors, consul_api, cluster_name):
    leader, peer, load = serving_pair_under_load(supervisors, consul_api, cluster_name, "dr0", 5)
    peer_mark = peer.mark()
    leader.terminate()
    assert leader.wait_exit(60) == 0
    results = load.join()
    assert [code for code, _ in results] == [200] * 5, results

    withdrew = leader.wait_for("stop requested: withdrew serving registration")
    assert DRAINING.search(withdrew["event"]) and int(DRAINING.search(withdrew["event"]).group(1)) > 0
    drained = leader.wait_for(DRAINED)
    assert not serving(consul_api, cluster_name, "dr0", passing=False)
    # The peer kept its engine (and the group) until the drain was over, then restarted without rank 0.
    left = peer.wait_for(re.compile(r"left; ending generation"), since=peer_mark)
    assert left["timestamp"] > drained["timestamp"]
    assert "engine stopped" in leader.events("shutdown requested")[-1]["event"]


def test_member_sigterm_asks_rank0_to_drain_first(supervisors, consul_api, cluster_name):
    leader, member, load = serving_pair_under_load(supervisors, consul_api, cluster_name, "dr1", 4)
    leader_mark = leader.mark()
    member.terminate()
    assert member.wait_exit(60) == 0
    assert [code for code, _ in load.join()] == [200] * 4

    asked = member.wait_for("to withdraw and drain generation")
    assert f"asked rank 0 ({leader.name})" in asked["event"]
    withdrew = leader.wait_for(f"{member.name} is stopping: withdrew serving registration", since=leader_mark)
    assert DRAINING.search(withdrew["event"])
    told = leader.wait_for(f"told {member.name} to go on stopping", since=leader_mark)
    assert DRAINED.search(told["event"])
    go_on = member.wait_for("rank 0 drained generation")
    assert told["event"].split("; told")[0] in go_on["event"]  # the member read what rank 0 wrote
    # Then the member leaves: the group restarts without it, rank 0 waits for a replacement.
    leader.wait_for(re.compile(r"left; ending generation"), since=leader_mark)
    leader.wait_for("waiting for peers 1/2", since=leader_mark)
    assert not leader.events("FATAL")
