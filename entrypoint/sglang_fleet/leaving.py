"""How a node leaves: a generation (the leaving steps) or for good (graceful stop), and the drain that
comes first when the engine is still healthy. `Leaving` is a collaborator of node.Node: it works on the
membership (membership.py: the current Generation, the serving registration) and returns one
membership.Step per cycle of the node's loop; the node keeps its loop, its engine start and its budget.

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

from sglang_fleet import consul_api as ca
from sglang_fleet import drain as dr
from sglang_fleet.config import FleetConfig
from sglang_fleet.engine import EngineState
from sglang_fleet.membership import Generation, Membership, Step

EX_FATAL = 1
# A member > 0 waits FLEET_DRAIN_TIMEOUT plus this for rank 0 to confirm its drain.
DRAIN_CONFIRM_MARGIN = 5.0
STOP_POLL = 0.05  # seconds between looks at an engine that is stopping


class Fatal(Exception):
    """This node gives up: withdraw everything, say why in one line, exit non-zero."""

    def __init__(self, reason: str, code: int = EX_FATAL):
        self.reason, self.code = reason, code
        super().__init__(reason)


class Leaving:
    """The node's ways out (see the module docstring)."""

    def __init__(self, cfg: FleetConfig, membership: Membership):
        self.cfg = cfg
        self.membership = membership
        self.serving = membership.serving
        self.stopping = False  # a stop signal came: drain (maybe), then shut down
        self.stop_signals = 0  # a second one cuts a drain short
        self.drain_wait_until: float | None = None  # a member > 0 waits for rank 0's drain until then

    @property
    def gen(self) -> Generation:
        return self.membership.gen

    @property
    def done(self) -> bool:
        """Stopping, with no drain under way or awaited: time for the shutdown."""
        return self.stopping and self.gen.drain is None and self.drain_wait_until is None

    # ---- leaving a generation --------------------------------------------------------------------------
    def step_ending(self) -> Step | None:
        """One leaving step: withdraw serving, stop the engine (non-blocking: SIGTERM now, poll() escalates),
        destroy the session. None once nothing is left to do."""
        gen = self.gen
        if self.serving.registered:
            return Step.acted(self.serving.withdraw())
        engine = gen.engine
        if engine is not None and engine.state is not EngineState.STOPPED:
            if not gen.stopping_engine:
                gen.stopping_engine = True
                engine.stop(wait=False)  # logs how it goes
            if engine.poll() is not EngineState.STOPPED:
                return Step.waiting(None, STOP_POLL)
            return Step.acted(f"engine of generation {gen.ending.generation} stopped")
        left = self.membership.leave()
        return Step.acted(left) if left else None

    # ---- draining ---------------------------------------------------------------------------------------
    def start_drain(self, why: str) -> str:
        """Rank 0: withdraw the serving registration, keep everything else running, start draining."""
        gen = self.gen
        withdrew = self.serving.close()
        base_url = f"http://127.0.0.1:{self.cfg.http_port}"
        key = self.cfg.engine_api_key
        gen.drain = dr.Drain(lambda: dr.requests_in_flight(base_url, api_key=key), self.cfg.drain_timeout)
        gen.drain_outcome = None
        return f"{why}: {withdrew}; {gen.drain.start()}"

    def step_drain(self) -> Step:
        gen = self.gen
        step = gen.drain.step()
        if step.done:
            gen.drain, gen.drain_outcome = None, step.sentence
            return Step.acted(step.sentence)
        return Step.waiting(step.sentence, step.wait)

    def drain_for_member(self, view) -> Step:
        """Rank 0: a member asked (K/g<G>/draining). Withdraw, drain, then answer with K/g<G>/drained."""
        gen = self.gen
        asker = view.draining.get("by") or "a member"
        if gen.drain is None and gen.drain_outcome is None:
            if self.serving.registered and self.cfg.drain_timeout > 0:
                return Step.acted(self.start_drain(f"{asker} is stopping"))
            gen.drain_outcome = self.serving.close()
        if gen.drain is not None:
            step = self.step_drain()
            if gen.drain is not None:
                return step
        if not self.membership.rdv.confirm_drained(view, gen.drain_outcome):
            return Step.acted(None)  # the generation moved meanwhile: the next step follows it
        gen.drain_confirmed = True
        return Step.acted(f"{gen.drain_outcome}; told {asker} to go on stopping")

    # ---- graceful stop ----------------------------------------------------------------------------------
    def begin_stop(self) -> str | None:
        """First cycle after SIGTERM/SIGINT: start a drain (rank 0) or ask rank 0 for one (rank > 0)."""
        self.stopping = True
        gen = self.gen
        if gen.drain is not None:
            return "stop requested; finishing the drain first"
        if self.cfg.drain_timeout <= 0 or gen.assignment is None or gen.ending is not None:
            return None
        if gen.rank == 0:
            return self.start_drain("stop requested") if self.serving.registered else None
        if gen.engine is None or gen.engine.poll() is not EngineState.RUNNING:
            return None
        g, rdv = gen.number, self.membership.rdv
        try:
            view = rdv.read()
            asked = view.generation == g and rdv.request_drain(view, gen.rank)
        except ca.ConsulError as exc:
            return f"stop requested; could not ask rank 0 to drain ({exc}); stopping now"
        if not asked:
            return f"stop requested; generation {g} has ended already"
        wait = self.cfg.drain_timeout + DRAIN_CONFIRM_MARGIN
        self.drain_wait_until = time.monotonic() + wait
        return (f"stop requested; asked rank 0 ({gen.assignment.node_of(0)}) to withdraw and drain "
                f"generation {g} first (waiting up to {wait:g} s)")

    def stop_cycle(self) -> Step:
        """One cycle while stopping: step the drain, or look whether rank 0 has drained for us."""
        gen = self.gen
        if self.stop_signals > 1:  # a second signal: stop now
            sentence = (gen.drain.cut_short("a second stop signal") if gen.drain is not None
                        else "a second stop signal: not waiting for rank 0's drain")
            gen.drain = self.drain_wait_until = None
            return Step.acted(sentence)
        if gen.drain is not None:
            return self.step_drain()
        g, now = gen.number, time.monotonic()
        if now >= self.drain_wait_until:
            self.drain_wait_until = None
            return Step.acted(f"rank 0 did not confirm the drain of generation {g} in time; stopping anyway")
        view = self.membership.rdv.read()
        gone = self.membership.departures(view)
        done = (f"generation {g} ended meanwhile" if view.generation != g
                else f"rank 0 drained generation {g} ({view.drained.get('how')})" if view.drained is not None
                else f"{gone[0].node} (rank {gone[0].rank}) left generation {g}" if gone else None)
        if done:
            self.drain_wait_until = None
            return Step.acted(f"{done}; stopping")
        return Step.waiting(f"waiting for rank 0 to drain generation {g}", min(1.0, self.drain_wait_until - now))


__all__ = ["DRAIN_CONFIRM_MARGIN", "EX_FATAL", "Fatal", "Leaving", "STOP_POLL"]
