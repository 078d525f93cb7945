"""What a node puts into Consul's catalog: its heartbeat (every member) and the serving service (rank 0).

- Heartbeat: agent service `sglang-fleet-member`, ID `sglang-fleet-<cluster>-<group>-<node>`, with a TTL
  check of the same ID that a helper thread passes every second with its own client. The rendezvous
  session is bound to that check, so a dead supervisor loses its rank within the TTL (3 s).
- Serving: service `sglang`, ID `sglang-<cluster>-<group>`, registered by rank 0 only after the barrier
  and engine readiness, with an HTTP /health check and a TTL check the heartbeat thread also passes
  (a dead supervisor withdraws it within 3 s). docs/protocol.md "Serving registration". Its whole life
  (register, withdraw, close for a drain, reopen for the next generation) is `ServingRegistration`'s.
The names (services, IDs, tags, meta keys) are contract.py's.

The heartbeat thread decides nothing: it passes checks and re-registers its own service when the agent
lost it (a restarted agent), and records what happened for the node loop to read.
"""
from __future__ import annotations

import threading
import time

from sglang_fleet import consul_api as ca
from sglang_fleet import contract
from sglang_fleet import logs
from sglang_fleet.config import FleetConfig

HEARTBEAT_TTL = "3s"
HEARTBEAT_INTERVAL = 1.0
DEREGISTER_AFTER = "1m"  # Consul raises anything lower to 1 m
HEALTH_INTERVAL = "5s"
HEALTH_TIMEOUT = "20s"  # SGLang's /health generates one token
# A heartbeat "keeps up" while its last pass reached Consul at most this many intervals ago.
KEEPING_UP_BEATS = 2


def member_id(cfg: FleetConfig) -> str:
    return contract.member_id(cfg.cluster, cfg.group or cfg.node_name, cfg.node_name)


def serving_id(cfg: FleetConfig) -> str:
    return contract.serving_id(cfg.cluster, cfg.group or cfg.node_name)


def serving_ttl_check_id(cfg: FleetConfig) -> str:
    return contract.serving_ttl_check_id(cfg.cluster, cfg.group or cfg.node_name)


def register_member(api: ca.ConsulAPI, cfg: FleetConfig, addr: str) -> None:
    group = cfg.group or cfg.node_name
    api.register_service(
        contract.MEMBER_SERVICE, member_id(cfg), address=addr,
        tags=[contract.cluster_tag(cfg.cluster), contract.group_tag(group)],
        meta={contract.META_CLUSTER: cfg.cluster, contract.META_GROUP: group, contract.META_NODE: cfg.node_name,
              contract.META_ROLE: cfg.role},
        checks=[{"CheckID": member_id(cfg), "Name": "sglang-fleet supervisor heartbeat", "TTL": HEARTBEAT_TTL,
                 "Status": "passing", "DeregisterCriticalServiceAfter": DEREGISTER_AFTER}])


def serving_definition(cfg: FleetConfig, addr: str, generation: int) -> dict:
    """Arguments for ConsulAPI.register_service, exactly as docs/protocol.md describes the serving service."""
    group = cfg.group or cfg.node_name
    sid = serving_id(cfg)
    meta = {contract.META_CLUSTER: cfg.cluster, contract.META_GROUP: group, contract.META_GENERATION: str(generation),
            contract.META_ROLE: cfg.role, contract.META_MODEL: cfg.model_path, contract.META_NNODES: str(cfg.nnodes),
            contract.META_TP_SIZE: str(cfg.tp_size)}
    if cfg.role == "prefill":
        meta[contract.META_BOOTSTRAP_PORT] = str(cfg.bootstrap_port)
    return {
        "name": contract.SERVING_SERVICE, "service_id": sid, "address": addr, "port": cfg.http_port,
        "tags": [cfg.role, contract.cluster_tag(cfg.cluster)], "meta": meta,
        "checks": [
            {"CheckID": sid + "-health", "Name": "engine /health", "HTTP": f"http://{addr}:{cfg.http_port}/health",
             "Method": "GET", "Interval": HEALTH_INTERVAL, "Timeout": HEALTH_TIMEOUT,
             # Registered only after /health answered 200: start passing, not critical.
             "Status": "passing", "DeregisterCriticalServiceAfter": DEREGISTER_AFTER},
            {"CheckID": serving_ttl_check_id(cfg), "Name": "sglang-fleet supervisor alive", "TTL": HEARTBEAT_TTL,
             "Status": "passing", "DeregisterCriticalServiceAfter": DEREGISTER_AFTER},
        ],
    }


def register_serving(api: ca.ConsulAPI, cfg: FleetConfig, addr: str, generation: int) -> None:
    d = serving_definition(cfg, addr, generation)
    api.register_service(d["name"], d["service_id"], address=d["address"], port=d["port"], tags=d["tags"],
                         meta=d["meta"], checks=d["checks"])


