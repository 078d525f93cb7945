#!/usr/bin/env python3
"""Router benchmark: how fast a group becomes routable and how fast a dead one is withdrawn.

Everything real and on loopback: a Consul dev agent, node supervisors running sim engines, and two smg:
  A  `sglang-fleet router` (smg + the Consul agent loop of this project), settings at their defaults;
  B  smg's own file discovery (`--discovery-provider file`, default check interval and health checks),
     fed by a manifest the bench writes at the very moment the engine becomes ready.

pickup:     engine ready (its /health turns 200, polled every 20 ms) -> first /generate through the
            router that succeeds. One-node regular group, sim startup delay 1.5 s, `--runs` times.
withdrawal: kill -9 of rank 1 of a 2-node regular group (supervisor and engine) -> A no longer routes to it
            (draining or gone) and no longer lists it (`--withdrawal-runs` times); in the first run also B
            (manifest unchanged: nobody tells it) marking it unhealthy / removing it through its own health
            checks with smg's defaults, waited for up to `--health-wait` seconds.

Prints one JSON document (and writes it to --out). Run: .venv/bin/python scripts/bench_router.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fleet_testing import FLEET_BIN, descendants, emit_json, free_port, kill_quietly  # noqa: E402
from sglang_fleet.smg_client import read_admin_key  # noqa: E402

BIN = Path(sys.executable).parent
FLEET = str(FLEET_BIN)
SMG = os.environ.get("FLEET_SMG_BIN") or str(BIN / "smg")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body=None, timeout: float = 5.0, key: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(pred, timeout: float, interval: float = 0.02):
    """Polls until pred() is truthy; returns the monotonic time it became so, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(interval)
    return None


def spawn(argv, env, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


class Bench:
    def __init__(self, work: Path, consul_bin: str):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.cluster = "bench"
        self.consul_port = free_port()
        ports = [free_port() for _ in range(3)]
        self.procs.append(spawn([consul_bin, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
                                 "-http-port", str(self.consul_port), "-dns-port", "-1", "-grpc-port", "-1",
                                 "-serf-lan-port", str(ports[0]), "-serf-wan-port", str(ports[1]),
                                 "-server-port", str(ports[2]), "-log-level", "warn"], dict(os.environ),
                                work / "consul.log"))
        ok = wait_for(lambda: http("GET", f"http://127.0.0.1:{self.consul_port}/v1/status/leader")[1], 30, 0.1)
        if ok is None:
            raise SystemExit("consul did not start; see " + str(work / "consul.log"))
        time.sleep(1.0)  # the dev agent registers its own node just after electing itself
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
        self.base_env.update({"CONSUL_HTTP_ADDR": f"127.0.0.1:{self.consul_port}", "FLEET_CLUSTER": self.cluster,
                              "FLEET_LOG_FORMAT": "json", "NO_PROXY": "*", "no_proxy": "*",
                              "FLEET_HEALTH_PORT": "0"})  # several supervisors on one host: 9400 is taken once
        self.addr_seq = 2

    def start_router(self) -> str:
        port = free_port()
        env = dict(self.base_env, FLEET_ROLE="router", FLEET_NODE_NAME="bench-router", FLEET_ROUTER_HOST="127.0.0.1",
                   FLEET_ROUTER_PORT=str(port), FLEET_ROUTER_PROMETHEUS_PORT=str(free_port()),
                   FLEET_ROUTER_MODE="regular")
        self.procs.append(spawn([FLEET, "router"], env, self.work / "router.log"))
        return f"http://127.0.0.1:{port}"

    def start_file_smg(self, manifest: Path) -> str:
        port = free_port()
        manifest.write_text(json.dumps({"version": 1, "workers": []}))
        self.procs.append(spawn([SMG, "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-port",
                                 str(free_port()), "--discovery-provider", "file", "--discovery-file", str(manifest),
                                 "--log-json"], dict(self.base_env), self.work / "smg-file.log"))
        return f"http://127.0.0.1:{port}"

    def start_node(self, name: str, group: str, nnodes: int = 1, rank: int | None = None) -> tuple[subprocess.Popen, str]:
        addr = f"127.0.9.{self.addr_seq}"
        self.addr_seq += 1
        port = free_port(addr)
        env = dict(self.base_env, FLEET_ROLE="regular", FLEET_ENGINE="sim", FLEET_MODEL_PATH="sim/tiny-model",
                   FLEET_NODE_NAME=name, FLEET_GROUP=group, FLEET_NNODES=str(nnodes), FLEET_TP_SIZE=str(nnodes),
                   FLEET_ADVERTISE_ADDR=addr, FLEET_HTTP_PORT=str(port), FLEET_DIST_PORT=str(free_port(addr)),
                   FLEET_BOOTSTRAP_PORT=str(free_port(addr)), FLEET_SIM_STARTUP_DELAY="1.5",
                   FLEET_NET_PROFILE="ethernet", FLEET_STOP_GRACE="2")
        if rank is not None:
            env["FLEET_NODE_RANK"] = str(rank)
        proc = spawn([FLEET, "node"], env, self.work / f"{name}.log")
        self.procs.append(proc)
        return proc, f"http://{addr}:{port}"

    def passing(self, group: str) -> bool:
        status, body = http("GET", f"http://127.0.0.1:{self.consul_port}/v1/health/service/sglang?passing=1"
                            f"&tag=cluster:{self.cluster}", timeout=2)
        return status == 200 and any(e["Service"]["Meta"].get("group") == group for e in body or [])

    def kill9(self, proc: subprocess.Popen) -> None:
        for pid in descendants(proc.pid) | {proc.pid}:
            kill_quietly(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            group = descendants(proc.pid) | {proc.pid}
            for pid in group:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def write_manifest(path: Path, workers: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "workers": workers}))
    os.replace(tmp, path)


