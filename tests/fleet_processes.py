"""Real processes for the tests and benchmarks that run the real parts: a Consul agent, node supervisors
(`sglang-fleet node`) and routers (`sglang-fleet router` with its smg), each on its own loopback address,
with their JSON logs. The fixtures that use them are in tests/conftest.py; the benchmarks import this
module directly.

- `ConsulAgent(binary, workdir)`: a `consul agent -dev` on free loopback ports. `.addr` is
  "127.0.0.1:<http port>", `.api()` a `ConsulAPI` for it, `.restart()` stops and starts it on the same
  ports (a -dev agent keeps everything in memory: after a restart Consul's state is gone, as after losing
  a single-server cluster), `.stop()` / `.start()` for an outage you control.
- `Supervisors(agent, cluster, workdir, base_env)`: `.start(node_name, **env)` runs
  `.venv/bin/sglang-fleet node` (base_env: `SIM_ENV` for the sim, or the real engine's settings; its own
  127.0.0.x address and ports) and returns a `Supervisor` with `.records()` (its JSON log lines),
  `.events(text)`, `.mark()` + `.wait_for(text_or_regex, since=mark)`, `.kill9(with_engine=True)`,
  `.terminate()`, `.wait_exit()`, `.engine_pids()`; `.group(name, nnodes)` starts a whole group.
  `.cleanup()` SIGKILLs every supervisor and every process below it (engines run in their own process
  groups: the tree is read from /proc).
- `Router(consul_addr, cluster, workdir, port=None, prom_port=None, **env)`: `sglang-fleet router` with smg
  on 127.0.0.1 (on free ports unless given).
- `http(method, url, body)`: one JSON request with a deadline, no proxy.

Environment: FLEET_CONSUL_BIN (default: the path `scripts/install-consul` prints).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

from fleet_testing import FLEET_BIN, descendants, free_port, kill_group, kill_quietly, wait_until
from sglang_fleet.config import ConsulSettings
from sglang_fleet.consul_api import ConsulAPI, ConsulError
from sglang_fleet.process_group import remove_files, shm_files_of
from sglang_fleet.smg_client import admin_key_path, read_admin_key

ROOT = Path(__file__).resolve().parents[1]

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
    # Agent configuration (HCL) beyond -dev, e.g. ACLs; `tls` makes the port HTTPS-only (tls_config()).
    config_hcl: str = ""
    tls: "ConsulTLS | None" = None
    token: str | None = None  # the token the fixture itself uses (the ACL master token)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Consul's own variables for a client of this agent (sglang-fleet, the consul CLI)."""
        env = {"CONSUL_HTTP_ADDR": self.addr}
        if token:
            env["CONSUL_HTTP_TOKEN"] = token
        if self.tls:
            env.update({"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": str(self.tls.ca),
                        "CONSUL_CLIENT_CERT": str(self.tls.client_cert),
                        "CONSUL_CLIENT_KEY": str(self.tls.client_key)})
        return env

    def settings(self, token: str | None = None) -> ConsulSettings:
        tls = self.tls
        return ConsulSettings(http_addr=self.addr, token=token, ssl=bool(tls), cacert=str(tls.ca) if tls else None,
                              client_cert=str(tls.client_cert) if tls else None,
                              client_key=str(tls.client_key) if tls else None)

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    def api(self) -> ConsulAPI:
        return ConsulAPI(self.settings(self.token))

    def start(self, timeout: float = 30.0) -> None:
        argv = [self.binary, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
                "-dns-port", "-1", "-grpc-port", "-1",
                "-serf-lan-port", str(self.serf_lan_port), "-serf-wan-port", str(self.serf_wan_port),
                "-server-port", str(self.server_port), "-node", "consul-test", "-log-level", "warn"]
        hcl = self.config_hcl + (self.tls.agent_hcl(self.http_port) if self.tls else "")
        if self.tls is None:
            argv += ["-http-port", str(self.http_port)]  # a flag would override the HCL's ports
        if hcl:
            (self.workdir / "agent.hcl").write_text(hcl)
            argv += ["-config-file", str(self.workdir / "agent.hcl")]
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
        except BaseException:
            self.stop()  # a fixture whose start fails never reaches its own cleanup
            raise
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
        kill_group(self.proc)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stops the agent (SIGKILL), waits `down_for` seconds, starts it again on the same ports."""
        self.stop()
        time.sleep(down_for)
        self.start()



@dataclass
class ConsulTLS:
    """A CA and certificates made by `consul tls` for one test: the agent serves HTTPS only on its HTTP
    port and verifies client certificates (verify_incoming)."""
    dir: Path

    @classmethod
    def create(cls, binary: str, workdir: Path) -> "ConsulTLS":
        workdir.mkdir(parents=True, exist_ok=True)
        for args in (["ca", "create"], ["cert", "create", "-server", "-additional-ipaddress", "127.0.0.1"],
                     ["cert", "create", "-client"]):
            subprocess.run([binary, "tls", *args], cwd=workdir, check=True, capture_output=True, timeout=60)
        return cls(workdir)

    ca = property(lambda self: self.dir / "consul-agent-ca.pem")
    client_cert = property(lambda self: self.dir / "dc1-client-consul-0.pem")
    client_key = property(lambda self: self.dir / "dc1-client-consul-0-key.pem")

    def agent_hcl(self, port: int) -> str:
        return (f'ports {{ http = -1, https = {port} }}\nverify_incoming = true\nverify_outgoing = true\n'
                f'ca_file = "{self.ca}"\ncert_file = "{self.dir / "dc1-server-consul-0.pem"}"\n'
                f'key_file = "{self.dir / "dc1-server-consul-0-key.pem"}"\n')


def acl_hcl(master_token: str) -> str:
    """Agent configuration for ACLs in default-deny mode; the master token is the agent's token too."""
    return ('acl {\n  enabled = true\n  default_policy = "deny"\n  enable_token_persistence = true\n'
            f'  tokens {{\n    master = "{master_token}"\n    agent = "{master_token}"\n  }}\n}}\n')


