"""A real Consul cluster on loopback for the chaos tier, the outage tests and scripts/bench_chaos.py:
servers (`-server -bootstrap-expect N`) and client agents from the project's Consul binary
(FLEET_CONSUL_BIN), each on its own address 127.0.9.x with ports picked once, so a member killed with
kill -9 comes back on the same address and ports, with its data dir (state kept) unless it is wiped.

- `ConsulCluster(binary, workdir, servers=3, clients=0)`: `.start()` starts every member and waits for a
  leader and for every agent to take a session; `.servers`, `.clients`, `.member(name)`, `.leader()` (the
  server that leads now), `.wait_leader()`, `.kill_all()` (teardown: SIGKILL of every member).
- `ConsulMember`: `.kill9()`, `.start()`, `.restart(down_for)`, `.wipe()` (its data dir), `.alive()`,
  `.addr` / `.client_env()` / `.api()` for whoever talks to it (node supervisors, routers), like
  fleet_processes.ConsulAgent, so `Supervisors(member, ...)` and `Router(member.addr, ...)` work.

Raft runs with `raft_multiplier = 1` (Consul's own setting for low-latency networks; the default 5 is for
slow cloud VMs): elections take about a second instead of several, which keeps the tier short without
changing what happens.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet_processes import ConsulAgent
from fleet_testing import free_port, kill_group, wait_until
from sglang_fleet.config import ConsulSettings
from sglang_fleet.consul_api import ConsulAPI, ConsulError

_host_seq = itertools.count(1)


def next_cluster_host() -> str:
    """127.0.9.1, 127.0.9.2, ... (fleet_processes.next_loopback hands out 127.0.0.x upward for nodes)."""
    n = next(_host_seq)
    return f"127.0.{9 + (n - 1) // 250}.{(n - 1) % 250 + 1}"


AGENT_HCL = ('performance { raft_multiplier = 1 }\nleave_on_terminate = false\nskip_leave_on_interrupt = true\n'
             'retry_interval = "1s"\n')


@dataclass
class ConsulMember:
    binary: str
    name: str
    workdir: Path
    server: bool
    bootstrap_expect: int = 1
    join: list[str] = field(default_factory=list)  # serf LAN addresses of the servers
    host: str = field(default_factory=next_cluster_host)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.http_port, self.serf_lan_port, self.serf_wan_port, self.server_port = (
            free_port(self.host) for _ in range(4))
        self.data_dir.mkdir(parents=True, exist_ok=True)

    # -- what clients use (the same surface as fleet_processes.ConsulAgent) ------------------------------
    @property
    def addr(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def serf_addr(self) -> str:
        return f"{self.host}:{self.serf_lan_port}"

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.server_port}"

    def client_env(self, token: str | None = None) -> dict[str, str]:
        return {"CONSUL_HTTP_ADDR": self.addr}

    def api(self, timeout: float = 5.0) -> ConsulAPI:
        return ConsulAPI(ConsulSettings(http_addr=self.addr), timeout=timeout)

    # -- life ----------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / self.name / "consul.log"

    def argv(self) -> list[str]:
        argv = [self.binary, "agent", "-node", self.name, "-data-dir", str(self.data_dir), "-bind", self.host,
                "-client", self.host, "-http-port", str(self.http_port), "-serf-lan-port", str(self.serf_lan_port),
                "-serf-wan-port", str(self.serf_wan_port), "-server-port", str(self.server_port),
                "-dns-port", "-1", "-grpc-port", "-1", "-log-level", "warn",
                "-config-file", str(self.workdir / "agent.hcl")]
        if self.server:
            argv += ["-server", "-bootstrap-expect", str(self.bootstrap_expect)]
        for addr in self.join:
            if addr != self.serf_addr:
                argv += ["-retry-join", addr]
        return argv

    def start(self) -> None:
        """Starts the agent (not waiting: a server without quorum answers nothing useful yet)."""
        assert not self.alive(), f"{self.name} is running already"
        (self.workdir / "agent.hcl").write_text(AGENT_HCL)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        kill_group(self.proc)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.kill9()
        time.sleep(down_for)
        self.start()

    def wipe(self) -> None:
        """Forgets everything it stored (a rebuilt host); only while it is stopped."""
        assert not self.alive(), "wipe a stopped member only"
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)

    def ready(self) -> bool:
        """Answers, sees a leader, and its own node is in the catalog (it can take a session)."""
        if not self.alive():
            return False
        api = self.api(timeout=3.0)
        try:
            return bool(api.leader()) and ConsulAgent._node_registered(api)
        except ConsulError:
            return False
        finally:
            api.close()


class ConsulCluster:
    """`servers` Consul servers and `clients` client agents on 127.0.9.x, with persistent data dirs."""

    def __init__(self, binary: str, workdir: Path, servers: int = 3, clients: int = 0):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.servers = [ConsulMember(binary, f"consul-s{i}", workdir, server=True, bootstrap_expect=servers)
                        for i in range(servers)]
        join = [s.serf_addr for s in self.servers]
        for s in self.servers:
            s.join = join
        self.clients = [ConsulMember(binary, f"consul-c{i}", workdir, server=False, join=join)
                        for i in range(clients)]

    @property
    def members(self) -> list[ConsulMember]:
        return self.servers + self.clients

    def member(self, name: str) -> ConsulMember:
        return next(m for m in self.members if m.name == name)

    def start(self, timeout: float = 60.0) -> "ConsulCluster":
        try:
            for m in self.members:
                m.start()
            self.wait_ready(timeout)
        except BaseException:
            self.kill_all()  # a fixture whose start fails never reaches its own teardown
            raise
        return self

    def wait_ready(self, timeout: float = 60.0, members: list[ConsulMember] | None = None) -> None:
        """Every running member (or those given) answers with a leader and can take a session."""
        todo = [m for m in (members or self.members) if m.alive()]
        wait_until(lambda: all(m.ready() for m in todo), timeout,
                   f"consul members {', '.join(m.name for m in todo)} to be ready (logs: {self.workdir}/*/consul.log)",
                   interval=0.3)

    def leader(self) -> ConsulMember | None:
        """The server that leads now, as a running server sees it."""
        for m in self.servers:
            if not m.alive():
                continue
            api = m.api(timeout=2.0)
            try:
                raft = api.leader()
            except ConsulError:
                continue
            finally:
                api.close()
            return next((s for s in self.servers if s.raft_addr == raft), None)
        return None

    def wait_leader(self, timeout: float = 60.0, other_than: ConsulMember | None = None) -> ConsulMember:
        return wait_until(lambda: (lambda lead: lead if lead is not None and lead is not other_than else None)(
            self.leader()), timeout, "the consul servers to elect a leader", interval=0.2)

    def kill_all(self) -> None:
        for m in self.members:
            try:
                m.kill9()
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


__all__ = ["ConsulCluster", "ConsulMember", "next_cluster_host"]
