"""How a node leaves: a generation (the ending steps) or for good (graceful stop, shutdown), and the
drain that comes first when the engine is still healthy. Mixed into node.Node: these are cycles of the
same loop (one action each, a sentence each) and use its state (cfg, api, rdv, heartbeat, generation,
rank, assignment, engine, serving, session, ...); node.py holds the loop and the way into a generation.

Drain (docs/protocol.md): on SIGTERM/SIGINT, rank 0 withdraws its serving registration and steps a
drain.Drain while it keeps its session and rank key, so its peers (whose engines serve the same requests)
notice nothing; the engine is stopped only when nothing is in flight or FLEET_DRAIN_TIMEOUT has passed.
A member > 0 cannot withdraw rank 0's registration: it writes K/g<G>/draining and waits (at most
FLEET_DRAIN_TIMEOUT + DRAIN_CONFIRM_MARGIN) until rank 0, which sees the key through its watch, has
withdrawn, drained and written K/g<G>/drained. A generation that ends because something failed is left
without a drain: the failed engine or peer has lost what was in flight already.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from sglang_fleet import consul_api as ca
from sglang_fleet import drain as dr
from sglang_fleet import registration as reg
from sglang_fleet import rendezvous as rdv
from sglang_fleet.engine import EngineState
from sglang_fleet.retry import backoff

EX_FATAL = 1
# A member > 0 waits FLEET_DRAIN_TIMEOUT plus this for rank 0 to confirm its drain.
DRAIN_CONFIRM_MARGIN = 5.0


class Fatal(Exception):
    """This node gives up: withdraw everything, say why in one line, exit non-zero."""

    def __init__(self, reason: str, code: int = EX_FATAL):
        self.reason, self.code = reason, code
        super().__init__(reason)


@dataclass
class Ending:
    """A generation this node is leaving; the steps run one per cycle."""
    generation: int | None
    reason: str
    own_failure: bool


class Leaving:
    """The node loop's ways out (see the module docstring); node.Node inherits them."""

    # ---- leaving a generation --------------------------------------------------------------------------
    def _end(self, view: rdv.GroupView | None, reason: str, own_failure: bool, txn: bool = True) -> str:
        """Ends (or leaves) the current generation; the clean-up steps follow, one per cycle."""
        g = self.generation
        sentence = reason
        if txn and view is not None and view.generation == g:
            cause = rdv.LOCAL_FAILURE if own_failure else rdv.PEER_LEFT
            if not self.rdv.end_generation(view, reason, cause):
                # Somebody else ended it first: then it was their event, not our failure.
                own_failure = False
                sentence = f"{reason} (generation {g} was already ended by a peer)"
        self.ending = Ending(g, reason, own_failure)
        self.drain = None  # the group is broken: what is in flight is lost already
        if own_failure:
            self.failures += 1
        return sentence

    def _step_ending(self) -> str:
        e = self.ending
        if self.serving.registered:
            return self.serving.withdraw()
        if self.engine is not None and self.engine.state is not EngineState.STOPPED:
            self.engine.stop()  # logs how it went
            return f"engine of generation {e.generation} stopped"
        if self.session is not None:
            session, self.session = self.session, None
            try:
                self.api.session_destroy(session)
            except ca.ConsulUnavailable:
                pass  # it dies with the heartbeat check or is gone with Consul's state anyway
            return f"left generation {e.generation} (session destroyed)"
        self._reset_generation()
        self.ending = None
        if e.own_failure and self.failures >= self.cfg.max_failures:
            raise Fatal(f"engine failed in {self.failures} consecutive generation(s), budget "
                        f"FLEET_MAX_FAILURES={self.cfg.max_failures} spent; last: {self.last_failure}")
        delay = backoff(self.failures, self.cfg.backoff_base, self.cfg.backoff_max)
        self.resume_at = time.monotonic() + delay
        budget = f"failure {self.failures}/{self.cfg.max_failures}" if self.failures else "no failure counted"
        return f"restarting the group in {delay:.1f} s ({budget})"

    def _reset_generation(self) -> None:
        self.generation = self.rank = self.assignment = self.engine = None
        self.engine_ready_at = self.engine_failed_at = self.restart_engine_at = None
        self.start_attempts = 0
        self.drain_confirmed = False
        self.serving.reopen()
        self.drain = self.drain_outcome = None
        structlog.contextvars.unbind_contextvars("generation", "rank")

    # ---- draining ---------------------------------------------------------------------------------------
    def _start_drain(self, why: str) -> str:
        """Rank 0: withdraw the serving registration, keep everything else running, start draining."""
        withdrew = self.serving.close()
        base_url = f"http://127.0.0.1:{self.cfg.http_port}"
        self.drain = dr.Drain(lambda: dr.requests_in_flight(base_url), self.cfg.drain_timeout)
        self.drain_outcome = None
        return f"{why}: {withdrew}; {self.drain.start()}"

    def _step_drain(self) -> str | None:
        step = self.drain.step()
        if step.done:
            self.drain, self.drain_outcome = None, step.sentence
        else:
            self._wait(step.wait)
        return step.sentence

    def _drain_for_member(self, view: rdv.GroupView) -> str | None:
        """Rank 0: a member asked (K/g<G>/draining). Withdraw, drain, then answer with K/g<G>/drained."""
        asker = view.draining.get("by") or "a member"
        if self.drain is None and self.drain_outcome is None:
            if self.serving.registered and self.cfg.drain_timeout > 0:
                return self._start_drain(f"{asker} is stopping")
            self.drain_outcome = self.serving.close()
        if self.drain is not None:
            sentence = self._step_drain()
            if self.drain is not None:
                return sentence
        if not self.rdv.confirm_drained(view, self.drain_outcome):
            self.fresh_needed = True  # the generation moved meanwhile: the next cycle follows it
            return None
        self.drain_confirmed = True
        return f"{self.drain_outcome}; told {asker} to go on stopping"

    # ---- graceful stop ----------------------------------------------------------------------------------
    def _begin_stop(self) -> str | None:
        """First cycle after SIGTERM/SIGINT: start a drain (rank 0) or ask rank 0 for one (rank > 0)."""
        if self.drain is not None:
            return "stop requested; finishing the drain first"
        if self.cfg.drain_timeout <= 0 or self.assignment is None or self.ending is not None:
            return None
        if self.rank == 0:
            return self._start_drain("stop requested") if self.serving.registered else None
        if self.engine is None or self.engine.poll() is not EngineState.RUNNING:
            return None
        g = self.generation
        try:
            view = self.rdv.read()
            asked = view.generation == g and self.rdv.request_drain(view, self.rank)
        except ca.ConsulError as exc:
            return f"stop requested; could not ask rank 0 to drain ({exc}); stopping now"
        if not asked:
            return f"stop requested; generation {g} has ended already"
        wait = self.cfg.drain_timeout + DRAIN_CONFIRM_MARGIN
        self.drain_wait_until = time.monotonic() + wait
        return (f"stop requested; asked rank 0 ({self.assignment.node_of(0)}) to withdraw and drain "
                f"generation {g} first (waiting up to {wait:g} s)")

    def _stop_cycle(self) -> str | None:
        """One cycle while stopping: step the drain, or look whether rank 0 has drained for us."""
        self.idle_wait = 0.0
        if self.stop_signals > 1:  # a second signal: stop now
            sentence = (self.drain.cut_short("a second stop signal") if self.drain is not None
                        else "a second stop signal: not waiting for rank 0's drain")
            self.drain = self.drain_wait_until = None
            return sentence
        if self.drain is not None:
            return self._step_drain()
        g, now = self.generation, time.monotonic()
        if now >= self.drain_wait_until:
            self.drain_wait_until = None
            return f"rank 0 did not confirm the drain of generation {g} in time; stopping anyway"
        view = self.rdv.read()
        gone = rdv.departures(view, self.assignment)
        done = (f"generation {g} ended meanwhile" if view.generation != g
                else f"rank 0 drained generation {g} ({view.drained.get('how')})" if view.drained is not None
                else f"{gone[0].node} (rank {gone[0].rank}) left generation {g}" if gone else None)
        if done:
            self.drain_wait_until = None
            return f"{done}; stopping"
        self._wait(min(1.0, self.drain_wait_until - now))
        return f"waiting for rank 0 to drain generation {g}"

    # ---- shutdown --------------------------------------------------------------------------------------
    def shutdown(self, why: str) -> None:
        """Withdraw serving, stop the engine, destroy the session, deregister the heartbeat. Best effort."""
        steps = []
        if self.serving.registered:
            steps.append(self.serving.withdraw())
        if self.engine is not None and self.engine.state is not EngineState.STOPPED:
            steps.append(self.engine.stop())
        if self.session:
            try:
                self.api.session_destroy(self.session)
                steps.append("session destroyed")
            except ca.ConsulError as exc:
                steps.append(f"session not destroyed ({exc})")
            self.session = None
        self.helpers_stop.set()
        self.heartbeat.join(timeout=3)
        try:
            self.api.deregister_service(reg.member_id(self.cfg))
            steps.append("heartbeat deregistered")
        except ca.ConsulError as exc:
            steps.append(f"heartbeat not deregistered ({exc})")
        self.log.info(f"{why}: " + "; ".join(steps))


__all__ = ["DRAIN_CONFIRM_MARGIN", "EX_FATAL", "Ending", "Fatal", "Leaving"]
