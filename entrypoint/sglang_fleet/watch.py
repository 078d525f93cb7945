"""The node loop's helper that only observes Consul: the blocking-query watcher.

The watcher holds a blocking query on one group's keys and wakes the loop on every change; it decides
nothing (docs/protocol.md "Blocking queries": compare data, not indexes; reset the index after an error).
"""
from __future__ import annotations

import threading

from sglang_fleet import consul_api as ca
from sglang_fleet.config import FleetConfig
from sglang_fleet.retry import backoff

WATCH_WAIT = "10s"


class Watcher(threading.Thread):
    """Holds a blocking query on the group's keys and wakes the loop on every change. Decides nothing."""

    def __init__(self, cfg: FleetConfig, prefix: str, wake: threading.Event, stop: threading.Event):
        super().__init__(name="watch", daemon=True)
        self.cfg, self.prefix, self.wake, self.stop_event = cfg, prefix, wake, stop

    def run(self) -> None:
        api = ca.ConsulAPI(self.cfg.consul)
        index, failures, last = 0, 0, None
        try:
            while not self.stop_event.is_set():
                try:
                    index, entries = api.kv_get_tree(self.prefix, index=index, wait=WATCH_WAIT)
                    failures = 0
                    # Compare data, not indexes: a watch on a missing prefix wakes on any KV write.
                    data = [(e.key, e.value, e.session) for e in entries]
                    if data != last:
                        last = data
                        self.wake.set()
                except ca.ConsulError:
                    failures += 1
                    index = 0
                    self.wake.set()  # the loop will see the error itself and say so
                    self.stop_event.wait(backoff(failures, 0.5, 5.0))
        finally:
            api.close()


__all__ = ["Watcher", "WATCH_WAIT"]
