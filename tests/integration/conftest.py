"""Integration tier fixtures: a real Consul agent on loopback and node supervisors as real processes.

Reusable by every integration test (node, router, status):

- `consul_agent` (module-scoped): a `consul agent -dev` on free loopback ports. `.addr` is
  "127.0.0.1:<http port>", `.api()` a `ConsulAPI` for it, `.restart()` stops and starts it on the same
  ports (a -dev agent keeps everything in memory: after a restart Consul's state is gone, as after losing
  a single-server cluster), `.stop()` / `.start()` for an outage you control.
- `fresh_consul_agent` (function-scoped): the same, for a test that restarts or breaks Consul.
- `cluster_name`: a cluster name unique to the test, so tests sharing one agent never see each other.
- `supervisors`: a `Supervisors` factory; `supervisors.start(node_name, **env)` runs
  `.venv/bin/sglang-fleet node` (FLEET_ENGINE=sim, its own 127.0.0.x address and ports, small delays)
  and returns a `Supervisor` with `.records()` (its JSON log lines), `.events(text)`, `.mark()` +
  `.wait_for(text_or_regex, since=mark)`, `.kill9(with_engine=True)`, `.terminate()`, `.wait_exit()`,
  `.engine_pids()`; `supervisors.group(name, nnodes)` starts a whole group. At teardown every supervisor
  and every process below it is SIGKILLed (engines run in their own process groups: the tree is read
  from /proc).
- `make_supervisors(agent)`: a `Supervisors` bound to another agent (e.g. `fresh_consul_agent`).
- `consul_api`: a `ConsulAPI` on `consul_agent`.
- `wait` fixture == `wait_until(predicate, timeout, what)`. Use the fixtures, or import the plain helpers
  (`free_port`, `wait_until`, `FLEET_BIN`) from tests/fleet_testing.py, never `from conftest import ...`:
  pytest re-imports every non-package conftest.py under the same module name.

Environment: FLEET_CONSUL_BIN (default: the path `scripts/install-consul` prints).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fleet_testing import FLEET_BIN, descendants, free_port, kill_quietly, wait_until
from sglang_fleet.config import ConsulSettings
from sglang_fleet.consul_api import ConsulAPI, ConsulError

ROOT = Path(__file__).resolve().parents[2]

# ---- small helpers (free_port, wait_until, descendants: tests/fleet_testing.py) ----------------------
def consul_binary() -> str:
    path = os.environ.get("FLEET_CONSUL_BIN")
    if not path:
        try:
            path = subprocess.run([str(ROOT / "scripts" / "install-consul")], check=True, text=True,
                                  capture_output=True, timeout=600).stdout.strip().splitlines()[-1]
        except (subprocess.SubprocessError, IndexError, OSError) as exc:
            pytest.fail(f"FLEET_CONSUL_BIN is not set and scripts/install-consul failed: {exc}")
    if not os.access(path, os.X_OK):
        pytest.fail(f"FLEET_CONSUL_BIN={path!r} is not an executable Consul binary")
    return path


# ---- Consul ------------------------------------------------------------------------------------------
@dataclass
class ConsulAgent:
    binary: str
    workdir: Path
    http_port: int = field(default_factory=free_port)
    serf_lan_port: int = field(default_factory=free_port)
    serf_wan_port: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    def api(self) -> ConsulAPI:
        return ConsulAPI(ConsulSettings(http_addr=self.addr))

    def start(self, timeout: float = 30.0) -> None:
        argv = [self.binary, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
                "-http-port", str(self.http_port), "-dns-port", "-1", "-grpc-port", "-1",
                "-serf-lan-port", str(self.serf_lan_port), "-serf-wan-port", str(self.serf_wan_port),
                "-server-port", str(self.server_port), "-node", "consul-test", "-log-level", "warn"]
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n==== start {self.starts}: {' '.join(argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        api = self.api()
        try:
            wait_until(lambda: self.proc.poll() is None and api.leader(), timeout,
                       f"consul agent on {self.addr} to elect a leader (log: {self.log_path})")
            # The agent answers before it has synced its own node; wait until it can take a session.
            wait_until(lambda: api.agent_node_name() and self._node_registered(api), timeout,
                       "consul agent to register its node")
        finally:
            api.close()

    @staticmethod
    def _node_registered(api: ConsulAPI) -> bool:
        try:
            sid = api.session_create("fixture-probe", ["serfHealth"])
        except ConsulError:
            return False
        api.session_destroy(sid)
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stops the agent (SIGKILL), waits `down_for` seconds, starts it again on the same ports."""
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture(scope="session")
def consul_bin() -> str:
    return consul_binary()


