"""Consul access: the only module that imports py-consul.

Every call goes through `_boundary`, which turns py-consul's and requests' errors into three kinds the
rest of the appliance reasons about (Patroni `dcs/consul.py` `catch_consul_errors`):

- `ConsulUnavailable`: transport errors, timeouts, 5xx, "No cluster leader", EOF on a blocking query.
  Retry with backoff; never read as a membership change.
- `ConsulConflict`: a failed CAS, lock acquisition or transaction. Somebody else won; re-read.
- `ConsulNotFound`: the agent does not know a check/service we refer to (e.g. after the agent lost its
  state in a restart), or a session we write with was invalidated; the caller re-registers or rejoins.
- `ConsulMisconfigured` (`ConsulDenied`: 403, the token lacks a right; `ConsulTLSFailed`: the TLS
  handshake or scheme is wrong): no retry cures these; nodes and the router exit 78 with the message,
  which names the variable to fix and, for a 403, the right the token lacks (docs/security.md).

Values are bytes in and out of KV; helpers below encode JSON. Blocking queries return `(index, data)`
with the index already sanitised as docs/protocol.md asks (reset to 0 when it goes backwards).
"""
from __future__ import annotations

import base64
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

import consul
import consul.callback
import consul.exceptions
import requests

from sglang_fleet.config import ConsulSettings

# Non-blocking calls give up after this many seconds; blocking queries add their wait (py-consul does).
DEFAULT_TIMEOUT = 5.0


class ConsulError(Exception):
    """Base of every error this module raises."""


class ConsulUnavailable(ConsulError):
    """Consul did not answer usefully (transport, timeout, 5xx, no leader). Retry."""


class ConsulConflict(ConsulError):
    """A CAS, lock or transaction lost: the state is not what the caller assumed."""


class ConsulNotFound(ConsulError):
    """The agent does not know the check or service named (it may have lost its state), or the session
    a write names is gone (invalidated: Consul answers 500 "invalid session", which no retry cures)."""


class ConsulMisconfigured(ConsulError):
    """A configuration problem no retry cures (exit 78): str() is the one line the user sees."""


class ConsulDenied(ConsulMisconfigured):
    """403: the token (CONSUL_HTTP_TOKEN or its file) lacks `right`, or Consul does not know the token."""

    def __init__(self, message: str, right: str = ""):
        super().__init__(message)
        self.right = right


class ConsulTLSFailed(ConsulMisconfigured):
    """TLS to Consul failed (CA, client certificate, or HTTP spoken to an HTTPS port and back)."""


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes | None
    modify_index: int
    session: str | None = None

    def json(self) -> Any:
        """The value decoded as JSON, or None when it is empty or not JSON."""
        if not self.value:
            return None
        try:
            return json.loads(self.value)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        return (self.value or b"").decode("utf-8", "replace")


def _to_entry(raw: dict) -> KVEntry:
    return KVEntry(key=raw["Key"], value=raw.get("Value"), modify_index=int(raw.get("ModifyIndex", 0)),
                   session=raw.get("Session") or None)


def next_index(sent: int, got: Any) -> int:
    """The index for the next blocking query: reset to 0 when Consul's index went backwards
    (leader change, stale read, restarted agent); never below 1 otherwise (Consul's advice)."""
    try:
        got = int(got)
    except (TypeError, ValueError):
        return 0
    if got < sent:
        return 0
    return max(got, 1)


def _classify(exc: BaseException, what: str) -> ConsulError:
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return ConsulTLSFailed(_tls_advice(text))
    if isinstance(exc, consul.exceptions.BadRequest) and "HTTP request to an HTTPS server" in text:
        return ConsulTLSFailed("Consul serves HTTPS only: set CONSUL_HTTP_SSL=true (or CONSUL_HTTP_ADDR=https://...) "
                               "and CONSUL_CACERT")
    if isinstance(exc, requests.exceptions.RequestException) or isinstance(exc, OSError):
        return ConsulUnavailable(f"{what}: {type(exc).__name__}: {_short(text)}")
    if isinstance(exc, consul.exceptions.ClientError) and text.startswith("409"):
        return ConsulConflict(f"{what}: {_short(text)}")
    if isinstance(exc, consul.exceptions.NotFound):
        return ConsulNotFound(f"{what}: {_short(text)}")
    if ("does not have associated TTL" in text or "Unknown check" in text or "Unknown service" in text
            or "invalid session" in text):
        return ConsulNotFound(f"{what}: {_short(text)}")
    if isinstance(exc, consul.ConsulException) and text[:1] == "5":
        return ConsulUnavailable(f"{what}: {_short(text)}")
    if isinstance(exc, consul.ConsulException) and text.startswith("Failed to decode JSON"):
        # A truncated body: the connection broke mid-answer.
        return ConsulUnavailable(f"{what}: {_short(text)}")
    return ConsulError(f"{what}: {type(exc).__name__}: {_short(text)}")


