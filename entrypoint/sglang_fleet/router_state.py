"""The router's pure decisions: Consul's passing services -> desired workers, smg's mode, and the
reconcile (desired, actual) -> (add, remove), and the hold of routed groups across a Consul outage
(`OutageHold`). No I/O here; router.py acts on the answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sglang_fleet.config import NODE_ROLES
from sglang_fleet.contract import (LABEL_CLUSTER, LABEL_GENERATION, LABEL_GROUP, LABEL_SERVICE_ID, MANAGED_BY,
                                   MANAGED_VALUE)
from sglang_fleet.smg_client import RouterWorker

ROLE_BY_MODE = {"pd": ("prefill", "decode"), "regular": ("regular",)}


@dataclass(frozen=True)
class DesiredWorker:
    """One passing serving group as smg should know it."""

    url: str
    worker_type: str
    bootstrap_port: int | None = None
    cluster: str = ""
    group: str = ""
    generation: str = ""
    service_id: str = ""

    def labels(self) -> dict[str, str]:
        return {MANAGED_BY: MANAGED_VALUE, LABEL_CLUSTER: self.cluster, LABEL_GROUP: self.group,
                LABEL_GENERATION: self.generation, LABEL_SERVICE_ID: self.service_id}

    def body(self, api_key: str | None = None) -> dict[str, Any]:
        """The JSON body of POST/PUT /workers; `api_key`: the engines' key, which smg sends the worker."""
        body: dict[str, Any] = {"url": self.url, "worker_type": self.worker_type, "labels": self.labels()}
        if api_key:
            body["api_key"] = api_key
        if self.worker_type == "prefill" and self.bootstrap_port is not None:
            body["bootstrap_port"] = self.bootstrap_port
        return body

    def matches(self, worker: RouterWorker) -> bool:
        """Same server as smg knows it: type, bootstrap port, group and generation agree."""
        port = self.bootstrap_port if self.worker_type == "prefill" else None
        return (worker.url == self.url and worker.worker_type == self.worker_type
                and worker.bootstrap_port == port
                and worker.labels.get(LABEL_GROUP, "") == self.group
                and worker.labels.get(LABEL_GENERATION, "") == self.generation)


def _host(entry: Mapping[str, Any]) -> str:
    svc, node = entry.get("Service") or {}, entry.get("Node") or {}
    host = svc.get("Address") or node.get("Address") or ""
    return f"[{host}]" if ":" in host else host


def desired_from_services(entries: Iterable[Mapping[str, Any]], cluster: str) -> tuple[list[DesiredWorker], list[str]]:
    """Consul health entries -> one DesiredWorker per serving group, plus sentences for entries that
    cannot be used (no address, unknown role, bad bootstrap port)."""
    workers: dict[str, DesiredWorker] = {}
    problems: list[str] = []
    for entry in entries:
        svc = entry.get("Service") or {}
        meta, tags = svc.get("Meta") or {}, svc.get("Tags") or []
        sid = str(svc.get("ID", "?"))
        role = meta.get("role") or next((t for t in tags if t in NODE_ROLES), "")
        host, port = _host(entry), svc.get("Port")
        if role not in NODE_ROLES:
            problems.append(f"service {sid}: no role among {', '.join(NODE_ROLES)} in meta or tags; skipped")
            continue
        if not host or not port:
            problems.append(f"service {sid}: no address or port; skipped")
            continue
        bport = None
        if role == "prefill" and meta.get("bootstrap_port"):
            try:
                bport = int(meta["bootstrap_port"])
            except ValueError:
                problems.append(f"service {sid}: bootstrap_port={meta['bootstrap_port']!r} is not a number; skipped")
                continue
        url = f"http://{host}:{int(port)}"
        if url in workers:
            problems.append(f"service {sid}: {url} is also registered as {workers[url].service_id}; skipped")
            continue
        workers[url] = DesiredWorker(url=url, worker_type=role, bootstrap_port=bport, cluster=cluster,
                                     group=str(meta.get("group", "")), generation=str(meta.get("generation", "")),
                                     service_id=sid)
    return sorted(workers.values(), key=lambda w: w.url), problems


