"""The sim engine's prefill/decode hand-over: "KV" for a bootstrap room, moved over the bootstrap port.

The router sends the same request, with bootstrap_host/bootstrap_port/bootstrap_room added, to a prefill
and to a decode at about the same time. The prefill stores a small blob derived from the prompt under the
room; the decode connects to bootstrap_host:bootstrap_port, asks for the room (the prefill waits up to
`wait` seconds for it to appear), and only then answers. Wire format: one JSON line each way.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import OrderedDict

FETCH_WAIT_S = 30.0
CONNECT_RETRY_S = 1.0
MAX_ROOMS = 4096  # rooms a decode never fetched are dropped oldest first


def kv_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


class KVFetchError(RuntimeError):
    pass


class KVRooms:
    """Rooms stored by the prefill until the decode takes them; counts hand-overs on both sides."""

    def __init__(self, max_rooms: int = MAX_ROOMS):
        self._rooms: OrderedDict[int, dict] = OrderedDict()
        self._cond = threading.Condition()
        self._max = max_rooms
        self.transfers = 0  # prefill: rooms handed to a decode; decode: rooms fetched

    def put(self, room: int, blob: dict) -> None:
        with self._cond:
            self._rooms[room] = blob
            while len(self._rooms) > self._max:
                self._rooms.popitem(last=False)
            self._cond.notify_all()

    def take(self, room: int, wait: float) -> dict | None:
        deadline = time.monotonic() + wait
        with self._cond:
            while room not in self._rooms:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            self.transfers += 1
            return self._rooms.pop(room)

    def count_fetch(self) -> None:
        with self._cond:
            self.transfers += 1

    def stored(self) -> int:
        with self._cond:
            return len(self._rooms)


def _serve_one(conn: socket.socket, rooms: KVRooms, log) -> None:
    with conn:
        try:
            conn.settimeout(FETCH_WAIT_S + 5)
            request = json.loads(conn.makefile("rb").readline() or b"{}")
            room = int(request["room"])
            blob = rooms.take(room, min(float(request.get("wait", FETCH_WAIT_S)), FETCH_WAIT_S))
            reply = {"room": room, **blob} if blob else {"room": room, "error": f"no KV for room {room}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(f"bootstrap request failed: {e}")


def serve_bootstrap(rooms: KVRooms, host: str, port: int, log) -> socket.socket:
    """Prefill rank 0: answer KV fetches on the bootstrap port (a thread per connection)."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=128, reuse_port=False)

    def accept_loop():
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_serve_one, args=(conn, rooms, log), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True, name="sim-bootstrap").start()
    log.info(f"bootstrap server listening on {host}:{port}")
    return sock


def fetch(host: str, port: int, room: int, wait: float = FETCH_WAIT_S) -> dict:
    """Decode side: the room's KV from the prefill at host:port, or KVFetchError saying why."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:  # a refusal can be a moment's backlog; for longer it means the prefill is gone
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise KVFetchError(f"cannot reach bootstrap server {host}:{port}: {e}") from None
            time.sleep(0.1)
    with conn:
        try:
            conn.settimeout(wait + 5)
            conn.sendall(json.dumps({"op": "fetch", "room": room, "wait": wait}).encode() + b"\n")
            reply = json.loads(conn.makefile("rb").readline() or b"{}")
        except (OSError, ValueError) as e:
            raise KVFetchError(f"bootstrap server {host}:{port} room {room}: {e}") from None
    if "error" in reply or "kv" not in reply:
        raise KVFetchError(f"bootstrap server {host}:{port}: {reply.get('error', 'bad reply')}")
    return reply
