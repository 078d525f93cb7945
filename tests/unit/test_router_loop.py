"""router.py's loop, one part at a time (the whole agent against real Consul and smg: tests/integration/test_router.py)."""
from __future__ import annotations

from sglang_fleet import consul_api as ca
from sglang_fleet.config import load_config
from sglang_fleet.router import RouterAgent


def test_watch_asks_afresh_after_a_consul_error():
    """A failed blocking query is retried with index 0, not the old index (docs/protocol.md "Blocking queries")."""
    cfg = load_config({"FLEET_ROLE": "router", "FLEET_BACKOFF_BASE": "0"})
    sent: list[int] = []

    class FlakyConsul:
        def __init__(self, settings):
            pass

        def health_service(self, name, tag=None, passing=True, index=0, wait="10s"):
            sent.append(index)
            if len(sent) == 2:
                raise ca.ConsulUnavailable("health_service: 500 No cluster leader")
            if len(sent) == 3:
                agent.stop()
            return 500, []

    agent = RouterAgent(cfg, smg=object(), consul_factory=FlakyConsul)
    agent._watch()
    assert sent == [0, 500, 0]
