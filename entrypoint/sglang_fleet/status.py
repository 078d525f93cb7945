"""`sglang-fleet status [--json]`: what Consul says about one cluster.

For every group: its generation, members (rank, node, address, heartbeat health), nodes waiting without
a rank, the leader (dist-init) address, the serving registration and its health, and why the previous
generation ended. Then what each router routes to (router_view.py).

Exit status, for schedulers and scripts: 0 healthy, 1 degraded (`problems` says why), 2 Consul could not
be read (unreachable, or it refused the token).
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
HEALTHY, DEGRADED, CONSUL_UNREADABLE = 0, 1, 2


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


def problems(data: dict[str, Any]) -> list[str]:
    """Why the cluster is not healthy: every group must serve (its registration passing, all its ranks
    claimed with passing heartbeats, no FATAL node) and every router must route what Consul says."""
    found: list[str] = []
    if not data["groups"]:
        found.append(f"cluster {data['cluster']} has no group")
    for g in data["groups"]:
        name = g["group"]
        serving = g["serving"]
        if not serving:
            found.append(f"group {name}: not serving (no serving registration)")
        elif serving["health"] != "passing":
            found.append(f"group {name}: serving registration is {serving['health']}")
        if g["nnodes"] is not None and len(g["members"]) < g["nnodes"]:
            found.append(f"group {name}: {len(g['members'])} of {g['nnodes']} ranks claimed")
        found += [f"group {name}: rank {m['rank']} ({m['node']}) heartbeat {m['heartbeat']}"
                  for m in g["members"] if m["heartbeat"] != "passing"]
        found += [f"group {name}: node {f.get('node')} is FATAL: {f.get('reason')}" for f in g.get("fatal") or []]
    routers = data.get("routers") or {}
    if "error" in routers:
        found.append(routers["error"])
    elif not routers.get("ok", True):
        found += [d for r in routers["routers"] for d in r["differences"]]
    return found


def assess(data: dict[str, Any]) -> dict[str, Any]:
    """Adds the verdict to `data`: "problems" (empty when healthy) and "ok"."""
    data["problems"] = problems(data)
    data["ok"] = not data["problems"]
    return data


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
    if "ok" in data:
        lines.append("healthy" if data["ok"] else "DEGRADED: " + "; ".join(data["problems"]))
    return "\n".join(lines)


def run(cfg: FleetConfig, as_json: bool = False) -> int:
    """Prints the cluster's state; returns HEALTHY, DEGRADED or CONSUL_UNREADABLE (the exit status)."""
    api = ca.ConsulAPI(cfg.consul)
    try:
        data = collect(api, cfg.cluster)
        try:
            data["routers"] = router_view.router_view(api, cfg)
        except ca.ConsulError:
            raise
        except Exception as exc:  # noqa: BLE001 - status must work without a router
            data["routers"] = {"error": f"router view unavailable: {exc}"}
    except ca.ConsulError as exc:
        print(f"sglang-fleet status: cannot read Consul at {api.address}: {exc}", file=sys.stderr)
        return CONSUL_UNREADABLE
    finally:
        api.close()
    assess(data)
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else format_text(data))
    return HEALTHY if data["ok"] else DEGRADED
