"""The names sglang-fleet shares through Consul and smg, in one place (docs/protocol.md).

Nodes write them, the router and `status` read them: whoever writes or reads a key, a service, a tag or
a label imports its name from here, never from another daemon module. Names only; no I/O.

KV keys, K = sglang-fleet/<cluster>/groups/<group> (`Keys`):
  K/gen               decimal G; created with cas=0, changed only by CAS
  K/g<G>/ranks/<r>    {"node", "addr", "fingerprint", "pid", "started"}, held with acquire=<session>
  K/g<G>/leader       {"dist_init_addr", "url", "bootstrap_port"}, locked by rank 0 in a txn
  K/g<G>/ended        {"reason", "by", "at", "cause"}, written in the txn that moves gen to G+1
  K/g<G>/draining     {"by", "rank", "at"}: a member > 0 is stopping gracefully and asks rank 0 to drain
  K/g<G>/drained      {"by", "at", "how"}: rank 0 has withdrawn its registration and drained (the asker goes on)
  K/g<G>/recreated    {"by", "generation", "fingerprint", "at"}: rank 0 wrote K/gen back after Consul lost it
  K/fatal/<node>      {"node", "reason", "at"}: why a node gave up (for `status`)
Services: MEMBER_SERVICE (every node's heartbeat), SERVING_SERVICE (rank 0 of a serving group),
ROUTER_SERVICE (each router agent), all tagged `cluster:<cluster>` (`cluster_tag`).
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT_PREFIX = "sglang-fleet"

# Consul services.
MEMBER_SERVICE = "sglang-fleet-member"
SERVING_SERVICE = "sglang"
ROUTER_SERVICE = "sglang-router"

# Service meta keys of the serving registration (the router and `status` read them).
META_CLUSTER = "cluster"
META_GROUP = "group"
META_GENERATION = "generation"
META_ROLE = "role"
META_MODEL = "model"
META_NNODES = "nnodes"
META_TP_SIZE = "tp_size"
META_BOOTSTRAP_PORT = "bootstrap_port"
META_NODE = "node"  # member service
META_MODE = "mode"  # router service
META_SCHEME = "scheme"  # router service: http or https (FLEET_ROUTER_TLS_CERT)

# Labels on the workers a router added to smg. A worker without MANAGED_BY=MANAGED_VALUE is never touched.
MANAGED_BY = "managed-by"
MANAGED_VALUE = "sglang-fleet"
LABEL_CLUSTER = "sglang-fleet/cluster"
LABEL_GROUP = "sglang-fleet/group"
LABEL_GENERATION = "sglang-fleet/generation"
LABEL_SERVICE_ID = "sglang-fleet/service-id"


def cluster_tag(cluster: str) -> str:
    return f"cluster:{cluster}"


def group_tag(group: str) -> str:
    return f"group:{group}"


def cluster_prefix(cluster: str) -> str:
    """Where every group of a cluster keeps its keys."""
    return f"{ROOT_PREFIX}/{cluster}/groups/"


def member_id(cluster: str, group: str, node: str) -> str:
    """The heartbeat service's ID, and its TTL check's."""
    return f"sglang-fleet-{cluster}-{group}-{node}"


def serving_id(cluster: str, group: str) -> str:
    return f"sglang-{cluster}-{group}"


def serving_ttl_check_id(cluster: str, group: str) -> str:
    """The serving service's TTL check, passed by rank 0's heartbeat thread."""
    return serving_id(cluster, group) + "-supervisor"


def router_id(cluster: str, node: str) -> str:
    return f"{ROUTER_SERVICE}-{cluster}-{node}"


@dataclass(frozen=True)
class Keys:
    """The KV keys of one group (the layout in the module docstring)."""
    cluster: str
    group: str

    @property
    def cluster_prefix(self) -> str:
        return cluster_prefix(self.cluster)

    @property
    def prefix(self) -> str:
        return f"{self.cluster_prefix}{self.group}/"

    @property
    def gen(self) -> str:
        return self.prefix + "gen"

    def generation(self, g: int) -> str:
        return f"{self.prefix}g{g}/"

    def rank(self, g: int, r: int) -> str:
        return f"{self.prefix}g{g}/ranks/{r}"

    def leader(self, g: int) -> str:
        return f"{self.prefix}g{g}/leader"

    def ended(self, g: int) -> str:
        return f"{self.prefix}g{g}/ended"

    def recreated(self, g: int) -> str:
        return f"{self.prefix}g{g}/recreated"

    def draining(self, g: int) -> str:
        return f"{self.prefix}g{g}/draining"

    def drained(self, g: int) -> str:
        return f"{self.prefix}g{g}/drained"

    @property
    def fatal_prefix(self) -> str:
        return self.prefix + "fatal/"

    def fatal(self, node: str) -> str:
        """Why `node` gave up (written as it exits FATAL, removed when it starts again): for `status`."""
        return self.fatal_prefix + node


__all__ = [
    "Keys", "LABEL_CLUSTER", "LABEL_GENERATION", "LABEL_GROUP", "LABEL_SERVICE_ID", "MANAGED_BY", "MANAGED_VALUE",
    "MEMBER_SERVICE", "META_BOOTSTRAP_PORT", "META_CLUSTER", "META_GENERATION", "META_GROUP", "META_MODE",
    "META_MODEL", "META_NNODES", "META_NODE", "META_ROLE", "META_SCHEME", "META_TP_SIZE", "ROOT_PREFIX",
    "ROUTER_SERVICE", "SERVING_SERVICE", "cluster_prefix", "cluster_tag", "group_tag", "member_id", "router_id", "serving_id",
    "serving_ttl_check_id",
]
