"""Issue 11's reproduction, the Done-when of its item 1: a persistent single-server Consul (state kept on
disk) killed for 20 s while a 2-node sim group serves through the router, the nodes and the router
talking to that server. The target: the engines' PIDs and the generation unchanged afterwards, no failed
request, and the router's worker list never without the group: the members re-attach to the same
generation when Consul returns (docs/protocol.md "Re-attach after a Consul outage"). The other
outages are in the chaos tier (tests/chaos), on the same scenario code (tests/fleet_chaos.py)."""
from __future__ import annotations

import pytest

from fleet_chaos import check_untouched, single_server_killed

pytestmark = pytest.mark.integration


def test_single_server_killed_20s_while_a_2_node_group_serves(chaos_env):
    check_untouched(single_server_killed(chaos_env, 20))
