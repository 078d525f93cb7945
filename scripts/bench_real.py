#!/usr/bin/env python3
"""Real-engine benchmark: a 2-node group of SGLang 0.5.23's own launch_server on CPU (TP 2 across the
nodes), under sglang-fleet and, as the anchor, started by hand the guide's way. JSON on stdout.

sglang-fleet (real Consul, real smg, two `sglang-fleet node` on 127.0.0.x, FLEET_DEVICE=cpu):
  formation_s   last member's supervisor started -> first /generate through the router answers 200
  detection     kill -9 of rank 1 (supervisor + engine: the host dies), 3 s after serving -> the survivor's
                loop names the peer that left (peer_left_s) and withdraws the registration
                (registration_withdrawn_s), every process of its engine is gone (engines_stopped_s), the
                router agent has removed the group from smg (route_withdrawn_s, from its log)
  reformation_s replacement supervisor started -> first /generate through the router answers 200
The guide's way (the two `sglang-fleet plan` command lines, fixed --dist-init-addr, no supervisor):
  formation_s   last launch_server started -> rank 0's /health answers 200 (SGLang's warm-up done) and a
                /generate answers 200
  after kill -9 of rank 1's process group (3 s after serving): rank0_http_gone_s (GET /v1/models stops
                answering within 2 s), rank0_processes_gone_s (or null: still there 60 s later);
                nothing restarts it and no router is told.

  scripts/bench real                       # = .venv/bin/python scripts/bench_real.py --runs 3
Needs FLEET_SGLANG_PYTHON (scripts/install-sglang-cpu), FLEET_CONSUL_BIN, FLEET_SMG_BIN (scripts/bench sets them).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the harness of the real-engine tier
import fleet_processes as H  # noqa: E402
from fleet_testing import FLEET_BIN, descendants, emit_json, free_port, process_alive, wait_until  # noqa: E402
from sglang_fleet.process_group import group_alive, group_pids, remove_files, shm_files_of  # noqa: E402

WAIT = 300.0
SETTLE = 3.0  # seconds of steady serving before the kill
PROMPT = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


def answers_generate(url: str) -> bool:
    try:
        return H.http("POST", url + "/generate", PROMPT, timeout=30)[0] == 200
    except OSError:
        return False


def api_answers(url: str) -> bool:
    """rank 0's API answers at all (GET /v1/models, no generation, 2 s deadline)."""
    try:
        return H.http("GET", url + "/v1/models", timeout=2)[0] == 200
    except OSError:
        return False


def warmed_up(url: str) -> bool:
    """SGLang's own readiness (its warm-up done: /health 200), and a request answered."""
    try:
        return H.http("GET", url + "/health", timeout=30)[0] == 200 and answers_generate(url)
    except OSError:
        return False


def until(predicate, what: str, timeout: float = WAIT, interval: float = 0.1) -> float:
    """Seconds (wall clock, time.time()) at which `predicate` first held."""
    wait_until(predicate, timeout, what, interval=interval)
    return time.time()


def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def member_env(core: int) -> dict[str, str]:
    return {"FLEET_GROUP": "tp", "FLEET_NNODES": "2", "FLEET_TP_SIZE": "2", "FLEET_CPU_CORES": str(core),
            "FLEET_RANK0": "1" if core == 0 else "0"}


def fleet_run(agent: H.ConsulAgent, env: dict[str, str], work: Path, run: int) -> dict:
    cluster = f"bench-real-{run}"
    work = work / cluster  # each run its own logs: a supervisor's log is appended to, never replaced
    work.mkdir()
    router = H.Router(agent.addr, cluster, work, FLEET_ROUTER_MODE="regular")
    sups = H.Supervisors(agent, cluster, work, env)
    try:
        first = sups.start("tp-a", **member_env(0))
        first.wait_for("waiting for peers 1/2", timeout=WAIT)
        t0 = time.time()
        second = sups.start("tp-b", **member_env(1))
        formed = until(lambda: answers_generate(router.url), "the group to serve through the router")
        time.sleep(SETTLE)
        engine0 = descendants(first.proc.pid)
        t_kill = time.time()
        second.kill9(with_engine=True)
        stopped = until(lambda: not any(process_alive(p) for p in engine0), "the survivor's engine to stop", 120)
        # The agent's DELETE /workers: smg stops routing to a deleted worker at once (docs/smg-notes.md).
        withdrawn = ts(wait_until(lambda: router.events(f"removed regular {first.http_url}"), 120,
                                  "the router agent to remove the group")[-1])
        left = ts(first.wait_for("peer tp-b (rank 1) left", timeout=60))
        deregistered = ts(first.wait_for("withdrew serving registration", timeout=60))
        t_rep = time.time()
        sups.start("tp-b", **member_env(1))
        reformed = until(lambda: answers_generate(router.url), "the group to serve again")
        return {"formation_s": round(formed - t0, 2),
                "detection": {"peer_left_s": round(left - t_kill, 2),
                              "registration_withdrawn_s": round(deregistered - t_kill, 2),
                              "engines_stopped_s": round(stopped - t_kill, 2),
                              "route_withdrawn_s": round(withdrawn - t_kill, 2)},
                "reformation_s": round(reformed - t_rep, 2)}
    finally:
        router.kill()
        sups.cleanup()