def _tls_advice(text: str) -> str:
    """One line saying which variable to look at for a failed TLS handshake."""
    reason = re.search(r"\[SSL: [A-Z0-9_]+\][^(]*", text)
    reason_text = reason.group(0).strip() if reason else _short(text, 160)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        fix = "CONSUL_CACERT must name the CA that signed Consul's certificate"
    elif "BAD_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text or "UNKNOWN_CA" in text:
        fix = "Consul refused our client certificate: set CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY to one its CA signed"
    elif "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        fix = "Consul does not speak TLS on that port: unset CONSUL_HTTP_SSL or use its HTTPS port"
    else:
        fix = "check CONSUL_CACERT, CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"
    return f"TLS to Consul failed ({reason_text}): {fix}"


def _right_needed(method: str, args: tuple, kwargs: dict) -> str:
    """The ACL right a ConsulAPI call needs, named as Consul's policy language spells it."""
    first = args[0] if args else ""
    if method.startswith("kv_"):
        access = "read" if method in ("kv_get", "kv_get_tree") else "write"
        return f'key:{access} on "{first}"' + (" (key_prefix)" if method.endswith("tree") else "")
    if method == "txn":
        keys = sorted({op.get("KV", {}).get("Key", "") for op in (first or [])})
        return f'key:write on {", ".join(repr(k) for k in keys)}'
    if method in ("register_service",):
        return f'service:write on "{first}"'
    if method in ("deregister_service", "pass_ttl"):
        return f'service:write on the service of "{first}"'
    if method == "health_service":
        return f'service:read on "{first}" and node:read on the nodes it runs on'
    if method.startswith("session_"):
        access = "read" if method == "session_info" else "write"
        return f"session:{access} on the Consul agent's node"
    if method in ("agent_node_name", "agent_services"):
        return "agent:read on the Consul agent's node" if method == "agent_node_name" else "service:read"
    return f"the right {method} needs"


def _denied(exc: BaseException, settings: ConsulSettings, method: str, args: tuple, kwargs: dict) -> ConsulDenied:
    body = _short(str(exc), 120)
    if "ACL not found" in body:
        return ConsulDenied(f"Consul does not know the token in {settings.token_source} (403 ACL not found): "
                            "create it (docs/security.md) or fix the variable")
    right = _right_needed(method, args, kwargs)
    who = (settings.token_source if settings.token else
           "no CONSUL_HTTP_TOKEN is set and the anonymous token")
    return ConsulDenied(f"{who} lacks {right} (Consul answered 403 to {method}); "
                        "see `sglang-fleet acl-policy` and docs/security.md", right=right)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _boundary(method):
    """Converts every error escaping a ConsulAPI method into a ConsulError subclass."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ConsulError:
            raise
        except consul.ACLPermissionDenied as exc:
            raise _denied(exc, self.settings, method.__name__, args, kwargs) from exc
        except (consul.ConsulException, requests.exceptions.RequestException, OSError) as exc:
            raise _classify(exc, method.__name__) from exc

    return wrapper


def _b64(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = value.encode()
    return base64.b64encode(value).decode()


def dumps(obj: Any) -> bytes:
    """Compact, key-sorted JSON (stable bytes for equal content)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# Transaction operations (PUT /v1/txn). Values are encoded here; callers pass bytes or str.
def txn_check_index(key: str, index: int) -> dict:
    return {"KV": {"Verb": "check-index", "Key": key, "Index": int(index)}}


def txn_check_session(key: str, session: str) -> dict:
    return {"KV": {"Verb": "check-session", "Key": key, "Session": session}}


