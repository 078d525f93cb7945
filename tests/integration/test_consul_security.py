"""sglang-fleet against a locked-down Consul: ACLs in default-deny mode and HTTPS only with client
certificates (verify_incoming), both made at test time with Consul's own commands.

- The shipped policies (sglang_fleet/data/acl/node.hcl, router.hcl), created with `consul acl policy create` and
  `consul acl token create` as docs/security.md tells an operator: a 2-node group forms, registers and is
  routed; one node reads its token from CONSUL_HTTP_TOKEN_FILE; no token reaches the logs or the engine.
- Each mistake gives exit 78 and one line naming the variable and, for ACLs, the right that is missing:
  no token, the router's token on a node, the node's token on a router, an unknown token, a wrong CA,
  plain HTTP to the HTTPS port.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from fleet_processes import ConsulAgent, ConsulTLS, Router, acl_hcl, http
from fleet_testing import FLEET_BIN
from sglang_fleet import access

pytestmark = pytest.mark.integration
EX_CONFIG = 78
AGENT_NODE = "consul-test"  # ConsulAgent's -node: where the supervisors' sessions live


@pytest.fixture(scope="module")
def secure_consul(consul_bin, tmp_path_factory):
    """One agent with ACLs (default deny) and HTTPS only, verifying client certificates."""
    workdir = tmp_path_factory.mktemp("secure-consul")
    master = str(uuid.uuid4())
    agent = ConsulAgent(consul_bin, workdir, config_hcl=acl_hcl(master),
                        tls=ConsulTLS.create(consul_bin, workdir / "tls"), token=master)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def consul_cli(agent: ConsulAgent, *args: str, stdin: str | None = None) -> str:
    """The consul CLI as an operator runs it, with Consul's own variables (master token)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")},
           **agent.client_env(agent.token)}
    done = subprocess.run([agent.binary, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_token(agent: ConsulAgent, role: str, cluster: str) -> str:
    """`sglang-fleet acl-policy`'s rendering of sglang_fleet/data/acl/<role>.hcl, created as docs/security.md says."""
    name = f"sglang-fleet-{role}-{cluster}"
    policy = subprocess.run([str(FLEET_BIN), "acl-policy", role, "--cluster", cluster, "--consul-node", AGENT_NODE],
                            capture_output=True, text=True, check=True, timeout=30).stdout
    assert access.rules(policy), policy
    consul_cli(agent, "acl", "policy", "create", "-name", name, "-rules", "-", stdin=policy)
    out = consul_cli(agent, "acl", "token", "create", "-policy-name", name, "-format", "json")
    return json.loads(out)["SecretID"]


def run_to_exit(command: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CONSUL_"))}
    return subprocess.run([str(FLEET_BIN), command], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_group_forms_registers_and_is_routed_with_the_shipped_policies(secure_consul, make_supervisors,
                                                                      cluster_name, tmp_path):
    node_token = make_token(secure_consul, "node", cluster_name)
    router_token = make_token(secure_consul, "router", cluster_name)
    token_file = tmp_path / "node-token"
    token_file.write_text(node_token + "\n")
    token_file.chmod(0o600)

    sups = make_supervisors(secure_consul)
    group = [sups.start("acl-n0", FLEET_GROUP="acl", FLEET_NNODES=2, FLEET_TP_SIZE=2,
                        CONSUL_HTTP_TOKEN=node_token),
             sups.start("acl-n1", FLEET_GROUP="acl", FLEET_NNODES=2, FLEET_TP_SIZE=2,
                        CONSUL_HTTP_TOKEN_FILE=str(token_file))]
    router = Router(secure_consul.addr, cluster_name, tmp_path, FLEET_ROUTER_MODE="regular",
                    **secure_consul.client_env(router_token))
    try:
        router.wait_workers(lambda ws: any(w["status"] == "ready" for w in ws),
                            "the router to route the group found in the locked-down Consul", timeout=90)
        status, answer = http("POST", router.url + "/generate",
                              {"text": "through ACLs and TLS", "sampling_params": {"max_new_tokens": 4}})
        assert status == 200, answer
        assert "sglang-fleet sim engine" in answer["text"]
        serving = [s for s in group if s.events("registered serving service")]
        assert len(serving) == 1, "rank 0 registered the group"

        for secret in (node_token, router_token, secure_consul.token):
            for sup in group:
                assert secret not in sup.text(), f"a token is in {sup.name}'s log"
                for pid in sup.engine_pids():
                    assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
            assert secret not in router.log_path.read_text()
    finally:
        router.stop()


@pytest.mark.parametrize("case", ["no token", "router token on a node", "node token on a router",
                                  "unknown token", "wrong CA", "plain HTTP"])
def test_each_mistake_is_one_line_and_exit_78(case, secure_consul, consul_bin, cluster_name, tmp_path):
    env = {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "sim/x", "FLEET_CLUSTER": cluster_name,
           "FLEET_NODE_NAME": "mistake", "FLEET_ADVERTISE_ADDR": "127.0.0.2", **secure_consul.client_env()}
    command, expected = "node", []
    if case == "no token":
        expected = ["no CONSUL_HTTP_TOKEN is set", f'key:write on "sglang-fleet/{cluster_name}/"',
                    "session:write on the Consul agent's node"]
    elif case == "router token on a node":
        env["CONSUL_HTTP_TOKEN"] = make_token(secure_consul, "router", cluster_name)
        expected = ["CONSUL_HTTP_TOKEN lacks", f'key:write on "sglang-fleet/{cluster_name}/"',
                    'service:write on "sglang-fleet-member"', "sglang-fleet acl-policy node"]
    elif case == "node token on a router":
        command = "router"
        env.update(FLEET_ROLE="router", CONSUL_HTTP_TOKEN=make_token(secure_consul, "node", cluster_name))
        expected = ["CONSUL_HTTP_TOKEN lacks", 'service:write on "sglang-router"', 'node:read on ""']
    elif case == "unknown token":
        env["CONSUL_HTTP_TOKEN"] = str(uuid.uuid4())
        expected = ["Consul does not know the token in CONSUL_HTTP_TOKEN"]
    elif case == "wrong CA":
        env["CONSUL_CACERT"] = str(ConsulTLS.create(consul_bin, tmp_path / "other-ca").ca)
        expected = ["TLS to Consul failed", "CONSUL_CACERT must name the CA"]
    elif case == "plain HTTP":
        env = {k: v for k, v in env.items() if not k.startswith(("CONSUL_HTTP_SSL", "CONSUL_CA", "CONSUL_CLIENT"))}
        expected = ["Consul serves HTTPS only: set CONSUL_HTTP_SSL=true"]

    done = run_to_exit(command, env)
    assert done.returncode == EX_CONFIG, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sglang-fleet: ")
    for part in expected:
        assert part in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_token_file_and_token_together_is_a_configuration_error(tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text("abc")
    done = run_to_exit("node", {"FLEET_ENGINE": "sim", "FLEET_MODEL_PATH": "sim/x",
                                "CONSUL_HTTP_TOKEN": "abc", "CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert done.returncode == EX_CONFIG
    assert f"CONSUL_HTTP_TOKEN_FILE={str(token_file)!r}: CONSUL_HTTP_TOKEN is set too" in done.stderr
    assert "abc" not in done.stderr.replace(str(token_file), "")
