"""Group rendezvous (docs/protocol.md): generations, rank claims, the leader key, the barrier, fingerprints.

Backend-free protocol logic over a small KV/session interface (`Store`; `consul_api.ConsulAPI` is the
real one). Reading is separated from deciding: `read()` turns the KV tree of one group into an immutable
`GroupView`; pure functions (`barrier`, `fingerprint_mismatches`, `departures`, `rank_order`) look at a
view; the few writes (`ensure_generation`, `claim_rank`, `publish_leader`, `end_generation`) are one
Consul operation each, so the node loop can take one action per cycle.

The key layout (K = sglang-fleet/<cluster>/groups/<group>) is contract.Keys. Both drain keys are written in a txn that checks gen is still G (docs/protocol.md).
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from sglang_fleet import consul_api as ca
from sglang_fleet.config import PER_HOST_ENGINE_FLAGS, FleetConfig
from sglang_fleet.contract import Keys

# Settings every member of a group must agree on (the engine must see the same model and the same
# parallel layout on every rank). sglang_args are compared without the per-host flags.
FINGERPRINT_FIELDS = ("role", "model_path", "engine", "device", "engine_version", "nnodes", "tp_size", "ep_size",
                      "dp_size", "pp_size", "attn_dp", "dp_lm_head", "moe_a2a_backend",
                      "ep_redundant_experts", "sglang_args")

# Causes written into K/g<G>/ended: only LOCAL_FAILURE spends the restart budget of the node that wrote it.
PEER_LEFT = "peer-left"
LOCAL_FAILURE = "local-failure"
STATE_LOST = "state-lost"
SHUTDOWN = "shutdown"


class Store(Protocol):
    """What the rendezvous needs from Consul (consul_api.ConsulAPI provides it)."""

    def kv_get_tree(self, prefix: str, index: int = 0, wait: str = "10s") -> tuple[int, list[ca.KVEntry]]: ...
    def kv_cas(self, key: str, value: bytes | str, index: int) -> None: ...
    def kv_acquire(self, key: str, value: bytes | str, session: str) -> None: ...
    def txn(self, ops: list[dict]) -> list[dict]: ...
    def session_create(self, name: str, checks: list[str], *, lock_delay: int = 0, behavior: str = "delete",
                       ttl: int | None = None) -> str: ...
    def session_destroy(self, session_id: str) -> None: ...


@dataclass(frozen=True)
class Member:
    rank: int
    node: str
    addr: str
    session: str
    fingerprint: Mapping[str, Any] = field(default_factory=dict, compare=False)
    pid: int | None = None
    started: float | None = None


@dataclass(frozen=True)
class GroupView:
    """One read of K/: the current generation, who holds which rank in it, its leader, past endings."""
    index: int
    generation: int | None  # None: K/gen does not exist (new group, or Consul lost its state)
    gen_index: int  # ModifyIndex of K/gen, the fencing token for leader publication and generation end
    members: Mapping[int, Member]  # rank -> holder, current generation only, only keys held by a session
    leader: Mapping[str, Any] | None
    ended: Mapping[int, Mapping[str, Any]]  # generation -> its `ended` record
    draining: Mapping[str, Any] | None = None  # current generation: a member asked rank 0 to drain
    drained: Mapping[str, Any] | None = None  # current generation: rank 0 drained

    def sessions(self) -> dict[int, str]:
        return {r: m.session for r, m in self.members.items()}

    def rank_of(self, session: str | None) -> int | None:
        for r, m in self.members.items():
            if session and m.session == session:
                return r
        return None


@dataclass(frozen=True)
class Assignment:
    """What the barrier hands the engine: immutable for the life of one generation."""
    rank: int
    nnodes: int
    dist_init_addr: str
    generation: int
    members: tuple[Member, ...]

    def sessions(self) -> dict[int, str]:
        return {m.rank: m.session for m in self.members}

    def node_of(self, rank: int) -> str:
        return next((m.node for m in self.members if m.rank == rank), f"rank {rank}")


def parse_view(keys: Keys, index: int, entries: list[ca.KVEntry]) -> GroupView:
    by_key = {e.key: e for e in entries}
    gen_entry = by_key.get(keys.gen)
    generation: int | None = None
    if gen_entry is not None:
        try:
            generation = int(gen_entry.text.strip())
        except ValueError:
            generation = None
    members: dict[int, Member] = {}
    leader = draining = drained = None
    ended: dict[int, Mapping[str, Any]] = {}
    for e in entries:
        rest = e.key[len(keys.prefix):]
        head, _, tail = rest.partition("/")
        if not head.startswith("g") or not head[1:].isdigit():
            continue
        g = int(head[1:])
        if tail == "ended":
            ended[g] = e.json() or {"reason": e.text}
            continue
        if g != generation:
            continue
        if tail == "leader" and e.session:
            leader = e.json() or {}
        elif tail == "draining":
            draining = e.json() or {}
        elif tail == "drained":
            drained = e.json() or {}
        elif tail.startswith("ranks/") and tail[6:].isdigit() and e.session:
            info = e.json() or {}
            members[int(tail[6:])] = Member(
                rank=int(tail[6:]), node=str(info.get("node", "?")), addr=str(info.get("addr", "?")),
                session=e.session, fingerprint=info.get("fingerprint") or {}, pid=info.get("pid"),
                started=info.get("started"))
    return GroupView(index=index, generation=generation, gen_index=gen_entry.modify_index if gen_entry else 0,
                     members=members, leader=leader, ended=ended, draining=draining, drained=drained)


# ---- pure decisions -------------------------------------------------------------------------------------
def engine_version(cfg: FleetConfig) -> str:
    if cfg.engine == "sim":
        from sglang_fleet import __version__
        return f"sim-{__version__}"
    try:
        from importlib.metadata import version
        return version("sglang")
    except Exception:  # noqa: BLE001 - not installed next to the supervisor: the image pins it
        return os.environ.get("SGLANG_VERSION", "unknown")


def fingerprint(cfg: FleetConfig, version: str | None = None) -> dict[str, Any]:
    """The settings that must agree across a group, as plain JSON values."""
    group_args = [[flag, list(v) if isinstance(v, tuple) else v] for flag, v in cfg.sglang_args
                  if flag not in PER_HOST_ENGINE_FLAGS]
    fp: dict[str, Any] = {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS
                          if k not in ("engine_version", "sglang_args")}
    fp["engine_version"] = version if version is not None else engine_version(cfg)
    fp["sglang_args"] = group_args
    return fp


def fingerprint_mismatches(view: GroupView, mine: Mapping[str, Any], me: str,
                           fields: tuple[str, ...] = FINGERPRINT_FIELDS) -> list[str]:
    """One phrase per (other node, field among `fields`) that differs from this node's fingerprint."""
    out = []
    for r in sorted(view.members):
        m = view.members[r]
        if m.node == me:
            continue
        for key in fields:
            theirs, ours = m.fingerprint.get(key), mine.get(key)
            if theirs != ours:
                out.append(f"{m.node} (rank {r}) differs in {key}: {_show(theirs)} there, {_show(ours)} here")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(f"--{f}" + ("" if v is True else f" {v}") for f, v in value) or "(none)"
    return repr(value)