def _agent(consul_bin: str, workdir: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_bin, workdir)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def consul_agent(consul_bin, tmp_path_factory) -> Iterator[ConsulAgent]:
    yield from _agent(consul_bin, tmp_path_factory.mktemp("consul"))


@pytest.fixture
def fresh_consul_agent(consul_bin, tmp_path) -> Iterator[ConsulAgent]:
    yield from _agent(consul_bin, tmp_path)


_cluster_seq = itertools.count(1)


@pytest.fixture
def cluster_name(request) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"t{next(_cluster_seq)}-{base}"


# ---- node supervisors --------------------------------------------------------------------------------
_addr_seq = itertools.count(0)


def next_loopback() -> str:
    """127.0.0.2, 127.0.0.3, ... then 127.0.1.2, ... (127.0.0.1 is Consul's)."""
    n = next(_addr_seq)
    return f"127.0.{n // 250}.{n % 250 + 2}"


# Small delays so restarts and failures play out in seconds on a 2-core machine.
FAST_ENV = {
    "FLEET_ENGINE": "sim",
    "FLEET_MODEL_PATH": "sim/tiny-model",
    "FLEET_LOG_FORMAT": "json",
    "FLEET_BACKOFF_BASE": "0.2",
    "FLEET_BACKOFF_MAX": "2",
    "FLEET_STOP_GRACE": "2",
    "FLEET_READY_TIMEOUT": "60",
    "FLEET_START_ATTEMPTS": "1",
    "FLEET_NET_PROFILE": "ethernet",
}


