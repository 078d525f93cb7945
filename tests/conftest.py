"""Shared by every tier.

- Each test starts with structlog unconfigured: `cli.main` configures structlog once per process onto the
  sys.stdout of that moment; under pytest that is a capture buffer that is closed after the test, so a
  later test that logs would write to a closed file.
- The fixtures of the tiers that run real processes (integration, sglang), built on tests/fleet_processes.py:
  `consul_agent` (module-scoped) and `fresh_consul_agent` (per test), `cluster_name` (unique per test),
  `supervisor_env` (the settings every supervisor starts with; the sim here, the real engine in
  tests/sglang), `supervisors` and `make_supervisors(agent)` (a `Supervisors` factory, everything it
  started is SIGKILLed at teardown), `start_router(**env)`, `consul_api`, `wait`, and `chaos_env` (a
  tests/fleet_chaos.py ScenarioEnv: the Consul outage scenarios, everything they start killed at teardown).
- `wheel_fleet_bin`: `sglang-fleet` of the project's wheel installed in a fresh venv (once per session).
  Import plain helpers from tests/fleet_testing.py or tests/fleet_processes.py, never
  `from conftest import ...`: pytest re-imports every non-package conftest.py under the same module name.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable, Iterator

import pytest
import structlog

from fleet_processes import SIM_ENV, ConsulAgent, Router, Supervisors, consul_binary
from fleet_chaos import ScenarioEnv
from fleet_testing import install_wheel, wait_until
from sglang_fleet import logs
from sglang_fleet.consul_api import ConsulAPI


@pytest.fixture(autouse=True)
def _fresh_structlog():
    yield
    structlog.reset_defaults()
    logs._configured = False


@pytest.fixture(scope="session")
def wheel_fleet_bin(tmp_path_factory) -> Path:
    return install_wheel(tmp_path_factory.mktemp("wheel"))


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


@pytest.fixture
def supervisor_env() -> dict[str, str]:
    """The settings every supervisor of a tier starts with: the sim here; tests/sglang overrides it."""
    return dict(SIM_ENV)


@pytest.fixture
def supervisors(consul_agent, cluster_name, tmp_path, supervisor_env) -> Iterator[Supervisors]:
    sups = Supervisors(consul_agent, cluster_name, tmp_path, supervisor_env)
    try:
        yield sups
    finally:
        sups.cleanup()


@pytest.fixture
def make_supervisors(cluster_name, tmp_path, supervisor_env) -> Iterator[Callable[[ConsulAgent], Supervisors]]:
    """For tests on their own agent: `sups = make_supervisors(fresh_consul_agent)`; cleaned up after."""
    made: list[Supervisors] = []

    def make(agent: ConsulAgent) -> Supervisors:
        made.append(Supervisors(agent, cluster_name, tmp_path, supervisor_env))
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


@pytest.fixture
def start_router(consul_agent, cluster_name, tmp_path):
    routers: list[Router] = []

    def start(consul=None, **env) -> Router:
        routers.append(Router((consul or consul_agent).addr, cluster_name, tmp_path, **env))
        return routers[-1]

    yield start
    for r in routers:
        r.kill()


@pytest.fixture
def chaos_env(consul_bin, tmp_path, cluster_name) -> Iterator[ScenarioEnv]:
    env = ScenarioEnv(consul_bin, tmp_path, cluster_name)
    with env.stack:
        yield env