def rank_order(nnodes: int, node_name: str, fixed: int | None = None, prefer_zero: bool = False) -> list[int]:
    """The rank keys to try, in order: only the fixed one; else from 0 (FLEET_RANK0) or from a stable
    hash of the node name, wrapping around."""
    if fixed is not None:
        return [fixed]
    start = 0 if prefer_zero else zlib.crc32(node_name.encode()) % max(nnodes, 1)
    return [(start + i) % nnodes for i in range(nnodes)]


def barrier(view: GroupView, generation: int, nnodes: int) -> tuple[bool, str]:
    """(passed, what is missing): all N ranks held, the leader published, gen still G."""
    if view.generation != generation:
        return False, f"generation moved from {generation} to {view.generation}"
    held = sum(1 for r in range(nnodes) if r in view.members)
    if held < nnodes:
        return False, f"waiting for peers {held}/{nnodes} in generation {generation}"
    if view.leader is None:
        return False, f"waiting for rank 0 ({view.members[0].node}) to publish the leader of generation {generation}"
    return True, f"all {nnodes} ranks present in generation {generation}"


def departures(view: GroupView, assignment: Assignment) -> list[Member]:
    """Members of the barrier snapshot whose rank key is gone or held by another session now."""
    now = view.sessions() if view.generation == assignment.generation else {}
    return [m for m in assignment.members if now.get(m.rank) != m.session]