def planned(env: dict[str, str], rank: int, dist_init: str) -> tuple[list[str], dict[str, str]]:
    """The command a person would copy from `sglang-fleet plan` for this rank."""
    out = subprocess.run([str(FLEET_BIN), "plan", "--json", "--node-rank", str(rank), "--dist-init-addr", dist_init],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    plan = json.loads(out.stdout)
    return plan["argv"], plan["env"]


def by_hand_run(env: dict[str, str], work: Path, run: int) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    addrs = ["127.0.9.2", "127.0.9.3"]
    ports = [free_port(a) for a in addrs]
    dist_init = f"{addrs[0]}:{free_port(addrs[0])}"
    procs: list[subprocess.Popen] = []
    shm: set[str] = set()
    try:
        for rank in (0, 1):
            node_env = {**base, **env, **member_env(rank), "FLEET_NODE_NAME": f"hand-{rank}",
                        "FLEET_ADVERTISE_ADDR": addrs[rank], "FLEET_HTTP_PORT": str(ports[rank])}
            argv, engine_env = planned(node_env, rank, dist_init)
            log = open(work / f"hand-{run}-rank{rank}.log", "wb")
            if rank == 1:
                t0 = time.time()
            procs.append(subprocess.Popen(argv, env=engine_env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()
        url0 = f"http://127.0.0.1:{ports[0]}"
        formed = until(lambda: warmed_up(url0), "rank 0 started by hand to serve")
        time.sleep(SETTLE)
        for p in procs:  # SGLang leaves its /dev/shm files behind when killed: note them to clean up after
            shm |= shm_files_of(group_pids(p.pid))
        t_kill = time.time()
        os.killpg(procs[1].pid, signal.SIGKILL)
        http_gone = proc_gone = None
        deadline = t_kill + 60
        while time.time() < deadline and (http_gone is None or proc_gone is None):
            if http_gone is None and not api_answers(url0):
                http_gone = time.time() - t_kill
            procs[0].poll()
            if proc_gone is None and not group_alive(procs[0].pid):
                proc_gone = time.time() - t_kill
            time.sleep(0.1)
        return {"formation_s": round(formed - t0, 2),
                "after_kill": {"rank0_http_gone_s": http_gone and round(http_gone, 2),
                               "rank0_processes_gone_s": proc_gone and round(proc_gone, 2),
                               "restarted": False, "withdrawn_from_a_router": False}}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        remove_files(shm)


def median(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "runs": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    py = os.environ.get("FLEET_SGLANG_PYTHON") or subprocess.run(
        [str(ROOT / "scripts" / "install-sglang-cpu")], check=True, text=True, stdout=subprocess.PIPE).stdout.split()[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-real-"))
    model = H.make_tiny_model(py, work / "model")
    env = H.real_env(py, model)
    agent = H.ConsulAgent(H.consul_binary(), work)
    agent.start()
    fleet, hand = [], []
    try:
        for run in range(args.runs):  # alternate, so both see the same machine load
            fleet.append(fleet_run(agent, env, work, run))
            hand.append(by_hand_run(env, work, run))
    finally:
        agent.stop()
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} cores",
        "engine": "SGLang 0.5.23 launch_server, --device cpu, tiny random Llama, TP 2 over 2 nodes (1 core each)",
        "sglang_fleet": {"formation_s": median([r["formation_s"] for r in fleet]),
                         **{f"detection_{k}": median([r["detection"][k] for r in fleet]) for k in fleet[0]["detection"]},
                         "reformation_s": median([r["reformation_s"] for r in fleet]), "runs": fleet},
        "by_hand": {"formation_s": median([r["formation_s"] for r in hand]), "runs": hand},
        "logs": str(work),
    }
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
