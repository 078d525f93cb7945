"""The sim engine's group: a TCP handshake at --dist-init-addr standing in for NCCL's rendezvous.

Wire format: one JSON object per line. A rank > 0 sends {"type": "hello", "rank", "nnodes", "model"};
rank 0 answers {"type": "welcome"} or {"type": "reject", "reason"}, and sends {"type": "formed"} to
everyone once all ranks joined. Both sides send {"type": "ping"} every HEARTBEAT_S; a closed socket or
SILENCE_S without a message is a lost peer and ends the process (an NCCL abort, in the real thing).
"""
from __future__ import annotations

import errno
import json
import socket
import threading
import time

HEARTBEAT_S = 0.2
SILENCE_S = 1.0
HELLO_TIMEOUT_S = 5.0
CONNECT_RETRY_S = 0.2


def check_hello(hello: dict, nnodes: int, model: str, taken: dict[int, str]) -> str | None:
    """Why rank 0 must reject this hello, or None to welcome it. `taken` maps joined ranks to addresses."""
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        return f"expected a hello message, got {str(hello)[:80]!r}"
    rank, their_nnodes = hello.get("rank"), hello.get("nnodes")
    if their_nnodes != nnodes:
        return f"--nnodes {their_nnodes} differs from rank 0's --nnodes {nnodes}"
    if not isinstance(rank, int) or not 1 <= rank < nnodes:
        return f"--node-rank {rank} is out of range 1..{nnodes - 1} for a group of {nnodes}"
    if hello.get("model") != model:
        return f"--model-path {hello.get('model')!r} differs from rank 0's {model!r}"
    if rank in taken:
        return f"rank {rank} is already held by {taken[rank]}"
    return None