def generate_ok(router: str) -> bool:
    status, body = http("POST", router + "/generate", {"model": "sim/tiny-model", "text": "bench", "sampling_params": {"max_new_tokens": 2}},
                        timeout=5)
    return status == 200 and body is not None


def listed(router: str, url: str) -> dict | None:
    """The worker at `url` as `router` lists it; an agent's smg wants the admin key the agent keeps."""
    port = int(router.rsplit(":", 1)[1])
    status, body = http("GET", router + "/workers", key=read_admin_key(port))
    if status != 200 or not body:
        return None
    return next((w for w in body.get("workers", []) if w.get("url") == url), None)


def measure_pickup(bench: Bench, a: str, b: str, manifest: Path, n: int, timeout: float = 60.0) -> dict:
    name = f"pick{n}"
    proc, url = bench.start_node(name, name)
    t_ready = wait_for(lambda: http("GET", url + "/health", timeout=1)[0] == 200, 120)
    if t_ready is None:
        return {"error": f"engine {url} never became ready"}
    write_manifest(manifest, [{"id": name, "url": url, "worker_type": "regular"}])
    result: dict = {"engine_url": url}

    def watch(key: str, router: str) -> None:
        t = wait_for(lambda: generate_ok(router), timeout)
        result[key] = None if t is None else round(t - t_ready, 3)

    def registered() -> None:  # the node's part: engine ready -> its service passes in Consul
        t = wait_for(lambda: bench.passing(name), timeout)
        result["consul_passing_s"] = None if t is None else round(t - t_ready, 3)

    threads = [threading.Thread(target=watch, args=("consul_router_s", a)),
               threading.Thread(target=watch, args=("file_discovery_s", b)), threading.Thread(target=registered)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Leave the router to this run's group only: stop the node cleanly (it withdraws its registration).
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        bench.kill9(proc)
    write_manifest(manifest, [])
    wait_for(lambda: listed(a, url) is None and listed(b, url) is None, 30, 0.2)
    return result


def measure_withdrawal(bench: Bench, a: str, b: str, manifest: Path, n: int, health_wait: float) -> dict:
    """With health_wait 0 only the Consul router is watched (smg's own checks take minutes)."""
    group = f"wd{n}"
    r0, url = bench.start_node(f"{group}-n0", group, nnodes=2, rank=0)
    r1, _ = bench.start_node(f"{group}-n1", group, nnodes=2, rank=1)
    if wait_for(lambda: http("GET", url + "/health", timeout=1)[0] == 200, 120) is None:
        return {"error": f"group {group} ({url}) never became ready"}
    write_manifest(manifest, [{"id": group, "url": url, "worker_type": "regular"}] if health_wait else [])
    ready = lambda r: (w := listed(r, url)) is not None and w.get("status") == "ready" and w.get("is_healthy")
    if wait_for(lambda: ready(a) and (ready(b) or not health_wait), 60, 0.1) is None:
        return {"error": f"the routers did not list group {group}"}
    time.sleep(1.0)
    t_kill = time.monotonic()
    bench.kill9(r1)
    out: dict = {"engine_url": url}

    def not_routed(r):
        w = listed(r, url)
        return w is None or w.get("status") != "ready" or not w.get("is_healthy")

    def watch(key: str, router: str, pred, timeout: float) -> None:
        t = wait_for(lambda: pred(router), timeout, 0.05)
        out[key] = None if t is None else round(t - t_kill, 3)

    threads = [
        threading.Thread(target=watch, args=("consul_router_unrouted_s", a, not_routed, 60)),
        threading.Thread(target=watch, args=("consul_router_unlisted_s", a, lambda r: listed(r, url) is None, 60)),
    ]
    if health_wait:
        threads += [
            threading.Thread(target=watch, args=("smg_health_unrouted_s", b, not_routed, health_wait)),
            threading.Thread(target=watch, args=("smg_health_unlisted_s", b, lambda r: listed(r, url) is None,
                                                 health_wait)),
        ]
        out["smg_health_wait_s"] = health_wait
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bench.kill9(r0)
    write_manifest(manifest, [])
    return out


def summary(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "missed": len(values)}
    return {"n": len(got), "missed": len(values) - len(got), "median": round(statistics.median(got), 3),
            "min": round(min(got), 3), "max": round(max(got), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="pickup measurements (default 3)")
    ap.add_argument("--withdrawal-runs", type=int, default=3, help="withdrawal measurements (default 3)")
    ap.add_argument("--health-wait", type=float, default=240.0,
                    help="seconds to wait for smg's own health checks to drop a dead worker (default 240)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    consul_bin = os.environ.get("FLEET_CONSUL_BIN") or subprocess.run(
        [str(ROOT / "scripts" / "install-consul")], check=True, capture_output=True, text=True).stdout.split()[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    bench = Bench(work, consul_bin)
    try:
        manifest = work / "workers.json"
        a, b = bench.start_router(), bench.start_file_smg(manifest)
        if wait_for(lambda: http("GET", a + "/liveness")[0] == 200 and http("GET", b + "/liveness")[0] == 200,
                    60, 0.1) is None:
            raise SystemExit(f"the routers did not start; logs in {work}")
        pickups = [measure_pickup(bench, a, b, manifest, i) for i in range(args.runs)]
        # smg's own health checks are watched in the first run only (they take minutes).
        withdrawals = [measure_withdrawal(bench, a, b, manifest, i, args.health_wait if i == 0 else 0)
                       for i in range(args.withdrawal_runs)]
    finally:
        bench.cleanup()
    result = {
        "bench": "router",
        "command": " ".join(["scripts/bench_router.py"] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"router_quiet_window_s": 0.5, "router_mode": "regular", "sim_startup_delay_s": 1.5,
                     "smg_file_discovery": "--discovery-provider file, default --discovery-check-interval-secs",
                     "smg_health_checks": "defaults (interval 60 s, failure threshold 3)"},
        "pickup_s": {"consul_router": summary([p.get("consul_router_s") for p in pickups]),
                     "file_discovery": summary([p.get("file_discovery_s") for p in pickups])},
        "pickup_consul_passing_s": summary([p.get("consul_passing_s") for p in pickups]),
        "withdrawal_s": {
            "consul_router_unrouted": summary([w.get("consul_router_unrouted_s") for w in withdrawals]),
            "consul_router_unlisted": summary([w.get("consul_router_unlisted_s") for w in withdrawals]),
            "smg_health_unrouted": withdrawals[0].get("smg_health_unrouted_s"),
            "smg_health_unlisted": withdrawals[0].get("smg_health_unlisted_s"),
            "smg_health_waited": args.health_wait,
        },
        "runs": {"pickup": pickups, "withdrawal": withdrawals},
        "logs": str(work),
    }
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