# ---- the writes (one Consul operation each) ------------------------------------------------------------
class Rendezvous:
    def __init__(self, store: Store, cfg: FleetConfig, node_name: str, advertise_addr: str,
                 version: str | None = None):
        self.store = store
        self.cfg = cfg
        self.node = node_name
        self.addr = advertise_addr
        self.keys = Keys(cfg.cluster, cfg.group or node_name)
        self.fingerprint = fingerprint(cfg, version)

    def read(self, index: int = 0, wait: str = "10s") -> GroupView:
        got, entries = self.store.kv_get_tree(self.keys.prefix, index=index, wait=wait)
        return parse_view(self.keys, got, entries)

    def ensure_generation(self) -> None:
        """Creates K/gen = "0" when absent (cas=0); losing that race is fine."""
        try:
            self.store.kv_cas(self.keys.gen, "0", 0)
        except ca.ConsulConflict:
            pass

    def create_session(self, heartbeat_check_id: str) -> str:
        return self.store.session_create(f"sglang-fleet {self.keys.group} {self.node}",
                                         ["serfHealth", heartbeat_check_id], lock_delay=0, behavior="delete")

    def claim_rank(self, view: GroupView, session: str) -> tuple[int | None, str]:
        """Claims one rank key of the current generation; (rank or None, sentence)."""
        g, n = view.generation, self.cfg.nnodes
        assert g is not None
        mine = view.rank_of(session)
        if mine is not None:  # never hold two ranks
            return mine, f"holding rank {mine} of {n} in generation {g}"
        value = ca.dumps({"node": self.node, "addr": self.addr, "fingerprint": self.fingerprint,
                          "pid": os.getpid(), "started": round(time.time(), 3)})
        order = rank_order(n, self.node, self.cfg.node_rank, self.cfg.rank0)
        for r in order:
            if r in view.members:
                continue
            try:
                self.store.kv_acquire(self.keys.rank(g, r), value, session)
            except ca.ConsulConflict:
                continue
            return r, f"claimed rank {r} of {n} in generation {g}"
        if self.cfg.node_rank is not None:
            holder = view.members.get(self.cfg.node_rank)
            who = holder.node if holder else "another node"
            return None, (f"rank {self.cfg.node_rank} (FLEET_NODE_RANK) is held by {who} in generation {g}; "
                          f"waiting for the next generation")
        return None, f"all {n} ranks of generation {g} are taken; waiting for the next generation"

    def reclaim_rank(self, view: GroupView, member: Member, session: str) -> None:
        """Re-attach: takes back `member`'s own rank key in the same generation with a new session, with the
        record it had (so peers see the same member, not a replacement). Only while gen is still the
        view's and the key is absent: a key somebody else took raises ConsulConflict."""
        g = view.generation
        assert g is not None
        key = self.keys.rank(g, member.rank)
        value = ca.dumps({"node": member.node, "addr": member.addr, "fingerprint": dict(member.fingerprint),
                          "pid": member.pid, "started": member.started})
        self.store.txn([ca.txn_check_index(self.keys.gen, view.gen_index), ca.txn_check_not_exists(key),
                        ca.txn_lock(key, value, session)])

    def recreate_generation(self, generation: int) -> str:
        """Re-attach after Consul lost everything: rank 0 writes K/gen = G back (cas=0: only where nobody
        created it meanwhile) with K/g<G>/recreated naming who did it and with which fingerprint."""
        record = {"by": self.node, "generation": generation, "fingerprint": self.fingerprint,
                  "at": round(time.time(), 3)}
        self.store.txn([ca.txn_cas(self.keys.gen, str(generation), 0),
                        ca.txn_set(self.keys.recreated(generation), ca.dumps(record))])
        return f"Consul lost the group's keys: re-created generation {generation} to re-attach to it"

    def leader_record(self) -> dict[str, Any]:
        return {"dist_init_addr": f"{self.addr}:{self.cfg.dist_port}",
                "url": f"http://{self.addr}:{self.cfg.http_port}",
                "bootstrap_port": self.cfg.bootstrap_port if self.cfg.role == "prefill" else None}

    def publish_leader(self, view: GroupView, session: str) -> str:
        g = view.generation
        self.store.txn([ca.txn_check_index(self.keys.gen, view.gen_index),
                        ca.txn_check_session(self.keys.rank(g, 0), session),
                        ca.txn_lock(self.keys.leader(g), ca.dumps(self.leader_record()), session)])
        return f"published leader {self.addr}:{self.cfg.dist_port} for generation {g}"

    def end_generation(self, view: GroupView, reason: str, cause: str) -> bool:
        """txn [cas gen G->G+1, delete-tree g<G>/ and g<G-1>/, set g<G>/ended]; False: someone was first."""
        g = view.generation
        if g is None:
            return False
        record = {"reason": reason, "by": self.node, "at": round(time.time(), 3), "cause": cause}
        ops = [ca.txn_cas(self.keys.gen, str(g + 1), view.gen_index),
               ca.txn_delete_tree(self.keys.generation(g))]
        if g > 0:
            ops.append(ca.txn_delete_tree(self.keys.generation(g - 1)))  # the previous tombstone
        ops.append(ca.txn_set(self.keys.ended(g), ca.dumps(record)))
        try:
            self.store.txn(ops)
        except ca.ConsulConflict:
            return False
        return True

    def _set_in_generation(self, view: GroupView, key: str, record: dict[str, Any]) -> bool:
        """Writes `key` only while gen is still the view's generation; False: it has moved on."""
        try:
            self.store.txn([ca.txn_check_index(self.keys.gen, view.gen_index), ca.txn_set(key, ca.dumps(record))])
        except ca.ConsulConflict:
            return False
        return True

    def request_drain(self, view: GroupView, rank: int) -> bool:
        """A member > 0 stopping gracefully asks rank 0 to withdraw and drain first (K/g<G>/draining)."""
        assert view.generation is not None
        return self._set_in_generation(view, self.keys.draining(view.generation),
                                       {"by": self.node, "rank": rank, "at": round(time.time(), 3)})

    def confirm_drained(self, view: GroupView, how: str) -> bool:
        """Rank 0 tells the asking member that it has withdrawn and drained (K/g<G>/drained)."""
        assert view.generation is not None
        return self._set_in_generation(view, self.keys.drained(view.generation),
                                       {"by": self.node, "at": round(time.time(), 3), "how": how})

    def assignment(self, view: GroupView, rank: int) -> Assignment:
        assert view.generation is not None and view.leader is not None
        return Assignment(rank=rank, nnodes=self.cfg.nnodes, dist_init_addr=str(view.leader["dist_init_addr"]),
                          generation=view.generation,
                          members=tuple(view.members[r] for r in sorted(view.members)))


__all__ = [
    "Assignment", "GroupView", "Keys", "LOCAL_FAILURE", "Member", "PEER_LEFT", "Rendezvous", "SHUTDOWN",
    "STATE_LOST", "Store", "barrier", "departures", "fingerprint", "fingerprint_mismatches", "parse_view",
    "rank_order",
]