def txn_lock(key: str, value: bytes | str, session: str) -> dict:
    return {"KV": {"Verb": "lock", "Key": key, "Value": _b64(value), "Session": session}}


def txn_check_not_exists(key: str) -> dict:
    return {"KV": {"Verb": "check-not-exists", "Key": key}}


def txn_set(key: str, value: bytes | str) -> dict:
    return {"KV": {"Verb": "set", "Key": key, "Value": _b64(value)}}


def txn_cas(key: str, value: bytes | str, index: int) -> dict:
    return {"KV": {"Verb": "cas", "Key": key, "Value": _b64(value), "Index": int(index)}}


def txn_delete_tree(prefix: str) -> dict:
    return {"KV": {"Verb": "delete-tree", "Key": prefix}}


class ConsulAPI:
    """A thin, error-converting client. Not thread-safe: give each thread its own instance."""

    def __init__(self, settings: ConsulSettings, timeout: float = DEFAULT_TIMEOUT):
        host, port = settings.host_port
        verify: bool | str = settings.cacert or True
        self.settings = settings
        self.address = f"{host}:{port}"
        cert = (settings.client_cert, settings.client_key) if settings.client_cert else None
        self._c = consul.Consul(host=host, port=port, token=settings.token, scheme=settings.scheme,
                                verify=verify, cert=cert, connections_timeout=timeout)
        # py-consul prefers CONSUL_HTTP_TOKEN from os.environ over the token it is given, and some of its
        # calls (agent.self) send no token at all: the settings decide, for every request.
        self._c.token = settings.token
        if settings.token:
            self._c.http.session.headers["X-Consul-Token"] = settings.token

    # ---- status -------------------------------------------------------------------------------------
    @_boundary
    def leader(self) -> str:
        """The raft leader's address, or "" while there is none."""
        return self._c.status.leader() or ""

    @_boundary
    def agent_node_name(self) -> str:
        return self._c.agent.self()["Config"]["NodeName"]

    @_boundary
    def authorize(self, rights: list[tuple[str, str, str]]) -> list[bool] | None:
        """Whether this token holds each (resource, segment, access), e.g. ("key", "sglang-fleet/x/", "write"),
        asked of Consul's own ACL resolver (POST /v1/internal/acl/authorize, the endpoint Consul's UI uses;
        Consul >= 1.7). None when there is nothing to check (ACLs off) or this Consul cannot tell (a 404)."""
        body = [{"Resource": r, "Segment": s, "Access": a} for r, s, a in rights]
        try:
            answer = self._c.http.post(consul.callback.CB.json(), "/v1/internal/acl/authorize",
                                       data=json.dumps(body))
        except (consul.NotFound, consul.ACLDisabled):
            return None
        return [bool(item.get("Allow")) for item in answer]

    # ---- agent services and checks ---------------------------------------------------------------
    @_boundary
    def register_service(self, name: str, service_id: str, *, address: str | None = None,
                         port: int | None = None, tags: Iterable[str] = (), meta: dict[str, str] | None = None,
                         checks: list[dict] | None = None) -> None:
        """Registers (or replaces) an agent service. `checks` are Consul check definitions as dicts,
        e.g. {"CheckID": ..., "TTL": "3s", "Status": "passing"} (py-consul's Check has no Status)."""
        checks = list(checks or [])
        ok = self._c.agent.service.register(
            name, service_id=service_id, address=address, port=port, tags=list(tags) or None,
            meta={k: str(v) for k, v in (meta or {}).items()} or None,
            check=checks[0] if checks else None, extra_checks=checks[1:],
            replace_existing_checks=True)
        if not ok:
            raise ConsulUnavailable(f"register_service {service_id}: agent refused")

    @_boundary
    def deregister_service(self, service_id: str) -> None:
        """Removes an agent service; removing one that is not there is not an error."""
        try:
            self._c.agent.service.deregister(service_id)
        except consul.ConsulException as exc:
            if "Unknown service" in str(exc) or str(exc).startswith("404"):
                return
            raise

    @_boundary
    def pass_ttl(self, check_id: str, note: str | None = None) -> None:
        """Passes a TTL check; ConsulNotFound when the agent does not know it (re-register)."""
        self._c.agent.check.ttl_pass(check_id, notes=note)

    @_boundary
    def agent_services(self) -> dict[str, dict]:
        return self._c.agent.services() or {}

    # ---- health -------------------------------------------------------------------------------------
    @_boundary
    def health_service(self, name: str, tag: str | None = None, passing: bool = True, index: int = 0,
                       wait: str = "10s") -> tuple[int, list[dict]]:
        """GET /v1/health/service/<name>. index=0 returns at once; otherwise blocks up to `wait`
        for a change. Returns (next index, entries) where each entry has Node, Service, Checks."""
        got, entries = self._c.health.service(name, index=index or None, wait=wait if index else None,
                                              passing=passing or None, tag=tag)
        return next_index(index, got), entries or []

    # ---- KV ---------------------------------------------------------------------------------------
    @_boundary
    def kv_get(self, key: str) -> tuple[int, KVEntry | None]:
        got, raw = self._c.kv.get(key)
        return next_index(0, got), (_to_entry(raw) if raw else None)

    @_boundary
    def kv_get_tree(self, prefix: str, index: int = 0, wait: str = "10s") -> tuple[int, list[KVEntry]]:
        """Every key under `prefix` (recurse). index>0 blocks up to `wait` for a change. A watch on an
        empty prefix wakes on any KV write in the datacenter: compare data, not indexes."""
        got, raw = self._c.kv.get(prefix, recurse=True, index=index or None, wait=wait if index else None)
        return next_index(index, got), [_to_entry(r) for r in (raw or [])]

    @_boundary
    def kv_cas(self, key: str, value: bytes | str, index: int) -> None:
        """Writes only if the key's ModifyIndex is `index` (0: only if absent); else ConsulConflict."""
        if not self._c.kv.put(key, value, cas=int(index)):
            raise ConsulConflict(f"kv_cas {key}: index {index} is stale")

    @_boundary
    def kv_acquire(self, key: str, value: bytes | str, session: str) -> None:
        """Takes the lock on `key` for `session` (true again for the holder); else ConsulConflict."""
        if not self._c.kv.put(key, value, acquire=session):
            raise ConsulConflict(f"kv_acquire {key}: held by another session")

    @_boundary
    def kv_put(self, key: str, value: bytes | str) -> None:
        """Writes unconditionally (records only their writer changes, e.g. a node's FATAL reason)."""
        self._c.kv.put(key, value)

    @_boundary
    def kv_delete(self, key: str) -> None:
        self._c.kv.delete(key)

    @_boundary
    def kv_delete_tree(self, prefix: str) -> None:
        self._c.kv.delete(prefix, recurse=True)

    @_boundary
    def txn(self, ops: list[dict]) -> list[dict]:
        """Runs the operations atomically; ConsulConflict (with Consul's errors) when any check fails."""
        result = self._c.txn.put(ops)
        return (result or {}).get("Results") or []

    # ---- sessions ---------------------------------------------------------------------------------
    @_boundary
    def session_create(self, name: str, checks: list[str], *, lock_delay: int = 0, behavior: str = "delete",
                       ttl: int | None = None) -> str:
        """A session bound to `checks` (e.g. ["serfHealth", <heartbeat check id>]) on this agent's node.
        lock_delay 0: the default 15 s would block every re-claim after an invalidation."""
        return self._c.session.create(name=name, checks=list(checks), lock_delay=lock_delay, behavior=behavior,
                                      ttl=ttl)

    @_boundary
    def session_destroy(self, session_id: str) -> None:
        self._c.session.destroy(session_id)

    @_boundary
    def session_info(self, session_id: str) -> dict | None:
        """The session, or None when Consul no longer has it (invalidated or destroyed)."""
        _, info = self._c.session.info(session_id)
        return info or None

    def close(self) -> None:
        try:
            self._c.http.session.close()
        except Exception:  # pragma: no cover - closing is best effort
            pass


__all__ = [
    "ConsulAPI", "ConsulConflict", "ConsulDenied", "ConsulError", "ConsulMisconfigured", "ConsulNotFound",
    "ConsulTLSFailed", "ConsulUnavailable", "KVEntry", "dumps",
    "next_index", "txn_cas", "txn_check_index", "txn_check_session", "txn_delete_tree", "txn_lock", "txn_set",
]
