"""rendezvous.py's writes and reads against a real Consul agent: the contract tests
(tests/rendezvous_contract.py) that tests/unit/test_rendezvous.py runs over the fake."""
from __future__ import annotations

import pytest

from rendezvous_contract import *  # noqa: F401,F403 - the contract tests, run here against Consul
from sglang_fleet.contract import cluster_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def store(consul_api):
    return consul_api


@pytest.fixture
def cluster(cluster_name, consul_api):
    yield cluster_name
    consul_api.kv_delete_tree(cluster_prefix(cluster_name))


@pytest.fixture
def check_id(consul_api, cluster):
    """A passing TTL check to bind sessions to (the heartbeat's part), long enough for one test;
    deregistering it at the end invalidates the sessions bound to it."""
    cid = f"contract-{cluster}"
    consul_api.register_service("sglang-fleet-contract-test", cid, address="127.0.0.1",
                                checks=[{"CheckID": cid, "TTL": "5m", "Status": "passing"}])
    yield cid
    consul_api.deregister_service(cid)

