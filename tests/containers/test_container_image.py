"""The image on its own: configuration errors stop the container with 78 before anything starts."""
from __future__ import annotations

import pytest
from testcontainers.core.container import DockerContainer

from containers_support import FLEET_IMAGE, wait_until


def run_to_exit(docker_client, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    container = DockerContainer(FLEET_IMAGE)
    for key, value in env.items():
        container.with_env(key, value)
    container.start()
    try:
        wrapped = container.get_wrapped_container()
        wait_until(lambda: (wrapped.reload(), wrapped.status == "exited")[1], timeout, "the container to exit")
        logs = wrapped.logs().decode(errors="replace")
        return wrapped.attrs["State"]["ExitCode"], logs
    finally:
        container.stop()  # removes it


@pytest.mark.parametrize("env, problem", [
    ({"FLEET_ROLE": "prefill", "FLEET_MODEL_PATH": "m", "FLEET_NNODES": "two"},
     "FLEET_NNODES='two': expected a whole number"),
    ({"FLEET_ROLE": "gpu-node"}, "FLEET_ROLE='gpu-node': must be one of"),
    ({"FLEET_ROLE": "router", "FLEET_ROUTER_PORT": "99999"},
     "FLEET_ROUTER_PORT=99999: must be a port number between 1 and 65535"),
], ids=["node-bad-number", "unknown-role", "router-bad-port"])
def test_bad_configuration_exits_78_with_one_line_per_problem(docker_client, env, problem):
    code, logs = run_to_exit(docker_client, env)
    print(logs)
    assert code == 78
    assert any(problem in line for line in logs.splitlines()), logs
    assert "Traceback" not in logs
    assert "supervisord" not in logs and "spawned" not in logs  # nothing was started


def test_cpu_image_runs_the_sim_engine_as_an_unprivileged_user(docker_client):
    out = docker_client.containers.run(FLEET_IMAGE, ["sh", "-c", "id -u; echo $FLEET_ENGINE; sglang-fleet --version"],
                                       remove=True).decode()
    uid, engine, version = out.split("\n")[:3]
    assert uid != "0"
    assert engine == "sim"
    assert version.startswith("sglang-fleet ")


def test_container_arguments_are_engine_flags_checked_like_fleet_sglang_args(docker_client):
    """`docker run IMAGE --flag value` (how LWS and SGLang's own manifests pass engine flags): a reserved flag
    is exit 78 naming the setting to use; other flags reach `sglang-fleet node --` under supervisord."""
    base = {"FLEET_ROLE": "regular", "FLEET_MODEL_PATH": "m", "CONSUL_HTTP_ADDR": "127.0.0.1:1"}
    reserved = DockerContainer(FLEET_IMAGE).with_command(["--port", "31000"])
    for key, value in base.items():
        reserved.with_env(key, value)
    reserved.start()
    try:
        wrapped = reserved.get_wrapped_container()
        wait_until(lambda: (wrapped.reload(), wrapped.status == "exited")[1], 60, "the container to exit")
        logs = wrapped.logs().decode(errors="replace")
        assert wrapped.attrs["State"]["ExitCode"] == 78, logs
        assert "--port is set by sglang-fleet; use FLEET_HTTP_PORT" in logs and "Traceback" not in logs
    finally:
        reserved.stop()

    passed = DockerContainer(FLEET_IMAGE).with_command(["--mem-fraction-static", "0.85", "--enable-metrics"])
    for key, value in base.items():
        passed.with_env(key, value)
    passed.start()
    try:
        wrapped = passed.get_wrapped_container()

        def node_argv():
            found = wrapped.exec_run(["python3", "-c", "import glob\nfor p in glob.glob('/proc/[0-9]*/cmdline'):\n"
                                      "    a = open(p, 'rb').read().split(b'\\0')\n"
                                      "    if b'node' in a and any(b'sglang-fleet' in x for x in a): "
                                      "print(' '.join(x.decode() for x in a if x))"]).output.decode()
            return found.strip()
        argv = wait_until(node_argv, 60, "`sglang-fleet node` to run under supervisord")
        assert argv.endswith("node -- --mem-fraction-static 0.85 --enable-metrics"), argv
        wrapped.reload()
        assert wrapped.status == "running"  # waiting for Consul, not "exec: --: invalid option"
    finally:
        passed.stop()
