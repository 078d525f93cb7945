"""Draining: after rank 0 withdraws its serving registration, let the requests in flight finish before
the engine is stopped ("nothing lost" on a graceful stop).

The router agent sees the withdrawal within milliseconds, batches Consul changes for
FLEET_ROUTER_QUIET_WINDOW (0.5 s) and then deletes the worker in smg; requests smg routed before that
still arrive. So a drain first waits ROUTER_PICKUP seconds, then until the engine reports no request in
flight on two reads in a row, at most FLEET_DRAIN_TIMEOUT seconds counted from the withdrawal.

The engine's load (SGLang 0.5.23, entrypoints/v1_loads.py): `GET /v1/loads?include=core,disagg` ->
`{"timestamp", "version", "loads": [{"dp_rank", "num_running_reqs", "num_waiting_reqs", ...,
"disaggregation": {"prefill_bootstrap_queue_reqs", "prefill_inflight_queue_reqs", ...}}]}`, one entry per
DP rank. Older SGLang answers only `GET /get_load` -> `[{"dp_rank", "num_reqs", "num_waiting_reqs",
"num_tokens"}]`; that is tried when /v1/loads is 404. When neither answers, the drain waits the pickup
time only.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from sglang_fleet.engine import engine_request

ROUTER_PICKUP = 2.0  # seconds: the router's quiet window (0.5 s) + smg's worker removal, with margin
POLL_EVERY = 0.5  # seconds between load reads
LOAD_TIMEOUT = 2.0  # seconds for one load read
ZERO_READS = 2  # consecutive "nothing in flight" reads that end a drain (the scheduler publishes loads)
V1_LOADS = "/v1/loads?include=core,disagg"
GET_LOAD = "/get_load"
# Requests a disaggregated server still holds while their KV cache is handed over (prefill) or fetched (decode).
DISAGG_QUEUES = ("prefill_bootstrap_queue_reqs", "prefill_inflight_queue_reqs", "decode_prealloc_queue_reqs",
                 "decode_transfer_queue_reqs", "decode_retracted_queue_reqs")

# No proxy: the load is always read from this host's own engine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LoadUnavailable(Exception):
    """The engine did not say how many requests it has in flight. `transient`: it may next time (a read
    that timed out or a 5xx from a busy engine), unlike a refused connection or an endpoint it lacks."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def in_flight(path: str, body: Any) -> int:
    """Requests in flight in one answer of /v1/loads or /get_load (all DP ranks together)."""
    try:
        if path == GET_LOAD:
            return sum(int(load.get("num_reqs") or 0) for load in body)
        total = 0
        for load in body["loads"]:
            total += int(load.get("num_running_reqs") or 0) + int(load.get("num_waiting_reqs") or 0)
            disagg = load.get("disaggregation") or {}
            total += sum(int(disagg.get(q) or 0) for q in DISAGG_QUEUES)
        return total
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise LoadUnavailable(f"unexpected answer from {path.split('?')[0]}: {exc!r}") from None


def _get_json(url: str, timeout: float, api_key: str | None) -> Any:
    with _OPENER.open(engine_request(url, api_key), timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def requests_in_flight(base_url: str, timeout: float = LOAD_TIMEOUT, api_key: str | None = None) -> int:
    """Asks the engine at `base_url` (http://127.0.0.1:<port>) how many requests it is serving; `api_key`:
    FLEET_ENGINE_API_KEY (the load routes are guarded by it)."""
    for path in (V1_LOADS, GET_LOAD):
        try:
            return in_flight(path, _get_json(base_url + path, timeout, api_key))
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and path == V1_LOADS:
                continue  # an older SGLang: /get_load
            raise LoadUnavailable(f"{path.split('?')[0]} answered HTTP {exc.code}", exc.code >= 500) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LoadUnavailable(f"{path.split('?')[0]}: {reason}", isinstance(reason, TimeoutError)
                                  or "timed out" in str(reason)) from None
    raise LoadUnavailable("neither /v1/loads nor /get_load is served")


def plural(n: int) -> str:
    return f"{n} request{'' if n == 1 else 's'}"


@dataclass
class Step:
    sentence: str | None
    done: bool
    wait: float = 0.0


class Drain:
    """One drain, stepped by the node loop (never blocks longer than one load read)."""

    def __init__(self, load: Callable[[], int], timeout: float, pickup: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.load, self.timeout, self.clock = load, timeout, clock
        self.began = clock()
        self.pickup = min(ROUTER_PICKUP if pickup is None else pickup, timeout)
        self.pickup_until = self.began + self.pickup
        self.deadline = self.began + timeout
        self.zero_reads = 0
        self.reported: int | None = None  # the count last said (a sentence only when it changes)
        self.answered = False  # the engine has told its load at least once
        self.outcome = ""  # how it ended, for K/g<G>/drained

    def _read(self) -> tuple[int | None, str, bool]:
        """(requests in flight or None, why not, whether to ask again)."""
        try:
            n = self.load()
        except LoadUnavailable as exc:
            # A busy engine that answered before is asked again (until the deadline), not given up on.
            return None, str(exc), exc.transient and self.answered
        self.answered = True
        return n, "", False

    def start(self) -> str:
        n, error, _ = self._read()
        self.reported = n
        return f"draining: {plural(n)} in flight" if n is not None else f"draining (load unreadable: {error})"

    def step(self) -> Step:
        now = self.clock()
        n, error, again = self._read()
        after = now - self.began
        if n is None and again and now < self.deadline:
            return Step(None, False, max(0.0, min(POLL_EVERY, self.deadline - now)))
        if n is None and again:
            return self._done(f"drain timeout: the engine's load is unreadable ({error}) after {self.timeout:g} s "
                              f"(FLEET_DRAIN_TIMEOUT); stopping the engine anyway")
        if n is None:
            if now < self.pickup_until:
                return Step(None, False, self.pickup_until - now)
            return self._done(f"drained: the engine's load is unreadable ({error}); waited {after:.1f} s for "
                              f"the router only")
        self.zero_reads = self.zero_reads + 1 if n == 0 else 0
        if now >= self.pickup_until and self.zero_reads >= ZERO_READS:
            return self._done(f"drained: no requests in flight after {after:.1f} s")
        if now >= self.deadline:
            return self._done(f"drain timeout: {plural(n)} still in flight after {self.timeout:g} s "
                              f"(FLEET_DRAIN_TIMEOUT); stopping the engine anyway")
        sentence = f"draining: {plural(n)} in flight" if n != self.reported else None
        self.reported = n
        return Step(sentence, False, max(0.0, min(POLL_EVERY, self.deadline - now)))

    def cut_short(self, why: str) -> str:
        return self._done(f"drain cut short ({why}) after {self.clock() - self.began:.1f} s").sentence

    def _done(self, sentence: str) -> Step:
        self.outcome = sentence
        return Step(sentence, True)


__all__ = ["Drain", "LoadUnavailable", "ROUTER_PICKUP", "Step", "in_flight", "requests_in_flight"]