def choose_mode(setting: str, roles: Iterable[str], current: str | None) -> str:
    """smg's mode: the setting when it is pd/regular; for auto, pd unless only regular groups pass.
    With no groups passing, keep what runs (pd at first start)."""
    if setting in ROLE_BY_MODE:
        return setting
    roles = set(roles)
    if not roles:
        return current or "pd"
    return "pd" if roles & {"prefill", "decode"} else "regular"


def reconcile(desired: Iterable[DesiredWorker], actual: Iterable[RouterWorker],
              cluster: str | None = None) -> tuple[list[DesiredWorker], list[RouterWorker]]:
    """(add, remove) that make smg's managed workers equal to `desired`.

    - Workers without our managed label (or of another cluster) are never removed, and a desired URL
      held by such a worker is not added (smg refuses a second worker with the same URL).
    - A managed worker whose type, bootstrap port, group or generation changed is in both lists (the
      caller replaces it in place).
    - A draining worker is already leaving: not removed again; its URL is added once it is gone.
    """
    actual = list(actual)
    by_url = {w.url: w for w in actual}
    want = {d.url: d for d in desired}
    remove = [w for w in actual if w.managed_by(cluster) and not w.draining
              and (w.url not in want or not want[w.url].matches(w))]
    add = []
    for url, d in sorted(want.items()):
        have = by_url.get(url)
        if have is None or (have.managed_by(cluster) and not have.draining and not d.matches(have)):
            add.append(d)
    return add, remove


@dataclass
class OutageHold:
    """Consul's first answers after an outage may be incomplete: rank 0 is re-registering its group, the
    checks of a restarted agent have not run yet, a -dev agent came back empty. Groups that were routed
    when Consul stopped answering stay in smg until Consul lists them as passing again (at any
    generation, at their old URL or a new one), for at most `seconds` after its first answer; then Consul's view rules again
    (docs/protocol.md "Router"). Times are monotonic seconds passed in by the caller."""

    seconds: float
    kept: dict[str, DesiredWorker] = field(default_factory=dict)  # url -> as routed before the outage
    until: float | None = None  # None while Consul has not answered since the outage began

    @property
    def active(self) -> bool:
        return bool(self.kept)

    def consul_lost(self, routed: Iterable[DesiredWorker]) -> None:
        """Consul stopped answering. A second outage inside a hold keeps the first list: Consul has not
        been complete since."""
        if self.seconds <= 0:
            return
        if not self.kept:
            self.kept = {w.url: w for w in routed}
        self.until = None

    def consul_back(self, now: float) -> None:
        if self.kept and self.until is None:
            self.until = now + self.seconds

    def desired(self, desired: list[DesiredWorker], now: float) -> tuple[list[DesiredWorker], str]:
        """`desired` plus the kept groups Consul does not list yet, and a sentence when the hold ends."""
        if not self.kept:
            return desired, ""
        # A group counts as back at its old URL or at a new one (re-formed with a replacement rank 0):
        # its old URL is then not held any more, or requests would go to a node that left it.
        listed = {d.url for d in desired} | {(d.cluster, d.group) for d in desired}
        missing = sorted(u for u, w in self.kept.items() if u not in listed and (w.cluster, w.group) not in listed)
        if self.until is not None and (not missing or now >= self.until):
            self.kept, self.until = {}, None
            if not missing:
                return desired, "every group routed before the Consul outage passes again; hold ended"
            return desired, (f"{', '.join(missing)} still not passing {self.seconds:g} s after Consul answered "
                             "again; hold ended, withdrawing")
        return desired + [self.kept[u] for u in missing], ""


__all__ = ["DesiredWorker", "OutageHold", "ROLE_BY_MODE", "choose_mode", "desired_from_services", "reconcile"]
