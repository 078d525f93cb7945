"""Who may talk to the router and the engines (docs/security.md), with real Consul, real smg and the sim
engine (which makes SGLang 0.5.23's key checks):

- smg's worker API takes only the router agent's admin key: a foreign `POST /workers` (no key, or the
  client key) and a `DELETE` are refused and the worker list stays as it was, while the agent keeps adding
  groups; `sglang-fleet status` on the router's host reads the list with the key the agent keeps (0600),
  which is gone once the agent stops.
- Engine keys: a request straight to an engine without FLEET_ENGINE_API_KEY is refused and with it served;
  the admin route wants the admin key; requests through the router with the client key (= the engine key)
  are served end to end; the drain reads the engine's load with the key; the keys reach neither the logs,
  nor the engine's command line, nor the disk once the engine is ready.
- The router's HTTPS listener (FLEET_ROUTER_TLS_CERT/KEY): verified with the CA, checked by Consul, read by
  `status`.
- Mistakes: a router key that differs from the engine key, half a TLS pair, a reserved flag: exit 78, one
  line, nothing started.
"""
from __future__ import annotations

import http.client as http_client
import json
import os
import ssl
import subprocess

import pytest

from fleet_processes import ConsulTLS, http
from fleet_testing import FLEET_BIN, wait_until
from sglang_fleet.launch import key_config
from sglang_fleet.config import load_config
from sglang_fleet.smg_client import admin_key_path

pytestmark = pytest.mark.integration
EX_CONFIG = 78
ENGINE_KEY = "engine-key-5f1c2a"
ADMIN_KEY = "engine-admin-key-9b7e"
GENERATE = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}


