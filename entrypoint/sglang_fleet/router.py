"""The router role: smg kept equal to the healthy serving groups in Consul.

`sglang-fleet router` starts smg as a child (smg_process.py), watches
`/v1/health/service/sglang?passing&tag=cluster:<cluster>` with blocking queries from its own thread, and
reconciles smg's worker list through its HTTP API (smg_client.py); the decisions themselves are pure
functions in router_state.py. Only workers carrying our label
(`managed-by=sglang-fleet`, `sglang-fleet/cluster=<cluster>`) are ever changed; workers somebody added by
hand are left alone. The router registers itself in Consul as `sglang-router`.

One thread decides (the loop in `RouterAgent.run`); the Consul watch and smg's output pump only record.
Consul unreachable: the last known set stays in force (smg keeps its workers) and the watch retries; once
Consul answers again, the groups routed before the outage stay until Consul lists them again, for at
most FLEET_ROUTER_OUTAGE_HOLD s (router_state.OutageHold, docs/protocol.md "Router").
smg exited: it is started again with backoff and the whole list is added again. smg never outlives the
agent: every way out of `run()` stops it, and a kill -9 of the agent takes it along (its death signal,
child.py).

Mode (`FLEET_ROUTER_MODE`): `pd` starts smg with --pd-disaggregation and adds prefill/decode groups;
`regular` adds regular groups; `auto` (default) follows the roles registered in the cluster: pd while
any prefill or decode group is passing (or none at all), regular when only regular groups are. A change
of mode restarts smg (its mode is fixed at launch).
"""
from __future__ import annotations

import signal
import threading
import time

import tenacity

from sglang_fleet import contract, logs
from sglang_fleet.config import FleetConfig
from sglang_fleet.router_state import (ROLE_BY_MODE, DesiredWorker, OutageHold, choose_mode, desired_from_services,
                                       reconcile)
from sglang_fleet.smg_client import SmgClient, SmgConflict, SmgError, remove_admin_key, write_admin_key
from sglang_fleet.retry import backoff

WATCH_WAIT = "10s"
QUIET_MAX_FACTOR = 5  # a steady stream of changes is applied at the latest after 5 quiet windows
SMG_STABLE_AFTER = 30.0  # smg that ran this long before exiting is restarted at once; sooner: with backoff
SMG_UNANSWERED_LIMIT = 10  # consecutive failed calls to a live smg before it is restarted as hung


