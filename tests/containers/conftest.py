"""Container tier fixtures. See containers_support.py for the `Demo` vocabulary.

- `docker_client`: the Docker SDK client (kill, stop, network disconnect, logs); builds the images with
  scripts/images when one is missing.
- `demo` (function-scoped): compose/demo.yml under a project name of its own, router and Consul
  published on 127.0.0.1 at free ports; `@pytest.mark.demo_env(KEY=value)` adds environment for compose.
  Torn down (containers, network) whatever the outcome; when the test failed, every container's log
  is printed first, one section per container (Demo.dump_logs; FLEET_CT_DUMP_LOGS=1: always).
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from containers_support import CONSUL_IMAGE, FLEET_IMAGE, ROOT, Demo, _has_image

@pytest.fixture(scope="session")
def docker_client():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the container tier needs a Docker engine (scripts/install-docker): {exc}")
    missing = [img for img in (FLEET_IMAGE, CONSUL_IMAGE) if not _has_image(client, img)]
    if missing:
        subprocess.run([str(ROOT / "scripts" / "images")], check=True)
    yield client
    client.close()


@pytest.fixture
def demo(docker_client, monkeypatch, request):
    from testcontainers.compose import DockerCompose

    project = f"fleet-ct-{uuid.uuid4().hex[:8]}"

    class ProjectCompose(DockerCompose):
        @property
        def compose_command_property(self) -> list[str]:
            return ["docker", "compose", "-p", project, "-f", str(ROOT / "compose" / "demo.yml")]

    monkeypatch.setenv("FLEET_DEMO_PORT", "")  # "127.0.0.1::8000": a free port
    monkeypatch.setenv("FLEET_DEMO_CONSUL_PORT", "")
    monkeypatch.setenv("FLEET_DEMO_LOG_FORMAT", "json")
    monkeypatch.setenv("FLEET_IMAGE", FLEET_IMAGE)
    monkeypatch.setenv("FLEET_CONSUL_IMAGE", CONSUL_IMAGE)
    marker = request.node.get_closest_marker("demo_env")
    for key, value in (marker.kwargs if marker else {}).items():
        monkeypatch.setenv(key, str(value))

    compose = ProjectCompose(context=str(ROOT), wait=False)
    compose.start()
    running = None
    try:
        running = Demo(compose, docker_client, project)
        yield running
    finally:
        failed = getattr(request.node, "rep_call_failed", False)
        if running is not None and (failed or os.environ.get("FLEET_CT_DUMP_LOGS") == "1"):
            # Every container's own log (nodes too, not only the last lines of an interleaved stream).
            print(f"\n---- logs of every container of {project} ({'the test failed' if failed else 'FLEET_CT_DUMP_LOGS=1'}) ----")
            print(running.dump_logs())
        subprocess.run(["docker", "compose", "-p", project, "-f", str(ROOT / "compose" / "demo.yml"),
                        "down", "--volumes", "--remove-orphans", "--timeout", "20"],
                       capture_output=True, check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        item.rep_call_failed = True


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.containers)


def pytest_configure(config):
    config.addinivalue_line("markers", "demo_env(**env): environment for compose/demo.yml in this test")
