#!/usr/bin/env python3
"""Node benchmark: rendezvous, failure detection, re-formation, supervisor RSS and idle CPU.

Everything real and on loopback: a Consul dev agent and `sglang-fleet node` processes with the sim
engine, each on its own 127.0.0.x (the integration tier's harness, tests/integration/conftest.py).
Times come from the supervisors' own JSON log timestamps.

rendezvous (N = 2, 4, 8, 16; one group of N):  N-1 members are started and wait at the barrier; then
    the last member starts. Measured from the last member's first log line (its supervisor is up) to
    the last "engine started" of the group; `from_process_start` also counts the last member's Python
    start-up (interpreter + imports; on this 2-core machine shared with other work it dominates).
detection (2-node group): kill -9 of rank 1 (supervisor and engine, a host dying) -> the survivor's sim
    engine exits by itself as an NCCL abort would (`survivor_engine_exited_s`), the survivor's loop says
    the peer left (`peer_left_s`, bounded by the 3 s heartbeat TTL) and has stopped its engine and
    withdrawn the serving registration (`engines_stopped_s`).
re-formation: the replacement's first log line -> every member's engine started in G+1
    (`engines_started_s`) and the serving registration of G+1 in the survivor's log (`serving_s`).
rss/idle cpu: supervisors of a formed 2-node group (engines not counted), over `--idle` seconds.

Prints one JSON document. Run: .venv/bin/python scripts/bench_node.py [--sizes 2,4,8,16] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/fleet_testing.py, which the harness imports too
from fleet_testing import emit_json  # noqa: E402
TARGETS = {"rendezvous_s": 0.5, "detection_s": 3.0, "reformation_s": 1.0, "rss_mb": 60.0, "idle_cpu_pct": 1.0}


import fleet_processes as H  # noqa: E402  (tests/ is on sys.path, see above)


def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def first(sup, pattern, since=0, timeout=120.0) -> float:
    return ts(sup.wait_for(pattern, timeout=timeout, since=since))


def rendezvous(sups, n: int, group: str) -> dict:
    early = [sups.start(f"{group}-n{i}", FLEET_GROUP=group, FLEET_NNODES=n, FLEET_TP_SIZE=n) for i in range(n - 1)]
    for s in early:
        s.wait_for("waiting for", timeout=120)
    t_spawn = time.time()
    last = sups.start(f"{group}-last", FLEET_GROUP=group, FLEET_NNODES=n, FLEET_TP_SIZE=n)
    members = early + [last]
    t_up = ts(last.wait_for(re.compile(r"^node .* at "), timeout=60))
    launched = max(first(s, "engine started (pid") for s in members)
    ready = max(first(s, re.compile(r"engine ready in generation")) for s in members)
    for s in members:
        s.terminate()
    for s in members:
        s.wait_exit(60)
    return {"n": n, "rendezvous_s": round(launched - t_up, 3), "from_process_start_s": round(launched - t_spawn, 3),
            "to_engines_ready_s": round(ready - t_up, 3)}


def failure_and_reform(sups, group: str) -> dict:
    a = sups.start(f"{group}-a", FLEET_GROUP=group, FLEET_NNODES=2, FLEET_TP_SIZE=2, FLEET_RANK0=1)
    a.wait_for("claimed rank 0")
    b = sups.start(f"{group}-b", FLEET_GROUP=group, FLEET_NNODES=2, FLEET_TP_SIZE=2)
    a.wait_for("registered serving service", timeout=120)
    b.wait_for(re.compile(r"engine ready in generation 0"), timeout=120)
    time.sleep(1.5)  # a heartbeat pass lands at a random point of its 1 s period, as in real life
    mark = a.mark()
    t_kill = time.time()
    b.kill9()
    exited = first(a, "engine exited with code", since=mark)
    left = first(a, re.compile(r"^peer .* left; ending generation"), since=mark)
    stopped = first(a, "engine of generation 0 stopped", since=mark)
    a.wait_for("waiting for peers 1/2 in generation 1", since=mark)
    c = sups.start(f"{group}-c", FLEET_GROUP=group, FLEET_NNODES=2, FLEET_TP_SIZE=2)
    t_up = ts(c.wait_for(re.compile(r"^node .* at "), timeout=60))
    started = max(first(s, "engine started (pid", since=m) for s, m in ((a, mark), (c, 0)))
    serving = first(a, "registered serving service", since=mark)
    for s in (a, c):
        s.terminate()
    for s in (a, c):
        s.wait_exit(60)
    return {"detection": {"survivor_engine_exited_s": round(exited - t_kill, 3),
                          "peer_left_s": round(left - t_kill, 3), "engines_stopped_s": round(stopped - t_kill, 3)},
            "reformation": {"engines_started_s": round(started - t_up, 3), "serving_s": round(serving - t_up, 3)}}


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def idle(sups, group: str, seconds: float) -> dict:
    members = sups.group(group, 2)
    for s in members:
        s.wait_for(re.compile(r"engine ready in generation"), timeout=120)
    time.sleep(2)
    hz = os.sysconf("SC_CLK_TCK")
    before = {s.name: _cpu_ticks(s.proc.pid) for s in members}
    t0 = time.time()
    time.sleep(seconds)
    elapsed = time.time() - t0
    cpu = {s.name: (_cpu_ticks(s.proc.pid) - before[s.name]) / hz / elapsed * 100 for s in members}
    rss = {s.name: _rss_mb(s.proc.pid) for s in members}
    for s in members:
        s.terminate()
    for s in members:
        s.wait_exit(60)
    return {"rss_mb": round(max(rss.values()), 1), "idle_cpu_pct": round(max(cpu.values()), 2),
            "window_s": round(elapsed, 1)}


def _dir(parent: Path, name: str) -> Path:
    d = parent / name  # one folder per run: logs are appended to, never mixed across runs
    d.mkdir()
    return d


def median(values):
    return round(statistics.median(values), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2,4,8,16", help="group sizes for rendezvous (default 2,4,8,16)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (default 3)")
    ap.add_argument("--idle", type=float, default=20.0, help="idle CPU window in seconds (default 20)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    work = Path(tempfile.mkdtemp(prefix="sglang-fleet-bench-node-"))
    agent = H.ConsulAgent(H.consul_binary(), work)
    agent.start()
    result: dict = {"bench": "node", "consul": "1.8.7 -dev on 127.0.0.1", "engine": "sim",
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "runs": args.runs, "targets": TARGETS}
    try:
        rdv_rows = []
        for n in sizes:
            runs = []
            for r in range(args.runs):
                sups = H.Supervisors(agent, f"bench-rdv-{n}-{r}", _dir(work, f"rdv-{n}-{r}"))
                try:
                    runs.append(rendezvous(sups, n, f"g{n}"))
                finally:
                    sups.cleanup()
            rdv_rows.append({"n": n, "rendezvous_s": median([x["rendezvous_s"] for x in runs]),
                             "from_process_start_s": median([x["from_process_start_s"] for x in runs]),
                             "to_engines_ready_s": median([x["to_engines_ready_s"] for x in runs]),
                             "all_runs_s": [x["rendezvous_s"] for x in runs]})
        result["rendezvous"] = rdv_rows

        fails = []
        for r in range(args.runs):
            sups = H.Supervisors(agent, f"bench-fail-{r}", _dir(work, f"fail-{r}"))
            try:
                fails.append(failure_and_reform(sups, "kg"))
            finally:
                sups.cleanup()
        result["detection"] = {k: median([f["detection"][k] for f in fails]) for k in fails[0]["detection"]}
        result["detection"]["all_runs_engines_stopped_s"] = [f["detection"]["engines_stopped_s"] for f in fails]
        result["reformation"] = {k: median([f["reformation"][k] for f in fails]) for k in fails[0]["reformation"]}
        result["reformation"]["all_runs_engines_started_s"] = [f["reformation"]["engines_started_s"] for f in fails]

        sups = H.Supervisors(agent, "bench-idle", _dir(work, "idle"))
        try:
            result["supervisor"] = idle(sups, "idle", args.idle)
        finally:
            sups.cleanup()

        worst_rdv = max(row["rendezvous_s"] for row in rdv_rows)
        result["meets_targets"] = {
            "rendezvous_s": worst_rdv <= TARGETS["rendezvous_s"],
            "detection_s": result["detection"]["engines_stopped_s"] <= TARGETS["detection_s"],
            "reformation_s": result["reformation"]["engines_started_s"] <= TARGETS["reformation_s"],
            "rss_mb": result["supervisor"]["rss_mb"] <= TARGETS["rss_mb"],
            "idle_cpu_pct": result["supervisor"]["idle_cpu_pct"] <= TARGETS["idle_cpu_pct"],
        }
    finally:
        agent.stop()
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