# ---- the agent ----------------------------------------------------------------------------------------
class RouterAgent:
    """Keeps one smg equal to Consul. `run()` blocks until `stop()` (or SIGTERM through `run(cfg)`)."""

    def __init__(self, cfg: FleetConfig, smg=None, consul_factory=None):
        from sglang_fleet.smg_process import SmgProcess
        if consul_factory is None:
            from sglang_fleet.consul_api import ConsulAPI
            consul_factory = ConsulAPI
        self.cfg = cfg
        self.smg = smg or SmgProcess(cfg)
        self._consul_factory = consul_factory
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._entries: list[dict] | None = None  # last answer from Consul; None until the first one
        self._seq = 0
        self._consul_ok = False
        self._lost = 0  # failed Consul reads so far (the watch counts, the loop compares)
        self._back_at: float | None = None  # when Consul answered again after the latest failures
        self._routed: dict[str, DesiredWorker] = {}  # url -> as applied to smg at the last reconcile
        self.service_id = contract.router_id(cfg.cluster, cfg.node_name)
        self._registered_mode: str | None = None
        self._quick_exits = 0  # smg exits in a row that came soon after its start
        self._parsed: tuple[int, tuple[list[DesiredWorker], set[str]]] | None = None
        self.log = logs.get("router", cluster=cfg.cluster)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- helpers ----------------------------------------------------------------------------------------
    def _retrying(self, exc_types: tuple, attempts: int | None = None, cap: float | None = None) -> tenacity.Retrying:
        """A Retrying built from config; its sleep returns early on shutdown."""
        stop = tenacity.stop_when_event_set(self._stop)
        if attempts:
            stop = stop | tenacity.stop_after_attempt(attempts)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(exc_types), reraise=True, sleep=self._stop.wait, stop=stop,
            wait=tenacity.wait_exponential(multiplier=max(self.cfg.backoff_base, 0.1),
                                           max=cap or self.cfg.backoff_max) + tenacity.wait_random(0, 0.2),
            before_sleep=lambda rs: self.log.warning(
                "retrying", what=getattr(rs.fn, "__name__", "?"), attempt=rs.attempt_number,
                error=str(rs.outcome.exception()), sleep=round(rs.next_action.sleep, 2)))

    def _watch(self) -> None:
        """Consul health watch (own thread, own client). Publishes every changed answer."""
        from sglang_fleet.consul_api import ConsulError
        api = self._consul_factory(self.cfg.consul)
        index, last = 0, None
        retrying = self._retrying((ConsulError,), cap=min(self.cfg.backoff_max, 10.0))

        def health_service():
            nonlocal index
            try:
                return api.health_service(contract.SERVING_SERVICE, tag=contract.cluster_tag(self.cfg.cluster), passing=True, index=index,
                                          wait=WATCH_WAIT)
            except ConsulError:
                # A restarted or re-elected Consul may be behind our index: asking with it would block a
                # whole wait for nothing (docs/protocol.md "Blocking queries"). Ask afresh.
                index = 0
                with self._lock:
                    if self._consul_ok:
                        self.log.warning("consul unreachable; smg keeps its workers as they are")
                    self._consul_ok = False
                    self._lost += 1
                raise

        while not self._stop.is_set():
            try:
                index, entries = retrying(health_service)
            except ConsulError as e:
                if not self._stop.is_set():  # pragma: no cover - retrying only gives up on shutdown
                    self.log.error("consul watch failed", error=str(e))
                continue
            if not self._consul_ok:
                self.log.info("consul answers", address=getattr(api, "address", "?"), services=len(entries))
            with self._lock:
                if not self._consul_ok and self._lost:
                    self._back_at = time.monotonic()
                self._consul_ok = True
                if entries != last:
                    last, self._entries = entries, entries
                    self._seq += 1
                    self._wake.set()

    def _desired(self) -> tuple[list[DesiredWorker], set[str]] | None:
        """The last Consul answer as desired workers and their roles; None before the first answer."""
        with self._lock:
            entries, seq = self._entries, self._seq
        if entries is None:
            return None
        if self._parsed is None or self._parsed[0] != seq:
            workers, problems = desired_from_services(entries, self.cfg.cluster)
            for p in problems:  # once per Consul answer, not once per loop
                self.log.warning("unusable service", problem=p)
            self._parsed = (seq, (workers, {w.worker_type for w in workers}))
        return self._parsed[1]

    def _withdrawals(self, applied: set[str]) -> bool:
        """The newest Consul answer drops a group that is routed now."""
        state = self._desired()
        return state is not None and bool(applied - {w.url for w in state[0]})

    def _start_smg(self, mode: str) -> None:
        from sglang_fleet.smg_process import SmgStartFailed
        self._retrying((SmgStartFailed,), attempts=self.cfg.start_attempts)(self.smg.start, mode, self._stop)

    def apply(self, desired: list[DesiredWorker]) -> str:
        """One reconcile against smg; returns the sentence that describes it."""
        client: SmgClient = self.smg.client
        actual = client.list_workers()
        add, remove = reconcile(desired, actual, self.cfg.cluster)
        by_url = {w.url: w for w in remove}
        replaced = by_url.keys() & {d.url for d in add}
        done: list[str] = []
        for w in remove:
            if w.url not in replaced:
                client.remove_worker(w.id)
                done.append(f"removed {w.worker_type} {w.url}")
        for d in add:
            try:
                if d.url in replaced:
                    client.replace_worker(by_url[d.url].id, d.body(self.cfg.engine_api_key))
                    done.append(f"replaced {d.worker_type} {d.url} (group {d.group} generation {d.generation})")
                else:
                    client.add_worker(d.body(self.cfg.engine_api_key))
                    done.append(f"added {d.worker_type} {d.url} (group {d.group} generation {d.generation})")
            except SmgConflict as e:  # still being added, or still draining: the next resync retries
                self.log.debug("add deferred", url=d.url, reason=str(e))
        if not done:
            return ""
        sentence = "; ".join(done)
        self.log.info(sentence, workers=len(desired), managed_before=sum(w.managed_by(self.cfg.cluster) for w in actual))
        return sentence

    def _register(self, api, mode: str) -> None:
        from sglang_fleet.smg_process import router_scheme
        addr, scheme = advertise_addr(self.cfg), router_scheme(self.cfg)
        host = f"[{addr}]" if ":" in addr else addr
        api.register_service(
            contract.ROUTER_SERVICE, self.service_id, address=addr, port=self.cfg.router_port,
            tags=[contract.cluster_tag(self.cfg.cluster), mode],
            meta={contract.META_CLUSTER: self.cfg.cluster, contract.META_NODE: self.cfg.node_name, contract.META_MODE: mode,
                  contract.META_SCHEME: scheme,
                  "prometheus_port": str(self.cfg.router_prometheus_port)},
            # The check only asks whether smg answers; whose certificate it shows is for clients to verify.
            checks=[{"CheckID": self.service_id, "Name": "smg liveness",
                     "HTTP": f"{scheme}://{host}:{self.cfg.router_port}/liveness", "Interval": "5s",
                     "TLSSkipVerify": scheme == "https", "Timeout": "3s", "DeregisterCriticalServiceAfter": "1m"}])
        self._registered_mode = mode
        self.log.info("registered in consul", service=contract.ROUTER_SERVICE, id=self.service_id, address=addr,
                      port=self.cfg.router_port, mode=mode)

    def _ensure_registered(self, api, mode: str) -> None:
        from sglang_fleet.consul_api import ConsulError
        try:
            if self._registered_mode != mode or self.service_id not in api.agent_services():
                self._register(api, mode)
        except ConsulError as e:
            self.log.warning("cannot register the router in consul; retrying later", error=str(e))

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        from sglang_fleet.consul_api import ConsulError
        from sglang_fleet.smg_process import SmgStartFailed
        api = self._consul_factory(self.cfg.consul)
        quiet = self.cfg.router_quiet_window
        resync_at, seen_seq, dirty, unanswered = 0.0, -1, True, 0
        hold, seen_lost, seen_back = OutageHold(self.cfg.router_outage_hold), 0, None
        try:
            self._keep_admin_key()
            threading.Thread(target=self._watch, name="consul-watch", daemon=True).start()
            while not self._stop.is_set():
                with self._lock:
                    consul_ok, lost, back_at = self._consul_ok, self._lost, self._back_at
                if lost != seen_lost:
                    hold.consul_lost(self._routed.values())
                    seen_lost = lost
                if consul_ok and back_at != seen_back:
                    hold.consul_back(back_at)
                    seen_back, dirty = back_at, True
                    if hold.active:
                        self.log.info("consul answers again; groups routed before the outage stay until they "
                                      "pass again", kept=sorted(hold.kept), hold=hold.seconds)
                state = self._desired()
                mode = choose_mode(self.cfg.router_mode, state[1] if state else (), self.smg.mode)
                if not self.smg.running() or self.smg.mode != mode:
                    if self.smg.mode is not None and self.smg.mode != mode:
                        self.log.info("smg mode changes; restarting smg", old=self.smg.mode, new=mode)
                    elif self.smg.mode is not None:
                        self._after_smg_exit()
                    try:
                        self._start_smg(mode)
                    except SmgStartFailed as e:
                        if self._stop.is_set():
                            break
                        self.log.error("smg cannot be started; giving up", error=str(e),
                                       attempts=self.cfg.start_attempts)
                        return 1
                    dirty = True
                if self._seq != seen_seq:
                    # Quiet window: new or changed groups are applied once Consul has been still for `quiet`
                    # s (at most QUIET_MAX_FACTOR windows); a group that stopped passing goes at once.
                    first = time.monotonic()
                    while not self._stop.is_set() and quiet > 0 and not self._withdrawals(set(self._routed)):
                        seq = self._seq
                        if self._stop.wait(quiet) or self._seq == seq or time.monotonic() - first > quiet * QUIET_MAX_FACTOR:
                            break
                    seen_seq, dirty = self._seq, True
                    continue  # re-read the state and the mode with the newest answer
                now = time.monotonic()
                if state is not None and (dirty or now >= resync_at):
                    try:
                        routed, hold_ended = hold.desired([w for w in state[0] if w.worker_type in ROLE_BY_MODE[mode]],
                                                          now)
                        if hold_ended:
                            self.log.info(hold_ended)
                        changed = self.apply(routed)
                        self._routed = {w.url: w for w in routed}
                        ignored = sorted({w.worker_type for w in state[0]} - set(ROLE_BY_MODE[mode]))
                        if ignored and dirty:
                            self.log.warning("groups of these roles are not routed in this mode", mode=mode,
                                             roles=ignored)
                        dirty = False
                        # After a change, look again soon: additions finish and drains end in the background.
                        resync_at = now + (1.0 if changed else self.cfg.router_resync_interval)
                        if hold.until is not None:  # end the hold on time even when Consul is quiet
                            resync_at = min(resync_at, hold.until)
                    except SmgError as e:
                        unanswered += 1
                        self.log.warning("smg did not take the change; retrying", error=str(e), failures=unanswered)
                        resync_at = now + 1.0
                        if unanswered >= SMG_UNANSWERED_LIMIT and self.smg.running():
                            self.log.error("smg stopped answering; restarting it", failures=unanswered)
                            self.smg.stop()
                            unanswered = 0
                    else:
                        unanswered = 0
                    self._ensure_registered(api, mode)
                elif state is None and now >= resync_at:
                    self._ensure_registered(api, mode)
                    resync_at = now + self.cfg.router_resync_interval
                self._wake.wait(min(0.5, max(0.05, resync_at - time.monotonic())))
                self._wake.clear()
        finally:
            self._shutdown(api, ConsulError)
        return 0

    def _keep_admin_key(self) -> None:
        """smg's admin key, 0600 in admin_key_path(port), so `sglang-fleet status` on this host can list smg's
        workers; removed on every way out (_shutdown)."""
        try:
            path = write_admin_key(self.cfg.router_port, self.smg.admin_key)
            self.log.info("smg's admin key kept for status on this host", path=str(path))
        except OSError as e:
            self.log.warning("cannot keep smg's admin key for status on this host", error=str(e))

    def _after_smg_exit(self) -> None:
        """Logs the exit; when smg keeps dying soon after starting, waits an exponential backoff
        (retry.backoff: backoff_base doubling up to backoff_max, with jitter) first."""
        uptime = time.monotonic() - self.smg.started_at
        self._quick_exits = self._quick_exits + 1 if uptime < SMG_STABLE_AFTER else 0
        delay = backoff(self._quick_exits - 1, self.cfg.backoff_base, self.cfg.backoff_max)
        self.log.warning("smg exited; starting it again", returncode=self.smg.returncode(),
                         uptime=round(uptime, 1), backoff=round(delay, 2))
        self._stop.wait(delay)

    def _shutdown(self, api, consul_error) -> None:
        """Every way out of run(): out of Consul first (clients stop coming), then smg, whatever happened.
        A kill -9 skips this; then smg's death signal takes it along (smg_process.py)."""
        self._stop.set()
        try:
            api.deregister_service(self.service_id)
            self.log.info("deregistered from consul", id=self.service_id)
        except consul_error as e:
            self.log.warning("could not deregister the router from consul", error=str(e))
        finally:
            self.smg.stop()
            remove_admin_key(self.cfg.router_port, self.smg.admin_key)


def advertise_addr(cfg: FleetConfig) -> str:
    """Where clients (and Consul's check) reach smg: FLEET_ADVERTISE_ADDR, else a concrete
    FLEET_ROUTER_HOST, else the address of the interface that routes toward Consul."""
    if cfg.advertise_addr:
        return cfg.advertise_addr
    if cfg.router_host not in ("0.0.0.0", "::", ""):
        return cfg.router_host
    from sglang_fleet.netprofile import resolve_advertise_addr
    return resolve_advertise_addr(cfg)


def run(cfg: FleetConfig) -> int:
    """`sglang-fleet router`: SIGTERM/SIGINT deregister, stop smg and exit 0."""
    agent = RouterAgent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run()


__all__ = ["DesiredWorker", "ROLE_BY_MODE", "RouterAgent", "advertise_addr", "choose_mode", "desired_from_services",
           "reconcile", "run"]
