"""smg's worker API over HTTP (urllib only): list, add, replace and remove workers.

What smg 1.13 does, as seen on a live `smg launch` (see docs/configuration.md, "Router"):
- `GET /workers` -> `{"workers": [{"id", "url", "worker_type", "bootstrap_port", "labels", "status",
  "is_healthy", ...}], "total", "stats"}`. A worker whose addition is still running is NOT listed.
- `POST /workers` with `{"url", "worker_type", "bootstrap_port", "labels"}` -> 202 and a `worker_id`
  (a UUID); the addition runs in the background (probes /health, /v1/models, /server_info ...).
  The same URL again -> 409 (`WORKER_ALREADY_EXISTS` or `WORKER_CREATE_IN_PROGRESS`).
- `PUT /workers/{id}` with the same body replaces the worker in place (same id) -> 202.
- `DELETE /workers/{id}` -> 202; the worker shows `status: "draining"` for a few seconds (smg's drain
  settle time), is no longer routed to, then disappears. An id that is not a UUID -> 400.
- With `--api-key`, every route except the probes (/health, /liveness, /readiness) wants
  `Authorization: Bearer <key>`.
- With `--control-plane-api-keys id:name:admin:<key>`, `/workers` takes only that admin key (401 without a
  key, 401/403 with another, the client key included). The router agent starts smg with a key of its own and
  keeps it in `admin_key_path(port)` (0600) for `sglang-fleet status` on the same host.
- smg hands the client's bearer token on to the worker, else its own `--api-key`, else the `api_key` given
  for the worker at `POST /workers`; so the client key and the engines' key must be one key.
"""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sglang_fleet import secret_files
from sglang_fleet.contract import LABEL_CLUSTER, MANAGED_BY, MANAGED_VALUE


class SmgError(Exception):
    """smg did not answer, or answered with an error we cannot act on."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class SmgConflict(SmgError):
    """409: a worker with that URL exists or is being added already."""


@dataclass(frozen=True)
class RouterWorker:
    """One worker as smg lists it."""

    id: str
    url: str
    worker_type: str
    bootstrap_port: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    status: str = "ready"
    is_healthy: bool = True

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> "RouterWorker":
        port = raw.get("bootstrap_port")
        return cls(id=str(raw.get("id", "")), url=str(raw.get("url", "")),
                   worker_type=str(raw.get("worker_type") or "regular"),
                   bootstrap_port=int(port) if port not in (None, "") else None,
                   labels=dict(raw.get("labels") or {}), status=str(raw.get("status") or "ready"),
                   is_healthy=bool(raw.get("is_healthy", True)))

    @property
    def draining(self) -> bool:
        return self.status == "draining"

    def managed_by(self, cluster: str | None) -> bool:
        """True for a worker this appliance added for `cluster` (any cluster when None)."""
        if self.labels.get(MANAGED_BY) != MANAGED_VALUE:
            return False
        return cluster is None or self.labels.get(LABEL_CLUSTER) == cluster


class SmgClient:
    """Talks to one smg. Thread-safe (no shared connection state). `api_key`: the control-plane admin key for
    /workers; `tls`: the SSL context for an https:// smg."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.tls = tls

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self.tls) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as e:
            payload = _decode(e.read())
            code = payload.get("code") if isinstance(payload, dict) else None
            text = payload.get("error") if isinstance(payload, dict) else payload
            if isinstance(text, dict):  # OpenAI-style {"error": {"message": ...}}
                text = text.get("message")
            msg = f"smg {method} {path}: HTTP {e.code}: {text or e.reason}"
            if e.code == 409:
                raise SmgConflict(msg, e.code, code) from None
            raise SmgError(msg, e.code, code) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise SmgError(f"smg {method} {path}: {reason}") from None

    def alive(self, timeout: float = 2.0) -> bool:
        """smg's own liveness probe answers 200 (no API key needed)."""
        try:
            status, _ = self._request("GET", "/liveness", timeout=timeout)
            return status == 200
        except SmgError:
            return False

    def list_workers(self) -> list[RouterWorker]:
        _, payload = self._request("GET", "/workers")
        if not isinstance(payload, dict) or not isinstance(payload.get("workers"), list):
            raise SmgError(f"smg GET /workers: unexpected answer {str(payload)[:200]!r}")
        return [RouterWorker.from_api(w) for w in payload["workers"] if isinstance(w, dict)]

    def add_worker(self, body: Mapping[str, Any]) -> str:
        """Queues the addition; returns smg's worker id. SmgConflict if the URL is known already."""
        _, payload = self._request("POST", "/workers", dict(body))
        return str((payload or {}).get("worker_id", "")) if isinstance(payload, dict) else ""

    def replace_worker(self, worker_id: str, body: Mapping[str, Any]) -> None:
        self._request("PUT", f"/workers/{worker_id}", dict(body))

    def remove_worker(self, worker_id: str) -> None:
        self._request("DELETE", f"/workers/{worker_id}")


# ---- the admin key on this host ------------------------------------------------------------------------
def admin_key_path(port: int) -> Path:
    """Where the router agent listening on `port` keeps smg's admin key while it runs."""
    return secret_files.runtime_path(f"sglang-fleet-router-{port}.admin-key")


def write_admin_key(port: int, key: str) -> Path:
    """The key, 0600, at admin_key_path(port) (secret_files.write_private). OSError when impossible."""
    return secret_files.write_private(admin_key_path(port), key + "\n")


def read_admin_key(port: int) -> str | None:
    """The admin key of the router agent on this host at `port`, or None (no agent here, or not readable)."""
    return secret_files.read_private(admin_key_path(port))


def remove_admin_key(port: int, key: str) -> None:
    """Removes the key file if it still holds `key` (not a newer agent's)."""
    if read_admin_key(port) == key:
        secret_files.remove(admin_key_path(port))


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()


__all__ = [
    "RouterWorker", "SmgClient", "SmgConflict", "SmgError", "admin_key_path", "read_admin_key", "remove_admin_key",
    "write_admin_key",
]