class ServingRegistration:
    """The serving service's whole life (rank 0): registered once the engine is ready; withdrawn when the
    engine fails or the generation ends; closed for a drain (withdrawn and not registered again in this
    generation, `reopen()` for the next one). While registered, the heartbeat thread passes its TTL check."""

    def __init__(self, api: ca.ConsulAPI, cfg: FleetConfig, addr: str, heartbeat: "Heartbeat"):
        self.api, self.cfg, self.addr, self.heartbeat = api, cfg, addr, heartbeat
        self.id = serving_id(cfg)
        self.registered = False
        self.closed = False  # withdrawn for a drain: not registered again in this generation

    @property
    def wanted(self) -> bool:
        """Rank 0 with a ready engine registers now: not yet registered and not closed for a drain."""
        return not self.registered and not self.closed

    def register(self, generation: int) -> str:
        register_serving(self.api, self.cfg, self.addr, generation)
        self.registered = True
        self.heartbeat.pass_serving(serving_ttl_check_id(self.cfg))
        return (f"registered serving service {self.id} ({self.cfg.role}) at "
                f"http://{self.addr}:{self.cfg.http_port} for generation {generation}")

    def withdraw(self) -> str:
        self.heartbeat.pass_serving(None)
        self.registered = False
        try:
            self.api.deregister_service(self.id)
        except ca.ConsulError as exc:
            # Without its TTL passes the registration goes critical in 3 s; the engine must stop anyway.
            return f"could not withdraw serving registration ({exc}); its TTL check lapses in 3 s"
        return f"withdrew serving registration {self.id}"

    def close(self) -> str:
        """For a drain: withdraw (when registered) and stay withdrawn for the rest of this generation."""
        self.closed = True
        return self.withdraw() if self.registered else "was not serving"

    def reopen(self) -> None:
        """A new generation may register again."""
        self.closed = False


class Heartbeat(threading.Thread):
    """Passes the member TTL check (and the serving TTL check while registered) every second."""

    def __init__(self, cfg: FleetConfig, addr: str, stop: threading.Event, interval: float = HEARTBEAT_INTERVAL):
        super().__init__(name="heartbeat", daemon=True)
        self.cfg = cfg
        self.addr = addr
        self.interval = interval
        self.stop_event = stop
        self.check_id = member_id(cfg)
        self.registered = threading.Event()  # the member check exists on the agent (session may bind it)
        self.re_registrations = 0  # times the agent had lost the check (a restarted agent)
        self.last_error: str | None = None
        self.last_pass: float | None = None  # monotonic time of the last beat Consul answered
        self.failed_at: float | None = None  # monotonic time of the last beat Consul did not answer
        self._serving_check: str | None = None
        self._lock = threading.Lock()
        self._log = logs.get("sglang_fleet.heartbeat")

    def keeping_up(self, now: float | None = None) -> bool:
        """This thread's own passes reach Consul now: its last beat succeeded, KEEPING_UP_BEATS ago at most.

        Consul saying the check is passing is not enough to bind a new session to it: after a network
        partition heals, a pass sent during the partition can still arrive (TCP retransmits the request
        of a client that gave up) while this thread cannot reach Consul yet (e.g. its DNS lookup of the
        agent hangs for 5 s). The check then passes for one TTL and lapses, and a session created in that
        window dies with it, taking a freshly formed generation down 3 s later."""
        now = time.monotonic() if now is None else now
        return (self.last_error is None and self.last_pass is not None
                and now - self.last_pass <= KEEPING_UP_BEATS * self.interval)

    def pass_serving(self, check_id: str | None) -> None:
        """Start (check id) or stop (None) passing the serving TTL check."""
        with self._lock:
            self._serving_check = check_id

    def run(self) -> None:
        api = ca.ConsulAPI(self.cfg.consul, timeout=2.0)
        try:
            while not self.stop_event.is_set():
                began = time.monotonic()
                self._beat(api)
                self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - began)))
        finally:
            api.close()

    def _beat(self, api: ca.ConsulAPI) -> None:
        try:
            if not self.registered.is_set():
                register_member(api, self.cfg, self.addr)
                self.registered.set()
                self._log.info(f"heartbeat registered as {self.check_id} (TTL {HEARTBEAT_TTL})")
            try:
                api.pass_ttl(self.check_id)
            except ca.ConsulNotFound:
                # The agent lost its state (restarted): register again; the old session died with it.
                self.re_registrations += 1
                register_member(api, self.cfg, self.addr)
                self._log.warning(f"heartbeat check {self.check_id} was gone from the Consul agent "
                                  f"(agent restarted?); registered it again")
            with self._lock:
                serving = self._serving_check
            if serving:
                try:
                    api.pass_ttl(serving)
                except ca.ConsulNotFound:
                    pass  # withdrawn meanwhile, or lost with the agent's state: the node loop handles it
            self.last_pass = time.monotonic()
            if self.last_error is not None:
                self._log.info(f"heartbeat reaches Consul again after: {self.last_error}")
                self.last_error = None
        except ca.ConsulError as exc:
            if self.last_error is None:
                self._log.warning(f"heartbeat cannot reach Consul: {exc}; retrying every {self.interval:g} s")
            self.last_error = str(exc)
            self.failed_at = time.monotonic()