@dataclass
class Supervisor:
    """One `sglang-fleet node` process and its captured JSON log."""
    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen
    descendants: set[int] = field(default_factory=set)

    @property
    def addr(self) -> str:
        return self.env["FLEET_ADVERTISE_ADDR"]

    @property
    def http_url(self) -> str:
        return f"http://{self.addr}:{self.env['FLEET_HTTP_PORT']}"

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict]:
        """Every JSON log line so far (non-JSON lines become {"event": line, "raw": True})."""
        out = []
        for line in self.text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                out.append(rec if isinstance(rec, dict) else {"event": line, "raw": True})
            except ValueError:
                out.append({"event": line, "raw": True})
        return out

    def events(self, contains: str | re.Pattern | None = None, since: int = 0) -> list[dict]:
        """Log records whose `event` contains `contains` (a str or compiled regex)."""
        recs = self.records()[since:]
        if contains is None:
            return recs
        if isinstance(contains, re.Pattern):
            return [r for r in recs if contains.search(str(r.get("event", "")))]
        return [r for r in recs if contains in str(r.get("event", ""))]

    def mark(self) -> int:
        """Position in the log: pass as `since` to look only at what comes after now."""
        return len(self.records())

    def wait_for(self, contains: str | re.Pattern, timeout: float = 60.0, since: int = 0) -> dict:
        def found():
            hits = self.events(contains, since)
            if hits:
                return hits[0]
            if self.proc.poll() is not None and not self.events(contains, since):
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before logging "
                                     f"{contains!r}; log tail:\n{self.tail()}")
            return None
        try:
            return wait_until(found, timeout, f"{self.name} to log {contains!r}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log tail ---\n{self.tail()}") from None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _snapshot_descendants(self) -> None:
        self.descendants |= descendants(self.proc.pid)

    def kill9(self, with_engine: bool = True) -> None:
        """kill -9 of the supervisor; with_engine also kills its engine (a host or container dying)."""
        self._snapshot_descendants()
        if with_engine:
            for pid in self.descendants:
                kill_quietly(pid, signal.SIGKILL)
        kill_quietly(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        self._snapshot_descendants()
        kill_quietly(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s; log tail:\n{self.tail()}") \
                from None

    def engine_pids(self) -> set[int]:
        """Live processes under the supervisor (the engine and its children)."""
        return descendants(self.proc.pid) if self.alive() else set()

    def cleanup(self) -> None:
        if self.alive():
            self._snapshot_descendants()
            kill_quietly(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.descendants:
            kill_quietly(pid, signal.SIGKILL)


class Supervisors:
    """Starts node supervisors for one test and kills whatever is left of them afterwards."""

    def __init__(self, consul: ConsulAgent, cluster: str, workdir: Path):
        self.consul = consul
        self.cluster = cluster
        self.workdir = workdir
        self.started: list[Supervisor] = []

    def env_for(self, name: str, **overrides: Any) -> dict[str, str]:
        addr = next_loopback()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLEET_", "CONSUL_", "SGLANG_FLEET_"))}
        env.update(FAST_ENV)
        env.update({
            "CONSUL_HTTP_ADDR": self.consul.addr,
            "FLEET_CLUSTER": self.cluster,
            "FLEET_NODE_NAME": name,
            "FLEET_ADVERTISE_ADDR": addr,
            "FLEET_HTTP_PORT": str(free_port(addr)),
            "FLEET_DIST_PORT": str(free_port(addr)),
            "FLEET_BOOTSTRAP_PORT": str(free_port(addr)),
            "NO_PROXY": "*", "no_proxy": "*",
        })
        env.update({k: str(v) for k, v in overrides.items() if v is not None})
        return env

    def start(self, name: str, **env_overrides: Any) -> Supervisor:
        """Starts `sglang-fleet node` as `name`. Keyword args are env vars (FLEET_GROUP="g", ...)."""
        env = self.env_for(name, **env_overrides)
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(FLEET_BIN), "node"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.workdir))
        sup = Supervisor(name, env, log_path, proc)
        self.started.append(sup)
        return sup

    def group(self, group: str, nnodes: int, names: list[str] | None = None, **env: Any) -> list[Supervisor]:
        names = names or [f"{group}-n{i}" for i in range(nnodes)]
        return [self.start(n, FLEET_GROUP=group, FLEET_NNODES=nnodes, FLEET_TP_SIZE=nnodes, **env)
                for n in names]

    def cleanup(self) -> None:
        for sup in self.started:
            sup.cleanup()


@pytest.fixture
def supervisors(consul_agent, cluster_name, tmp_path) -> Iterator[Supervisors]:
    sups = Supervisors(consul_agent, cluster_name, tmp_path)
    try:
        yield sups
    finally:
        sups.cleanup()


@pytest.fixture
def make_supervisors(cluster_name, tmp_path) -> Iterator[Callable[[ConsulAgent], Supervisors]]:
    """For tests on their own agent: `sups = make_supervisors(fresh_consul_agent)`; cleaned up after."""
    made: list[Supervisors] = []

    def make(agent: ConsulAgent) -> Supervisors:
        made.append(Supervisors(agent, cluster_name, tmp_path))
        return made[-1]

    yield make
    for sups in made:
        sups.cleanup()


@pytest.fixture
def wait():
    """`wait(predicate, timeout, what)`: the wait_until helper as a fixture (for other test files)."""
    return wait_until


@pytest.fixture
def consul_api(consul_agent) -> Iterator[ConsulAPI]:
    api = consul_agent.api()
    yield api
    api.close()
