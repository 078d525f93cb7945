"""Consul breaks while sim groups serve through the router (issue 11): a real 3-server cluster with a
client agent, a persistent single server, a -dev agent. Requests flow through the router all the time;
each scenario counts engine restarts, generations and failed requests (tests/fleet_chaos.py).

Where no engine dies, the target is no engine restart, the same generation, no failed request and a
router worker list that never lacks a group: the members re-attach to the same generation when Consul
returns (issue 11 item 1, docs/protocol.md "Re-attach after a Consul outage"). With a real death (a
member killed while a -dev agent is down), the group that lost a member leaves its generation once
Consul is back (today's protocol), and only that group. A replacement started during that outage: the
other group is untouched, but requests may fail while the router holds the dead group's old URL
until the group passes again at its replacement's address (REPLACEMENT_XFAIL, router side).

The outage the Done-when names (single server killed 20 s, the nodes on it) is in
tests/integration/test_consul_outage.py; here the same server is killed 60 s, and 20 s with the nodes
on a client agent.
"""
from __future__ import annotations

import pytest

from fleet_chaos import (OutageResult, check_untouched, client_agent_restarted,
                         dev_agent_restarted_empty, leader_killed, member_dies_during_outage, quorum_lost,
                         single_server_killed)

pytestmark = pytest.mark.chaos


def test_single_server_killed_20s_nodes_on_a_client_agent(chaos_env):
    check_untouched(single_server_killed(chaos_env, 20, nodes_on_client=True))


def test_single_server_killed_60s(chaos_env):
    check_untouched(single_server_killed(chaos_env, 60))


def test_leader_killed_election(chaos_env):
    check_untouched(leader_killed(chaos_env))


def test_two_of_three_servers_killed_30s(chaos_env):
    check_untouched(quorum_lost(chaos_env, 30))


def test_client_agent_of_the_nodes_restarted(chaos_env):
    check_untouched(client_agent_restarted(chaos_env))


def test_dev_agent_restarted_empty(chaos_env):
    check_untouched(dev_agent_restarted_empty(chaos_env))


def check_death(result: OutageResult, dead_group: str = "a") -> None:
    """Today's protocol for the group that lost a member: once Consul is back its survivor leaves the
    generation and joins one again (a -dev agent restarts the count at 0, so the number may repeat)."""
    assert result.generations_joined[dead_group], f"group {dead_group} did not leave its generation: {result}"


def test_member_killed_during_the_outage_ends_only_its_group(chaos_env):
    result = member_dies_during_outage(chaos_env)
    check_death(result)
    check_untouched(result, ["b"])


# Measured with re-attach: group b untouched, but 13 requests failed (404/400) while the router's outage
# hold kept group a's old URL, whose engine had stopped. The hold now lets go of it once group a passes
# at its new address; until then (the group re-forming) the old URL is still held and may fail requests.
REPLACEMENT_XFAIL = pytest.mark.xfail(strict=False, raises=AssertionError,
                                      reason="the router's outage hold keeps a URL while its group re-forms")


@REPLACEMENT_XFAIL
def test_replacement_started_during_the_outage(chaos_env):
    result = member_dies_during_outage(chaos_env, replacement=True)
    check_death(result)
    assert "a" in result.serving_after and result.time_to_recover_s is not None, \
        f"group a did not serve again with its replacement: {result}"
    check_untouched(result, ["b"])