# ---- the real engine (tests/sglang, scripts/bench_real.py) ----------------------------------------------
# The CPU kernels from ../shared are two months older than SGLang 0.5.23: their intel_amx attention ops
# take fewer arguments than 0.5.23 passes, so attention runs on torch_native (the other AMX ops are used).
CPU_ENGINE_ARGS = "--attention-backend torch_native --disable-overlap-schedule --max-total-tokens 4096"


def make_tiny_model(sglang_python: str, out: Path) -> Path:
    """A seeded random-weights Llama with its own tokenizer (tests/sglang/tiny_model.py) in `out`."""
    subprocess.run([sglang_python, str(ROOT / "tests" / "sglang" / "tiny_model.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    return out


def real_env(sglang_python: str, model: Path) -> dict[str, str]:
    """Settings of a supervisor running the real SGLang engine on CPU, with small delays."""
    return {
        "FLEET_ENGINE": "sglang", "FLEET_DEVICE": "cpu", "FLEET_ENGINE_PYTHON": sglang_python,
        "FLEET_MODEL_PATH": str(model), "FLEET_SGLANG_ARGS": CPU_ENGINE_ARGS, "HF_HUB_OFFLINE": "1",
        "FLEET_LOG_FORMAT": "json", "FLEET_NET_PROFILE": "ethernet", "FLEET_BACKOFF_BASE": "0.5",
        "FLEET_BACKOFF_MAX": "2", "FLEET_STOP_GRACE": "20", "FLEET_READY_TIMEOUT": "300",
        "FLEET_START_ATTEMPTS": "1", "FLEET_DRAIN_TIMEOUT": "30", "TOKENIZERS_PARALLELISM": "false",
    }


# ---- node supervisors ---------------------------------------------------------------------------------
_addr_seq = itertools.count(0)


def next_loopback() -> str:
    """127.0.0.2, 127.0.0.3, ... then 127.0.1.2, ... (127.0.0.1 is Consul's)."""
    n = next(_addr_seq)
    return f"127.0.{n // 250}.{n % 250 + 2}"


# The sim engine, with small delays so restarts and failures play out in seconds on a 2-core machine.
SIM_ENV = {
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
    shm: set[str] = field(default_factory=set)

    @property
    def addr(self) -> str:
        return self.env["FLEET_ADVERTISE_ADDR"]

    @property
    def http_url(self) -> str:
        return f"http://{self.addr}:{self.env['FLEET_HTTP_PORT']}"

    @property
    def health_url(self) -> str:
        """The supervisor's own /livez /readyz /metrics (it listens on every interface)."""
        return f"http://{self.addr}:{self.env['FLEET_HEALTH_PORT']}"

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
        self.shm |= shm_files_of(list(self.descendants))  # the real engine's /dev/shm files, cleaned at the end

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
        remove_files(self.shm)  # what SIGKILLed engines cannot unlink themselves


class Supervisors:
    """Starts node supervisors for one test and kills whatever is left of them afterwards."""

    def __init__(self, consul: ConsulAgent, cluster: str, workdir: Path, base_env: Mapping[str, str] = SIM_ENV):
        self.consul = consul
        self.cluster = cluster
        self.workdir = workdir
        self.base_env = dict(base_env)
        self.started: list[Supervisor] = []

    def env_for(self, name: str, **overrides: Any) -> dict[str, str]:
        addr = next_loopback()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLEET_", "CONSUL_", "SGLANG_FLEET_"))}
        env.update(self.base_env)
        env.update(self.consul.client_env())
        env.update({
            "FLEET_CLUSTER": self.cluster,
            "FLEET_NODE_NAME": name,
            "FLEET_ADVERTISE_ADDR": addr,
            "FLEET_HTTP_PORT": str(free_port(addr)),
            "FLEET_DIST_PORT": str(free_port(addr)),
            "FLEET_BOOTSTRAP_PORT": str(free_port(addr)),
            "FLEET_HEALTH_PORT": str(free_port("0.0.0.0")),  # the default 9400 would collide between supervisors
            "NO_PROXY": "*", "no_proxy": "*",
        })
        env.update({k: str(v) for k, v in overrides.items() if v is not None})
        return env

    def start(self, name: str, cwd: Path | None = None, fleet_bin: Path = FLEET_BIN, engine_args: tuple[str, ...] = (),
              **env_overrides: Any) -> Supervisor:
        """Starts `sglang-fleet node [-- engine_args]` (`fleet_bin`, default this venv's) as `name` (in `cwd`,
        default the workdir). Keyword args are env vars (FLEET_GROUP="g", ...)."""
        env = self.env_for(name, **env_overrides)
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(fleet_bin), "node", *(("--", *engine_args) if engine_args else ())], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(cwd or self.workdir))
        sup = Supervisor(name, env, log_path, proc)
        self.started.append(sup)
        return sup

    def group(self, group: str, nnodes: int, names: list[str] | None = None, **env: Any) -> list[Supervisor]:
        names = names or [f"{group}-n{i}" for i in range(nnodes)]
        return [self.start(n, FLEET_GROUP=group, FLEET_NNODES=nnodes, FLEET_TP_SIZE=nnodes, **env)
                for n in names]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_until; a timeout also shows why: every supervisor's exit status and log tail."""
        try:
            return wait_until(predicate, timeout, what)
        except AssertionError as exc:
            tails = "\n".join(f"--- {s.name} (exit status {s.proc.poll()}) log tail ---\n{s.tail()}"
                              for s in self.started)
            raise AssertionError(f"{exc}\n{tails}") from None

    def cleanup(self) -> None:
        for sup in self.started:
            sup.cleanup()




CLIENT_TIMEOUT = 20.0  # every request through the router has a deadline: an outage must not hang a client


def http(method: str, url: str, body=None, timeout: float = CLIENT_TIMEOUT, key: str | None = None,
         tls: ssl.SSLContext | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))
    try:
        with opener.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except (urllib.error.URLError, OSError):
        return False


_router_seq = itertools.count(1)


class Router:
    """`sglang-fleet router` as a process, with its smg on 127.0.0.1."""

    def __init__(self, consul_addr: str, cluster: str, workdir: Path, port: int | None = None,
                 prom_port: int | None = None, **env):
        self.port, self.prom_port = port or free_port(), prom_port or free_port()
        self.health_port = int(env.get("FLEET_HEALTH_PORT") or free_port("0.0.0.0"))
        self.health_url = f"http://127.0.0.1:{self.health_port}"
        # With FLEET_ROUTER_TLS_CERT smg serves HTTPS; the harness reads it without verifying (tests that
        # are about the certificate verify it themselves).
        self.tls = None
        if env.get("FLEET_ROUTER_TLS_CERT"):
            self.tls = ssl.create_default_context()
            self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.log_path = workdir / f"router-{self.port}-{next(_router_seq)}.log"  # a port may be used again
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
        self.env.update({"FLEET_ROLE": "router", "CONSUL_HTTP_ADDR": consul_addr, "FLEET_CLUSTER": cluster,
                         "FLEET_NODE_NAME": f"router-{self.port}", "FLEET_ROUTER_HOST": "127.0.0.1",
                         "FLEET_ROUTER_PORT": str(self.port), "FLEET_ROUTER_PROMETHEUS_PORT": str(self.prom_port),
                         "FLEET_HEALTH_PORT": str(self.health_port),
                         "FLEET_LOG_FORMAT": "json", "FLEET_BACKOFF_BASE": "0.2", "FLEET_BACKOFF_MAX": "2",
                         "NO_PROXY": "*", "no_proxy": "*"})
        self.env.update({k: str(v) for k, v in env.items()})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(FLEET_BIN), "router"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def events(self, contains: str) -> list[dict]:
        return [r for r in self.records() if contains in str(r.get("event", ""))]

    def tail(self, n: int = 25) -> str:
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "smg_output" not in ln]
        return "\n".join(lines[-n:])

    def admin_key(self) -> str | None:
        """smg's control-plane admin key, as the agent keeps it for `status` on this host."""
        return read_admin_key(self.port)

    def workers(self) -> list[dict]:
        status, body = http("GET", self.url + "/workers", timeout=5, key=self.admin_key(), tls=self.tls)
        assert status == 200, body
        return body["workers"]

    def ready_urls(self, worker_type: str | None = None) -> set[str]:
        return {w["url"] for w in self.workers()
                if w.get("status") == "ready" and (worker_type is None or w["worker_type"] == worker_type)}

    def wait_workers(self, predicate, what: str, timeout: float = 60.0):
        try:
            return wait_until(lambda: predicate(self.workers()), timeout, what, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- router log tail ---\n{self.tail()}") from None

    def smg_pid(self) -> int:
        return self.events("smg is answering")[-1]["pid"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        finally:
            self.kill()

    def kill(self) -> None:
        for pid in (self.proc.pid,):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for rec in self.events("smg is answering"):
            try:
                os.killpg(rec["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        admin_key_path(self.port).unlink(missing_ok=True)  # what a killed agent leaves

