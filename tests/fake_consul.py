"""An in-memory stand-in for the part of Consul the rendezvous uses (rendezvous.Store): KV with
ModifyIndex, CAS, acquire, transactions, sessions with behavior=delete. For unit tests of pure decisions;
tests/rendezvous_contract.py runs the same assertions against it and against a real Consul agent
(tests/unit/test_rendezvous.py, tests/integration/test_rendezvous_consul.py), so it cannot drift from
what Consul does. Importable because tests/conftest.py puts tests/ on sys.path."""
from __future__ import annotations

import base64
import itertools

from sglang_fleet import consul_api as ca


class FakeStore:
    """Just enough of Consul's KV for the protocol: ModifyIndex, cas, acquire, sessions (delete), txn."""

    def __init__(self):
        self._raft = itertools.count(10)
        self.index = 9  # the last index handed out (Consul's raft index)
        self.kv: dict[str, ca.KVEntry] = {}
        self.tombstones: dict[str, int] = {}  # deleted key -> the index of its deletion
        self.sessions: set[str] = set()

    def _next(self) -> int:
        self.index = next(self._raft)
        return self.index

    def _set(self, key, value, session=None):
        if isinstance(value, str):
            value = value.encode()
        self.kv[key] = ca.KVEntry(key, value, self._next(), session)
        self.tombstones.pop(key, None)

    def _delete(self, keys):
        at = self._next()
        for k in keys:
            del self.kv[k]
            self.tombstones[k] = at

    def kv_get_tree(self, prefix, index=0, wait="10s"):
        """Like Consul's list: the highest ModifyIndex under `prefix`, deletions included. Never blocks
        (nothing else writes while a unit test reads)."""
        entries = [e for k, e in sorted(self.kv.items()) if k.startswith(prefix)]
        got = max([e.modify_index for e in entries] + [i for k, i in self.tombstones.items() if k.startswith(prefix)],
                  default=0)
        return ca.next_index(index, got or self.index), entries

    def kv_cas(self, key, value, index):
        cur = self.kv.get(key)
        if (cur.modify_index if cur else 0) != index:
            raise ca.ConsulConflict(key)
        self._set(key, value, cur.session if cur else None)

    def kv_acquire(self, key, value, session):
        if session not in self.sessions:  # Consul's 500 "invalid session", as consul_api converts it
            raise ca.ConsulNotFound(f'kv_acquire: 500 invalid session "{session}"')
        cur = self.kv.get(key)
        if cur and cur.session and cur.session != session:
            raise ca.ConsulConflict(key)
        self._set(key, value, session)

    def session_create(self, name, checks, *, lock_delay=0, behavior="delete", ttl=None):
        sid = f"s{self._next()}"
        self.sessions.add(sid)
        return sid

    def session_destroy(self, sid):
        self.sessions.discard(sid)
        held = [k for k, e in self.kv.items() if e.session == sid]
        if held:
            self._delete(held)

    def txn(self, ops):
        for op in ops:  # checks first, all or nothing
            kv = op["KV"]
            cur = self.kv.get(kv["Key"])
            if kv["Verb"] in ("check-index", "cas") and (cur.modify_index if cur else 0) != kv["Index"]:
                raise ca.ConsulConflict(f"index {kv['Key']}")
            if kv["Verb"] == "check-not-exists" and cur:
                raise ca.ConsulConflict(f"exists {kv['Key']}")
            if kv["Verb"] == "lock" and kv["Session"] not in self.sessions:
                raise ca.ConsulConflict(f'txn: invalid session "{kv["Session"]}"')  # Consul: 409, rolled back
            if kv["Verb"] == "check-session" and (not cur or cur.session != kv["Session"]):
                raise ca.ConsulConflict(f"session {kv['Key']}")
            if kv["Verb"] == "lock" and cur and cur.session and cur.session != kv["Session"]:
                raise ca.ConsulConflict(f"lock {kv['Key']}")
        for op in ops:
            kv = op["KV"]
            value = base64.b64decode(kv.get("Value") or "")
            if kv["Verb"] in ("set", "cas"):
                self._set(kv["Key"], value)
            elif kv["Verb"] == "lock":
                self._set(kv["Key"], value, kv["Session"])
            elif kv["Verb"] == "delete-tree":
                gone = [k for k in self.kv if k.startswith(kv["Key"])]
                if gone:
                    self._delete(gone)
        return []
