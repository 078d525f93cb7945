"""`sglang-fleet status [--json]`: what Consul says about one cluster.

For every group: its generation, members (rank, node, address, heartbeat health), nodes waiting without
a rank, the leader (dist-init) address, the serving registration and its health, and why the previous
generation ended. Then what each router routes to (router_view.py).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from sglang_fleet import consul_api as ca
from sglang_fleet import contract
from sglang_fleet import rendezvous as rdv
from sglang_fleet import router_view
from sglang_fleet.config import FleetConfig

WORST = ("critical", "warning", "maintenance", "passing")


def _health(checks: list[dict]) -> str:
    states = {c.get("Status", "critical") for c in checks}
    for s in WORST:
        if s in states:
            return s
    return "unknown"


def collect(api: ca.ConsulAPI, cluster: str) -> dict[str, Any]:
    """Everything `status` shows, as plain data (also the --json output)."""
    prefix = contract.cluster_prefix(cluster)
    _, entries = api.kv_get_tree(prefix)
    _, member_entries = api.health_service(contract.MEMBER_SERVICE, tag=contract.cluster_tag(cluster), passing=False)
    _, serving_entries = api.health_service(contract.SERVING_SERVICE, tag=contract.cluster_tag(cluster), passing=False)

    heartbeats: dict[str, dict] = {}  # (group, node) -> member service entry
    for e in member_entries:
        meta = e["Service"].get("Meta") or {}
        heartbeats[f"{meta.get('group')}/{meta.get('node')}"] = {
            "health": _health(e.get("Checks") or []), "addr": e["Service"].get("Address") or "",
            "group": meta.get("group"), "node": meta.get("node")}
    serving: dict[str, dict] = {}
    for e in serving_entries:
        svc = e["Service"]
        meta = svc.get("Meta") or {}
        serving[str(meta.get("group"))] = {
            "id": svc["ID"], "role": meta.get("role"), "address": svc.get("Address"), "port": svc.get("Port"),
            "url": f"http://{svc.get('Address')}:{svc.get('Port')}", "generation": _int(meta.get("generation")),
            "model": meta.get("model"), "bootstrap_port": _int(meta.get("bootstrap_port")),
            "health": _health(e.get("Checks") or []),
            "checks": {c.get("Name") or c.get("CheckID"): c.get("Status") for c in e.get("Checks") or []
                       if c.get("ServiceID")}}

    names = sorted({e.key[len(prefix):].split("/", 1)[0] for e in entries}
                   | {h["group"] for h in heartbeats.values() if h["group"]} | set(serving))
    groups = []
    for name in names:
        keys = contract.Keys(cluster, name)
        view = rdv.parse_view(keys, 0, [e for e in entries if e.key.startswith(keys.prefix)])
        members = []
        for r in sorted(view.members):
            m = view.members[r]
            hb = heartbeats.get(f"{name}/{m.node}", {})
            members.append({"rank": r, "node": m.node, "addr": m.addr, "heartbeat": hb.get("health", "missing")})
        ranked = {m["node"] for m in members}
        waiting = [{"node": h["node"], "addr": h["addr"], "heartbeat": h["health"]}
                   for h in heartbeats.values() if h["group"] == name and h["node"] not in ranked]
        nnodes = next((m.fingerprint.get("nnodes") for m in view.members.values() if m.fingerprint), None)
        last_ended = None
        if view.ended:
            g = max(view.ended)
            last_ended = {"generation": g, **dict(view.ended[g])}
        fatal_prefix = keys.fatal_prefix
        fatal = sorted((e.json() or {"node": e.key[len(fatal_prefix):], "reason": e.text}
                        for e in entries if e.key.startswith(fatal_prefix)), key=lambda f: str(f.get("node")))
        groups.append({
            "group": name, "generation": view.generation, "nnodes": nnodes, "members": members, "fatal": fatal,
            "waiting": sorted(waiting, key=lambda w: str(w["node"])),
            "leader": dict(view.leader) if view.leader else None,
            "serving": serving.get(name), "last_ended": last_ended,
        })
    return {"cluster": cluster, "consul": api.address, "groups": groups}


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def format_text(data: dict[str, Any]) -> str:
    lines = [f"cluster {data['cluster']} (Consul {data['consul']}): {len(data['groups'])} group(s)"]
    for g in data["groups"]:
        leader = (g["leader"] or {}).get("dist_init_addr") or "none"
        n = g["nnodes"] if g["nnodes"] is not None else "?"
        lines.append(f"group {g['group']}  generation {g['generation']}  members {len(g['members'])}/{n}  "
                     f"leader {leader}")
        for m in g["members"]:
            lines.append(f"  rank {m['rank']}  {m['node']:<20} {m['addr']:<16} heartbeat {m['heartbeat']}")
        for w in g["waiting"]:
            lines.append(f"  no rank {w['node']:<20} {w['addr']:<16} heartbeat {w['heartbeat']} (waiting)")
        for f in g.get("fatal") or []:
            lines.append(f"  FATAL   {f.get('node')}: {f.get('reason')}")
        s = g["serving"]
        if s:
            extra = f" bootstrap_port {s['bootstrap_port']}" if s.get("bootstrap_port") else ""
            lines.append(f"  serving {s['id']} {s['role']} {s['url']}{extra} generation {s['generation']}: "
                         f"{s['health']}")
        else:
            lines.append("  serving: not registered")
        if g["last_ended"]:
            e = g["last_ended"]
            lines.append(f"  generation {e['generation']} ended by {e.get('by')}: {e.get('reason')}")
    routers = data.get("routers")
    if routers:
        lines.append(f"routers: {routers['error']}" if "error" in routers else router_view.format_router_view(routers))
    return "\n".join(lines)


def run(cfg: FleetConfig, as_json: bool = False) -> int:
    api = ca.ConsulAPI(cfg.consul)
    try:
        data = collect(api, cfg.cluster)
    except ca.ConsulError as exc:
        print(f"sglang-fleet status: cannot read Consul at {api.address}: {exc}", file=sys.stderr)
        return 1
    try:
        data["routers"] = router_view.router_view(api, cfg)
    except Exception as exc:  # noqa: BLE001 - status must work without a router
        data["routers"] = {"error": f"router view unavailable: {exc}"}
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else format_text(data))
    api.close()
    return 0
