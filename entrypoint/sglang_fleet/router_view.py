"""What each router of a cluster routes to, beside what Consul says is passing (for `sglang-fleet status`).

`router_view(api, cfg)` finds the routers through their `sglang-router` registrations, asks each smg for
its workers (with FLEET_ROUTER_ADMIN_KEY, else, for a router on this host, the key its agent keeps in
smg_client.admin_key_path(port); a router elsewhere answers 401 and that is shown) and compares them with the passing `sglang` services of the cluster; every difference is a
sentence in `differences`. `format_router_view(view)` turns it into lines for a terminal.
"""
from __future__ import annotations

import os
import socket
import ssl
from typing import Any

from sglang_fleet import contract
from sglang_fleet.config import FleetConfig
from sglang_fleet.smg_client import SmgClient, SmgError, read_admin_key


def _compare(desired, workers, cluster: str, mode: str | None) -> list[str]:
    from sglang_fleet.router_state import ROLE_BY_MODE
    roles = ROLE_BY_MODE.get(mode or "", ("prefill", "decode", "regular"))
    by_url = {w.url: w for w in workers}
    diffs = []
    for d in desired:
        if d.worker_type not in roles:
            diffs.append(f"{d.url} ({d.worker_type}, group {d.group}) passes in Consul but this router runs in "
                         f"{mode} mode and does not route it")
            continue
        w = by_url.get(d.url)
        if w is None:
            diffs.append(f"{d.url} ({d.worker_type}, group {d.group}) passes in Consul but the router does not "
                         f"list it")
        elif w.worker_type != d.worker_type:
            diffs.append(f"{d.url}: router has it as {w.worker_type}, Consul as {d.worker_type}")
        elif w.draining:
            diffs.append(f"{d.url} ({d.worker_type}) passes in Consul but the router is draining it")
        elif not w.is_healthy:
            diffs.append(f"{d.url} ({d.worker_type}) passes in Consul but the router marks it unhealthy")
    wanted = {d.url for d in desired}
    for w in workers:
        if w.managed_by(cluster) and w.url not in wanted and not w.draining:
            diffs.append(f"{w.url} ({w.worker_type}) is routed but no longer passes in Consul")
    return diffs


def _on_this_host(host: str) -> bool:
    """The key file of a router on this host is never sent to a router elsewhere that uses the same port: an
    address is this host's when a socket can be bound to it."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def _tls(cfg: FleetConfig) -> ssl.SSLContext:
    """The admin key goes only to a router whose certificate checks out: against the system's CAs, and on
    the router's own host against its certificate (FLEET_ROUTER_TLS_CERT)."""
    ctx = ssl.create_default_context()
    if cfg.router_tls_cert and os.access(cfg.router_tls_cert, os.R_OK):
        ctx.load_verify_locations(cfg.router_tls_cert)
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)  # a leaf certificate as the anchor
    return ctx


def router_view(api, cfg: FleetConfig, timeout: float = 3.0) -> dict[str, Any]:
    """{"cluster", "consul": [passing services], "routers": [{"id", "url", "mode", "passing", "error",
    "workers": [...], "unmanaged": [...], "differences": [...]}], "ok"}. Raises ConsulError when Consul
    cannot be read (status reports that itself)."""
    from sglang_fleet.contract import ROUTER_SERVICE, SERVING_SERVICE, cluster_tag
    from sglang_fleet.router_state import desired_from_services
    tag = cluster_tag(cfg.cluster)
    _, services = api.health_service(SERVING_SERVICE, tag=tag, passing=True)
    desired, problems = desired_from_services(services, cfg.cluster)
    _, routers = api.health_service(ROUTER_SERVICE, tag=tag, passing=False)
    view: dict[str, Any] = {"cluster": cfg.cluster, "problems": problems, "routers": [],
                            "consul": [{"url": d.url, "worker_type": d.worker_type, "group": d.group,
                                        "generation": d.generation, "bootstrap_port": d.bootstrap_port}
                                       for d in desired]}
    for entry in routers:
        svc, node = entry.get("Service") or {}, entry.get("Node") or {}
        host = svc.get("Address") or node.get("Address") or "127.0.0.1"
        meta = svc.get("Meta") or {}
        scheme = "https" if meta.get(contract.META_SCHEME) == "https" else "http"
        url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{svc.get('Port')}"
        mode = meta.get("mode")
        passing = all(c.get("Status") == "passing" for c in entry.get("Checks") or [])
        rv: dict[str, Any] = {"id": svc.get("ID"), "url": url, "mode": mode, "passing": passing, "error": None,
                              "workers": [], "unmanaged": [], "differences": []}
        try:
            key = cfg.router_admin_key or (read_admin_key(int(svc.get("Port") or 0)) if _on_this_host(host) else None)
            workers = SmgClient(url, key, timeout, tls=_tls(cfg) if scheme == "https" else None).list_workers()
        except SmgError as e:
            rv["error"] = str(e)
            rv["differences"].append(f"router {url} cannot be asked for its workers: {e}")
        else:
            for w in workers:
                item = {"id": w.id, "url": w.url, "worker_type": w.worker_type, "status": w.status,
                        "healthy": w.is_healthy, "bootstrap_port": w.bootstrap_port,
                        "group": w.labels.get("sglang-fleet/group"),
                        "generation": w.labels.get("sglang-fleet/generation")}
                (rv["workers"] if w.managed_by(cfg.cluster) else rv["unmanaged"]).append(item)
            rv["differences"] = _compare(desired, workers, cfg.cluster, mode)
        view["routers"].append(rv)
    # No router registered is not a fault (a cluster may serve without one); a router that differs is.
    view["ok"] = not any(r["differences"] for r in view["routers"])
    return view


def format_router_view(view: dict[str, Any]) -> str:
    lines = [f"routers of cluster {view['cluster']}:"]
    if not view["routers"]:
        lines.append("  (no sglang-router registered)")
    for r in view["routers"]:
        state = "passing" if r["passing"] else "NOT passing"
        lines.append(f"  {r['id']} at {r['url']} ({r['mode'] or '?'} mode, {state}): "
                     f"{len(r['workers'])} managed worker(s), {len(r['unmanaged'])} added by hand")
        for w in r["workers"] + r["unmanaged"]:
            owner = f"group {w['group']} gen {w['generation']}" if w["group"] else "added by hand"
            lines.append(f"    {w['worker_type']:<8} {w['url']:<28} {w['status']:<9} "
                         f"{'healthy' if w['healthy'] else 'unhealthy':<9} {owner}")
        for d in r["differences"]:
            lines.append(f"    ! {d}")
    for p in view.get("problems") or []:
        lines.append(f"  ! {p}")
    return "\n".join(lines)


__all__ = ["format_router_view", "router_view"]