def status_json(env: dict[str, str]) -> dict:
    proc = subprocess.run([str(FLEET_BIN), "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ENGINE_KEY not in proc.stdout
    return json.loads(proc.stdout)


def test_locked_router_and_keyed_engines_end_to_end(supervisors, start_router, cluster_name):
    keys = {"FLEET_ENGINE_API_KEY": ENGINE_KEY, "FLEET_ENGINE_ADMIN_API_KEY": ADMIN_KEY}
    first = supervisors.start("key-a", FLEET_ROLE="regular", FLEET_GROUP="key-a", **keys)
    router = start_router(FLEET_ROUTER_MODE="regular", FLEET_ENGINE_API_KEY=ENGINE_KEY,
                          FLEET_ROUTER_RESYNC_INTERVAL="1")
    router.wait_workers(lambda ws: first.http_url in {w["url"] for w in ws if w["status"] == "ready"},
                        "the agent to add the keyed group", timeout=90)
    key_file = admin_key_path(router.port)
    assert key_file.stat().st_mode & 0o777 == 0o600
    # Once up, smg has renamed itself: its keys are not in the process table.
    control_key = router.admin_key()
    smg_cmdline = open(f"/proc/{router.smg_pid()}/cmdline", "rb").read().decode(errors="replace")
    assert control_key not in smg_cmdline and ENGINE_KEY not in smg_cmdline, smg_cmdline

    # A request straight to the engine: refused without the key, served with it; probes stay open.
    assert http("POST", first.http_url + "/generate", GENERATE)[0] == 401
    assert http("POST", first.http_url + "/generate", GENERATE, key="wrong")[0] == 401
    status, body = http("POST", first.http_url + "/generate", GENERATE, key=ENGINE_KEY)
    assert status == 200, body
    assert http("GET", first.http_url + "/health")[0] == 200
    # The admin route wants the admin key; the API key does not open it.
    assert http("POST", first.http_url + "/flush_cache", {}, key=ENGINE_KEY)[0] == 401
    assert http("POST", first.http_url + "/flush_cache", {}, key=ADMIN_KEY)[0] == 200

    # Through the router: the client key is the engine key; smg hands it on to the engine.
    assert http("POST", router.url + "/generate", GENERATE)[0] == 401
    status, body = http("POST", router.url + "/generate", GENERATE, key=ENGINE_KEY)
    assert status == 200, body

    # Foreign calls of the worker API change nothing.
    before = router.workers()
    intruder = {"url": "http://127.0.0.1:9", "worker_type": "regular"}
    for key in (None, ENGINE_KEY, "guess"):
        status, body = http("POST", router.url + "/workers", intruder, key=key)
        assert status in (401, 403), (key, status, body)
        status, body = http("DELETE", f"{router.url}/workers/{before[0]['id']}", key=key)
        assert status in (401, 403), (key, status, body)
        assert http("GET", router.url + "/workers", key=key)[0] in (401, 403)
    assert router.workers() == before

    # The agent still adds groups with its own key.
    second = supervisors.start("key-b", FLEET_ROLE="regular", FLEET_GROUP="key-b", **keys)
    router.wait_workers(lambda ws: {first.http_url, second.http_url} <= {w["url"] for w in ws if w["status"] == "ready"},
                        "the agent to add the second keyed group", timeout=90)
    assert "http://127.0.0.1:9" not in {w["url"] for w in router.workers()}

    # `status` on the router's host: smg's workers read with the key the agent keeps.
    [view] = status_json(dict(router.env))["routers"]["routers"]
    assert {w["url"] for w in view["workers"]} == {first.http_url, second.http_url}
    assert view["error"] is None and view["differences"] == [], view

    # The keys: not left on disk once the engine is ready, not on its command line, not in any log.
    engine_keys, _ = key_config(load_config(first.env))
    assert not engine_keys.exists()
    for pid in first.engine_pids():
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        assert ENGINE_KEY not in cmdline and ADMIN_KEY not in cmdline

    # A graceful stop drains with the key: the engine's load is read, not "unreadable".
    first.terminate()
    assert first.wait_exit() == 0
    assert first.events("drained: no requests in flight"), first.tail()
    assert router.stop() == 0
    assert not key_file.exists()  # removed on the way out
    for log in (first.text(), second.text(), router.log_path.read_text()):
        assert ENGINE_KEY not in log and ADMIN_KEY not in log and control_key not in log
    assert router.events("starting smg")[0]["argv"].count("***") >= 2  # --api-key, --control-plane-api-keys


def test_router_serves_https_checked_by_consul_and_read_by_status(supervisors, start_router, consul_api,
                                                                   consul_bin, cluster_name, tmp_path):
    tls = ConsulTLS.create(consul_bin, tmp_path / "tls")  # a CA and a certificate for 127.0.0.1
    cert, key = tls.dir / "dc1-server-consul-0.pem", tls.dir / "dc1-server-consul-0-key.pem"
    group = supervisors.start("tls-a", FLEET_ROLE="regular", FLEET_GROUP="tls-a")
    router = start_router(FLEET_ROUTER_MODE="regular", FLEET_ROUTER_TLS_CERT=str(cert), FLEET_ROUTER_TLS_KEY=str(key))
    router.wait_workers(lambda ws: group.http_url in {w["url"] for w in ws if w["status"] == "ready"},
                        "the agent to add the group over HTTPS", timeout=90)

    verified = ssl.create_default_context(cafile=str(tls.ca))
    url = f"https://127.0.0.1:{router.port}"
    assert http("GET", url + "/liveness", tls=verified)[0] == 200
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # and it is this certificate
        http("GET", url + "/liveness", tls=ssl.create_default_context())
    status, body = http("POST", url + "/generate", GENERATE, tls=verified)
    assert status == 200, body
    with pytest.raises((OSError, http_client.HTTPException)):  # plain HTTP is not served (a TLS alert)
        http("GET", f"http://127.0.0.1:{router.port}/liveness", timeout=5)

    # Consul's check of the router speaks HTTPS; its registration says so.
    def passing():
        _, entries = consul_api.health_service("sglang-router", tag=f"cluster:{cluster_name}", passing=True)
        return entries
    [entry] = wait_until(passing, 30, "the router's HTTPS check to pass")
    assert entry["Service"]["Meta"]["scheme"] == "https"

    # status verifies the router's certificate (FLEET_ROUTER_TLS_CERT on its host) before sending the key.
    [view] = status_json(dict(router.env))["routers"]["routers"]
    assert view["url"] == url and view["error"] is None, view
    assert [w["url"] for w in view["workers"]] == [group.http_url]
    assert router.stop() == 0


def run_to_exit(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    return subprocess.run([str(FLEET_BIN), command], env={**base, "FLEET_NODE_NAME": "n", **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command, env, expected", [
    ("router", {"FLEET_ROUTER_API_KEY": "client-key-1", "FLEET_ENGINE_API_KEY": "engine-key-2"},
     "FLEET_ROUTER_API_KEY: differs from FLEET_ENGINE_API_KEY"),
    ("router", {"FLEET_ROUTER_TLS_CERT": "/etc/hostname"},
     "FLEET_ROUTER_TLS_CERT='/etc/hostname': FLEET_ROUTER_TLS_KEY is not set"),
    ("node", {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "sim/m", "FLEET_SGLANG_ARGS": "--api-key engine-key-2"},
     "FLEET_SGLANG_ARGS: --api-key is set by sglang-fleet; use FLEET_ENGINE_API_KEY"),
])
def test_key_and_tls_mistakes_exit_78_with_one_line_and_start_nothing(consul_agent, command, env, expected):
    port = "18123"
    proc = run_to_exit(command, {"FLEET_ROLE": "router" if command == "router" else "regular",
                                 "FLEET_ROUTER_PORT": port, **consul_agent.client_env(), **env})
    assert proc.returncode == EX_CONFIG, proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("  - ")]
    assert len(problems) == 1 and expected in problems[0], proc.stderr
    assert "Traceback" not in proc.stderr and "engine-key-2" not in proc.stderr and "client-key-1" not in proc.stderr
    assert not admin_key_path(int(port)).exists()  # no agent started
