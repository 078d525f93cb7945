#!/usr/bin/env python3
"""Reliability under Consul outages: issue 11's scenarios (tests/fleet_chaos.py, the same code the chaos tier
and tests/integration/test_consul_outage.py run), each under requests flowing through the router all the
time (a /generate every 0.2 s, 10 s deadline), on sim-engine groups and real Consul processes on loopback.

Per scenario: engine restarts and generations joined per group after the fault began, whether each
group kept its engine PIDs, requests and failed requests, samples of the router's worker list that lacked
a group routed before, and the time from the repair (Consul started again) until every group expected to
serve passes in Consul and is routed again for good (at least 12 s after the repair).

Prints one JSON document: {"machine", "scenarios": [result, ...]} (each result also goes to stderr as one
line when its scenario ends). Run: .venv/bin/python scripts/bench_chaos.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fleet_chaos as fc  # noqa: E402
from fleet_processes import consul_binary  # noqa: E402
from fleet_testing import emit_json  # noqa: E402

SCENARIOS = {
    "single-server-20s": lambda env: fc.single_server_killed(env, 20),
    "single-server-60s": lambda env: fc.single_server_killed(env, 60),
    "single-server-20s-client-agent": lambda env: fc.single_server_killed(env, 20, nodes_on_client=True),
    "leader-killed": fc.leader_killed,
    "quorum-lost-30s": lambda env: fc.quorum_lost(env, 30),
    "client-agent-restarted": fc.client_agent_restarted,
    "dev-agent-restarted-empty": fc.dev_agent_restarted_empty,
    "member-killed-during-outage": fc.member_dies_during_outage,
    "replacement-during-outage": lambda env: fc.member_dies_during_outage(env, replacement=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run (default: all)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--keep", type=Path, help="keep every log here (one folder per scenario) instead of a temporary dir")
    args = ap.parse_args()
    binary = consul_binary()
    results = []
    for i, name in enumerate(args.only or SCENARIOS):
        with contextlib.ExitStack() as keep:
            workdir = (args.keep / f"{i}-{name}" if args.keep else
                       Path(keep.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-chaos-{name}-"))))
            workdir.mkdir(parents=True, exist_ok=True)
            env = fc.ScenarioEnv(binary, workdir, f"bench{os.getpid()}-{i}")
            try:
                with env.stack:
                    result = {"name": name, **SCENARIOS[name](env).as_json()}
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' figures
                result = {"name": name, "error": f"{exc!r}", "trace": traceback.format_exc(limit=3)}
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    emit_json({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "scenarios": results},
              args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
