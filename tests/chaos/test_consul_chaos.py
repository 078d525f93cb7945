"""Consul breaks while sim groups serve through the router (issue 11): a real 3-server cluster with a
client agent, a persistent single server, a -dev agent. Requests flow through the router all the time;
each scenario counts engine restarts, generations and failed requests (tests/fleet_chaos.py).

Where no engine dies, the target is no engine restart, the same generation, no failed request and a
router worker list that never lacks a group: the members re-attach to the same generation when Consul
returns (issue 11 item 1, docs/protocol.md "Re-attach after a Consul outage"). With a real death (a
member killed while a -dev agent is down), the group that lost a member leaves its generation once
Consul is back (today's protocol), and only that group. A replacement started during that outage: the
other group is untouched, and the router lets go of the dead group's old URL once the group passes again
at its replacement's address (router_state.OutageHold).

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


def test_replacement_started_during_the_outage(chaos_env):
    result = member_dies_during_outage(chaos_env, replacement=True)
    check_death(result)
    assert "a" in result.serving_after and result.time_to_recover_s is not None, \
        f"group a did not serve again with its replacement: {result}"
    check_untouched(result, ["b"])