class Link:
    """One TCP connection carrying JSON lines; sends are serialised, reads time out after SILENCE_S."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self._rfile = sock.makefile("rb")
        self._wlock = threading.Lock()

    def send(self, msg: dict) -> None:
        with self._wlock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout: float = SILENCE_S) -> dict:
        self.sock.settimeout(timeout)
        try:
            line = self._rfile.readline()
        except (TimeoutError, socket.timeout):
            raise ConnectionError(f"no message for {timeout:g}s") from None
        if not line:
            raise ConnectionError("connection closed")
        return json.loads(line)

    def close(self) -> None:
        for closer in (self._rfile.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass


def _heartbeat(links, fail, what) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        for rank, link in links():
            try:
                link.send({"type": "ping"})
            except OSError as e:
                fail(f"lost {what(rank, link)}: {e}; aborting as NCCL would")
                return


def _read_forever(link: Link, on_message, on_lost) -> None:
    try:
        while True:
            on_message(link.recv())
    except (OSError, ValueError) as e:
        on_lost(e)


class Solo:
    """nnodes == 1: nothing to join."""

    def __init__(self):
        self.formed = threading.Event()
        self.formed.set()

    def missing(self) -> str:
        return "nothing"


class Leader:
    """Rank 0: accepts the other ranks, welcomes or rejects each, broadcasts 'formed'."""

    def __init__(self, engine, fail):
        a = engine.args
        self.nnodes, self.model, self.log, self.fail = a.nnodes, a.model_path, engine.log, fail
        self.formed = threading.Event()
        self.peers: dict[int, Link] = {}
        self._lock = threading.Lock()
        host, port = a.dist_init
        self.listener = _listen(host, port)
        threading.Thread(target=self._accept_loop, daemon=True, name="sim-group-accept").start()
        threading.Thread(target=_heartbeat, daemon=True, name="sim-group-heartbeat",
                         args=(self._links, fail, lambda r, link: f"rank {r} ({link.peer})")).start()

    def _links(self) -> list[tuple[int, Link]]:
        with self._lock:
            return list(self.peers.items())

    def missing(self) -> str:
        with self._lock:
            absent = [r for r in range(1, self.nnodes) if r not in self.peers]
        return f"ranks {absent} never joined"

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError as e:
                self.fail(f"group listener failed: {e}")
                return
            threading.Thread(target=self._greet, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _greet(self, sock: socket.socket, peer: str) -> None:
        link = Link(sock, peer)
        try:
            hello = link.recv(HELLO_TIMEOUT_S)
        except (OSError, ValueError) as e:
            self.log.warning(f"dropped a connection from {peer} that sent no hello: {e}")
            link.close()
            return
        with self._lock:
            reason = check_hello(hello, self.nnodes, self.model,
                                 {r: p.peer for r, p in self.peers.items()})
            if reason is None:  # welcome before the heartbeat thread can see (and ping) this link
                rank = hello["rank"]
                try:
                    link.send({"type": "welcome", "nnodes": self.nnodes})
                except OSError as e:
                    reason = f"welcome not delivered: {e}"
                else:
                    self.peers[rank] = link
        if reason is not None:
            self.log.warning(f"rejected a peer from {peer}: {reason}")
            try:
                link.send({"type": "reject", "reason": reason})
            except OSError:
                pass
            link.close()
            return
        self.log.info(f"rank {rank} joined from {peer} ({len(self.peers) + 1}/{self.nnodes})")
        lost = lambda e: self.fail(f"lost rank {rank} ({peer}): {e}; aborting as NCCL would")  # noqa: E731
        threading.Thread(target=_read_forever, args=(link, lambda _m: None, lost), daemon=True,
                         name=f"sim-group-rank{rank}").start()
        with self._lock:
            complete = len(self.peers) == self.nnodes - 1 and not self.formed.is_set()
            if complete:
                self.formed.set()
        if complete:
            for r, p in self._links():
                try:
                    p.send({"type": "formed"})
                except OSError as e:
                    self.fail(f"lost rank {r} ({p.peer}): {e}")


class Member:
    """Rank > 0: connects to rank 0 (retrying until the deadline), says hello, watches the link."""

    def __init__(self, engine, fail, deadline: float):
        self.engine, self.fail, self.deadline = engine, fail, deadline
        self.formed = threading.Event()
        self.link: Link | None = None
        threading.Thread(target=self._join, daemon=True, name="sim-group-join").start()

    def missing(self) -> str:
        a = self.engine.args
        if self.link is None:
            return f"rank 0 at {a.dist_init_addr} never answered"
        return "rank 0 never reported the group complete"

    def _join(self) -> None:
        a, log = self.engine.args, self.engine.log
        host, port = a.dist_init
        next_note = time.monotonic()
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=HELLO_TIMEOUT_S)
                break
            except OSError as e:
                if time.monotonic() > self.deadline:
                    return  # the engine's deadline check reports it
                if time.monotonic() >= next_note:
                    log.info(f"waiting for rank 0 at {host}:{port}: {e}")
                    next_note = time.monotonic() + 5
                time.sleep(CONNECT_RETRY_S)
        link = Link(sock, f"{host}:{port}")
        try:
            link.send({"type": "hello", "rank": a.node_rank, "nnodes": a.nnodes, "model": a.model_path})
            reply = link.recv(HELLO_TIMEOUT_S)
            while reply.get("type") == "ping":
                reply = link.recv(HELLO_TIMEOUT_S)
        except (OSError, ValueError) as e:
            self.fail(f"handshake with rank 0 at {host}:{port} failed: {e}")
            return
        if reply.get("type") != "welcome":
            self.fail(f"rank 0 at {host}:{port} rejected rank {a.node_rank}: {reply.get('reason', reply)}")
            return
        self.link = link
        log.info(f"joined the group at {host}:{port} as rank {a.node_rank} of {a.nnodes}")
        threading.Thread(target=_heartbeat, daemon=True, name="sim-group-heartbeat",
                         args=(lambda: [(0, link)], self.fail, lambda _r, lk: f"rank 0 ({lk.peer})")).start()

        def on_message(msg: dict) -> None:
            if msg.get("type") == "formed":
                self.formed.set()

        _read_forever(link, on_message,
                      lambda e: self.fail(f"lost rank 0 ({host}:{port}): {e}; aborting as NCCL would"))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            sock.close()
            raise
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))  # address is NATed here
    sock.listen(128)
    return sock


def start(engine, fail, deadline: float):
    a = engine.args
    if a.nnodes == 1:
        return Solo()
    if a.node_rank == 0:
        return Leader(engine, fail)
    return Member(engine, fail, deadline)
