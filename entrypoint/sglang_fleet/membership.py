"""One node's membership in its group (docs/protocol.md): the rendezvous handler.

`Membership` owns what this node is in the group: its session, generation, rank and assignment (one
`Generation` object, replaced whole when the node leaves a generation) and the serving registration
(registration.ServingRegistration). `step(view) -> Step` looks at one read of the group's keys and takes
at most one action, in the protocol's order: create K/gen, join (session), claim a rank, publish the
leader (rank 0), pass the barrier (fingerprints agree), then watch for departures and drain requests;
after a Consul outage that cost sessions or keys, re-attach to the same generation (`_reattach`). It
never blocks and never sleeps: what to do next is in the Step it returns (torch elastic's
`_RendezvousOpExecutor` and its `_Action` are the model):

  WAIT         nothing to do until the view changes or `wait` seconds pass
  ACTED        wrote to Consul (or moved on): read again at once
  DISAGREE     the members' settings differ (`problems`): start nothing, look again later
  RUN          the barrier holds and every member of it is still there: the node runs its engine
  DRAIN        rank 0: a member asked for a drain before it stops (K/g<G>/draining)
  ENDED        this generation is over for this node (`generation.ending` says why): leave it
  UNAVAILABLE  Consul did not answer or refused: the sentence says so, retry after `wait`

`next()` reads the view when needed and turns Consul's errors into Steps (`guarded`): an outage is a
returned sentence (Patroni's "DCS is not accessible"), not an exception for the caller to catch.
`node.Node` and `nccl_check.Check` both drive it.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import structlog

from sglang_fleet import consul_api as ca
from sglang_fleet import logs
from sglang_fleet import rendezvous as rdv
from sglang_fleet.retry import backoff

if TYPE_CHECKING:
    from sglang_fleet.drain import Drain
    from sglang_fleet.registration import Heartbeat, ServingRegistration

RE_READ_EVERY = 5.0  # seconds; the watcher wakes the loop on every change, this is only a backstop
BARRIER_WAIT = 1.0  # seconds between looks while waiting for peers, a rank or agreeing settings


class Action(enum.Enum):
    WAIT = "wait"
    ACTED = "acted"
    DISAGREE = "disagree"
    RUN = "run"
    DRAIN = "drain"
    ENDED = "ended"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Step:
    """What one step did (`sentence`, None: nothing worth saying) and what comes next: wait up to `wait`
    seconds (a change in the group wakes the caller earlier), then read Consul again if `reread`."""
    action: Action
    sentence: str | None = None
    wait: float = 0.0
    reread: bool = False
    warning: bool = False  # log the sentence as a warning (an outage)
    problems: tuple[str, ...] = ()  # DISAGREE: one phrase per differing setting

    @classmethod
    def acted(cls, sentence: str | None) -> "Step":
        return cls(Action.ACTED, sentence, 0.0, reread=True)

    @classmethod
    def waiting(cls, sentence: str | None, wait: float) -> "Step":
        return cls(Action.WAIT, sentence, wait)


@dataclass(frozen=True)
class Ending:
    """Why this node leaves its generation; the leaving steps (leaving.py) run one per cycle."""
    generation: int | None
    reason: str
    own_failure: bool
    cause: str = "other"  # why, as a label (the node's restart metric): peer_left, state_lost, other


@dataclass
class Generation:
    """Everything that lives exactly as long as this node's part in one generation. Replaced whole, never
    reset field by field (`Membership.reset`)."""
    number: int | None = None
    gen_index: int = 0  # ModifyIndex of K/gen when joined: a different one means Consul lost its state
    reregistrations: int = 0  # the heartbeat's re-registrations when joined
    session: str | None = None
    rank: int | None = None
    assignment: rdv.Assignment | None = None
    ending: Ending | None = None
    drain_confirmed: bool = False  # rank 0 wrote K/g<G>/drained for a member
    reattach_since: float | None = None  # monotonic: a re-attach after a Consul outage began (docs/protocol.md)
    reattach_session: str | None = None  # the session created for that re-attach
    # What the node runs in it (node.py, leaving.py):
    engine: Any = None  # engine.Engine
    ready_at: float | None = None  # monotonic time the engine was first ready
    announced_pid: int | None = None  # the engine process the node last said "started" of
    stopping_engine: bool = False  # leaving: the engine's stop has been sent (poll() finishes it)
    drain: Drain | None = None
    drain_outcome: str | None = None  # how the last drain ended (rank 0)


class Membership:
    def __init__(self, rendezvous: rdv.Rendezvous, heartbeat: Heartbeat,
                 serving: ServingRegistration | None = None, agree_on: tuple[str, ...] = (),
                 reattach_window: float = 0.0, engine_ok: Callable[[], bool] | None = None):
        self.rdv = rendezvous
        self.heartbeat = heartbeat
        self.serving = serving  # None: this member never serves (nccl-check)
        self.agree_on = rdv.FINGERPRINT_FIELDS + agree_on  # fingerprint fields every member must share
        self.gen = Generation()
        self.view: rdv.GroupView | None = None
        self.view_at = 0.0
        self.fresh = True  # read Consul before the next step (woken, or we just acted)
        self.consul_errors = 0
        # Re-attach after a Consul outage (off: 0 s, or nobody to ask whether the engine is still healthy).
        self.reattach_window = reattach_window if engine_ok is not None else 0.0
        self.engine_ok = engine_ok
        self.consul_failed_at: float | None = None  # monotonic: the last cycle Consul did not answer
        self.log = logs.get("sglang_fleet.node")

    # ---- what this node is in its group ----------------------------------------------------------------
    @property
    def session(self) -> str | None:
        return self.gen.session

    @property
    def rank(self) -> int | None:
        return self.gen.rank

    @property
    def generation(self) -> int | None:
        return self.gen.number

    @property
    def assignment(self) -> rdv.Assignment | None:
        return self.gen.assignment

    # ---- driving it ------------------------------------------------------------------------------------
    def next(self) -> Step:
        """One step over a view read now (or at most RE_READ_EVERY ago when nothing changed meanwhile).
        Consul's errors pass through: run it inside `guarded`."""
        if not self.heartbeat.registered.is_set():
            return Step.waiting("waiting for the heartbeat check to be registered in Consul", 0.2)
        now = time.monotonic()
        if self.fresh or self.view is None or now - self.view_at > RE_READ_EVERY:
            self.view, self.view_at, self.fresh = self.rdv.read(), now, False
        return self.step(self.view)

    def guarded(self, cycle: Callable[[], Step],
                on_error: Callable[[ca.ConsulError], None] | None = None) -> Step:
        """Runs one cycle (Consul reads and writes in it); Consul's errors become Steps. `on_error` is told
        of each error first (the node's metrics count them)."""
        try:
            step = cycle()
        except ca.ConsulError as exc:
            if on_error is not None:
                on_error(exc)
            return self._consul_failed(exc)
        self._recovered()
        return step

    def _consul_failed(self, exc: ca.ConsulError) -> Step:
        if isinstance(exc, ca.ConsulConflict):
            # Somebody changed the group between our read and our write: read again.
            return Step.acted(f"lost a race in Consul ({exc}); re-reading")
        self.consul_errors += 1
        if isinstance(exc, ca.ConsulUnavailable):
            self.consul_failed_at = time.monotonic()
            engine = self.gen.engine
            running = " the engine keeps running;" if engine is not None and engine.pid else ""
            return Step(Action.UNAVAILABLE, f"Consul unavailable ({exc});{running} retrying",
                        backoff(self.consul_errors, 0.5, 5.0), reread=True, warning=True)
        # e.g. ACL denied: not transient, but do not crash
        return Step(Action.UNAVAILABLE, f"Consul refused a request ({exc}); retrying",
                    backoff(self.consul_errors, 1.0, 30.0), reread=True)

    def _recovered(self) -> None:
        if self.consul_errors:
            self.log.info(f"Consul answers again after {self.consul_errors} failed attempt(s)")
        self.consul_errors = 0

    # ---- one step: at most one action ------------------------------------------------------------------
    def step(self, view: rdv.GroupView) -> Step:
        gen, g = self.gen, self.gen.number
        if gen.assignment is not None and self.reattach_window > 0:
            reattach = self._reattach(view)
            if reattach is not None:
                return reattach
        if g is not None:
            lost = self._state_lost(view)
            if lost:
                return self.end(None, f"Consul lost its state ({lost}); leaving generation {g}", txn=False,
                                cause="state_lost")

        if view.generation is None:
            self.rdv.ensure_generation()
            return Step.acted(f"created generation 0 of group {self.rdv.keys.group}")

        if g is not None and view.generation != g:
            ended = view.ended.get(g)
            why = (f"generation {g} ended by {ended.get('by')}: {ended.get('reason')}" if ended
                   else f"generation moved from {g} to {view.generation}")
            return self.end(None, why, txn=False)

        if gen.session is None:
            return self._join(view)

        if gen.rank is not None and view.rank_of(gen.session) is None:
            who = "my session" if gen.assignment is None else "my rank key"
            return self.end(view, f"{who} in generation {g} is gone (heartbeat missed?); rejoining",
                            txn=gen.assignment is not None)

        if gen.rank is None:
            return self._claim(view)

        if gen.rank == 0 and view.leader is None:
            return Step.acted(self.rdv.publish_leader(view, gen.session))

        if gen.assignment is None:
            return self._barrier(view)

        gone = self.departures(view)
        if gone:
            return self.end(view, f"peer {_names(gone)} left; ending generation {g}", cause="peer_left")

        if gen.rank == 0 and view.draining is not None and not gen.drain_confirmed:
            return Step(Action.DRAIN)
        return Step(Action.RUN)

    def _state_lost(self, view: rdv.GroupView) -> str | None:
        """Why the Consul state this generation was built on is gone, or None."""
        if view.generation is None:
            return "the group's keys are gone"
        if self.heartbeat.re_registrations != self.gen.reregistrations:
            return "the agent forgot our heartbeat check: restarted?"
        # K/gen changes only by CAS to G+1: the same G under another ModifyIndex was created anew (an
        # emptied Consul, re-filled by a peer that noticed first).
        if view.generation == self.gen.number and view.gen_index != self.gen.gen_index:
            return "the generation key was created anew since it was joined"
        return None

    def _join(self, view: rdv.GroupView) -> Step:
        if not self.heartbeat.keeping_up():
            # The session lives only as long as our own passes keep the check passing (registration.py
            # Heartbeat.keeping_up): joining on a check passed by a stale request dooms the generation.
            why = f" ({self.heartbeat.last_error})" if self.heartbeat.last_error else ""
            return Step.waiting(f"waiting for the heartbeat to reach Consul before joining generation "
                                f"{view.generation}{why}", 0.5)
        self.gen = Generation(number=view.generation, gen_index=view.gen_index,
                              reregistrations=self.heartbeat.re_registrations,
                              session=self.rdv.create_session(self.heartbeat.check_id))
        structlog.contextvars.bind_contextvars(generation=self.gen.number)
        return Step.acted(f"joined generation {self.gen.number} with session {self.gen.session[:8]}")

    def _claim(self, view: rdv.GroupView) -> Step:
        try:
            rank, sentence = self.rdv.claim_rank(view, self.gen.session)
        except ca.ConsulNotFound:  # invalidated while we waited for a rank: no retry brings it back
            return self.end(None, f"my session in generation {self.gen.number} is gone (heartbeat missed?); "
                                  f"rejoining", txn=False)
        if rank is None:
            return Step.waiting(sentence, BARRIER_WAIT)
        self.gen.rank = rank
        structlog.contextvars.bind_contextvars(rank=rank)
        return Step.acted(sentence)

    def _barrier(self, view: rdv.GroupView) -> Step:
        gen = self.gen
        passed, sentence = rdv.barrier(view, gen.number, self.rdv.cfg.nnodes)
        if not passed:
            return Step.waiting(sentence, BARRIER_WAIT)
        problems = rdv.fingerprint_mismatches(view, self.rdv.fingerprint, self.rdv.node, self.agree_on)
        if problems:
            return Step(Action.DISAGREE, f"config mismatch in generation {gen.number}: {'; '.join(problems)}; "
                                         f"starting nothing", BARRIER_WAIT, problems=tuple(problems))
        gen.assignment = self.rdv.assignment(view, gen.rank)
        return Step.acted(f"barrier passed: rank {gen.rank} of {self.rdv.cfg.nnodes} in generation "
                          f"{gen.number}, dist-init {gen.assignment.dist_init_addr}")

    # ---- re-attach after a Consul outage (docs/protocol.md) ----------------------------------------------
    def _reattach(self, view: rdv.GroupView) -> Step | None:
        """One step of taking this generation back after Consul lost sessions or keys while the engines
        kept serving; None: nothing to re-attach, or the generation must end the usual way."""
        gen, g, a = self.gen, self.gen.number, self.gen.assignment
        if view.generation is not None and view.generation != g:
            return None  # it moved on: ended by a peer
        if any(_replaced(view, m) for m in a.members):
            return None  # somebody else holds a rank of the barrier: a real replacement ends it
        missing = [m for m in a.members if not _same_member(view, m)]
        if not missing and view.generation is not None and gen.reattach_since is None:
            gen.reregistrations = self.heartbeat.re_registrations  # the session held: nothing was lost
            # A peer that re-attached after this member had finished (its session died later): same member,
            # new session. Only a re-attach writes the record of the barrier again.
            back = [m.node for m in a.members if view.members[m.rank].session != m.session]
            if not back:
                return None
            gen.assignment = dataclasses.replace(a, members=tuple(view.members[m.rank] for m in a.members))
            return Step.acted(f"{', '.join(back)} re-attached to generation {g} with a new session")
        now = time.monotonic()
        if gen.reattach_since is None:
            if not self._consul_failed_recently(now):
                return None  # no outage: a key gone is a member gone, as before
            if not self.engine_ok():
                return None
            gen.reattach_since = now
            return Step.acted(f"Consul lost {_lost(view, missing)} of generation {g}; the engine is healthy: "
                              f"re-attaching (FLEET_REATTACH_WINDOW={self.reattach_window:g} s)")
        if not self.engine_ok():
            return self._end_reattach(view, f"the engine failed while re-attaching to generation {g}; ending it")
        left = self.reattach_window - (now - gen.reattach_since)
        if left <= 0:
            names = _names(missing) or "the group's keys"
            return self._end_reattach(view, f"{names} did not re-attach to generation {g} within "
                                            f"FLEET_REATTACH_WINDOW={self.reattach_window:g} s; ending it")
        wait = min(BARRIER_WAIT, left)
        if view.generation is None:
            if gen.rank == 0:
                return Step.acted(self.rdv.recreate_generation(g))
            return Step.waiting(f"re-attaching: waiting for rank 0 ({a.node_of(0)}) to re-create generation {g}",
                                wait)
        me = next(m for m in a.members if m.rank == gen.rank)
        if me in missing:
            return self._reclaim(view, me, wait)
        if gen.rank == 0 and view.leader is None:
            return Step.acted(self.rdv.publish_leader(view, gen.session))
        if missing:
            return Step.waiting(f"re-attaching to generation {g}: waiting for {_names(missing)} ({left:.0f} s left)",
                                wait)
        if view.leader is None:
            return Step.waiting(f"re-attaching to generation {g}: waiting for rank 0 ({a.node_of(0)}) to "
                                f"publish the leader again", wait)
        took = now - gen.reattach_since
        gen.assignment = dataclasses.replace(a, members=tuple(view.members[m.rank] for m in a.members))
        gen.gen_index, gen.reregistrations = view.gen_index, self.heartbeat.re_registrations
        gen.reattach_since = gen.reattach_session = None
        sentence = f"re-attached to generation {g}: all {len(a.members)} members back after {took:.1f} s"
        if gen.rank == 0 and self.serving is not None and self.serving.registered:
            sentence += "; " + self.serving.register(g)
        return Step.acted(sentence)

    def _reclaim(self, view: rdv.GroupView, me: rdv.Member, wait: float) -> Step:
        """Own part of a re-attach: a new session (once the heartbeat passes again), then the old rank key."""
        gen, g = self.gen, self.gen.number
        if gen.reattach_session is None or gen.session != gen.reattach_session:
            if not self.heartbeat.keeping_up():
                return Step.waiting(f"re-attaching: waiting for the heartbeat to reach Consul before taking "
                                    f"rank {gen.rank} of generation {g} back", min(0.5, wait))
            old, gen.session = gen.session, self.rdv.create_session(self.heartbeat.check_id)
            gen.reattach_session = gen.session
            if old:
                try:
                    self.rdv.store.session_destroy(old)
                except ca.ConsulError:
                    pass  # gone with the outage already, which is why we are here
            return Step.acted(f"re-attaching: new session {gen.session[:8]} for rank {gen.rank} of generation {g}")
        try:
            self.rdv.reclaim_rank(view, me, gen.session)
        except ca.ConsulConflict:
            # Taken meanwhile (the next view shows by whom and ends the generation), gen moved, or this
            # session died too (then make another).
            gen.reattach_session = None
            return Step.acted(None)
        return Step.acted(f"re-attaching: took rank {gen.rank} of generation {g} back")

    def _end_reattach(self, view: rdv.GroupView, reason: str) -> Step:
        self.gen.reattach_since = None
        return self.end(view, reason, txn=view.generation == self.gen.number)

    def _consul_failed_recently(self, now: float) -> bool:
        """This node saw Consul fail (its own reads, its heartbeat, its agent's state) within the window."""
        failures = [t for t in (self.consul_failed_at, self.heartbeat.failed_at) if t is not None]
        return (self.heartbeat.re_registrations != self.gen.reregistrations
                or any(now - t <= self.reattach_window for t in failures))

    def departures(self, view: rdv.GroupView) -> list[rdv.Member]:
        """Members of this node's barrier who are gone from `view` (none before the barrier)."""
        return rdv.departures(view, self.gen.assignment) if self.gen.assignment is not None else []

    # ---- leaving a generation --------------------------------------------------------------------------
    def end(self, view: rdv.GroupView | None, reason: str, own_failure: bool = False, txn: bool = True,
            cause: str = "other") -> Step:
        """Ends (txn: in Consul, when `view` still shows this generation) or just leaves the current
        generation; the leaving steps follow, one per cycle (leaving.py)."""
        g = self.gen.number
        sentence = reason
        if txn and view is not None and view.generation == g:
            recorded = rdv.LOCAL_FAILURE if own_failure else rdv.PEER_LEFT
            if not self.rdv.end_generation(view, reason, recorded):
                # Somebody else ended it first: then it was their event, not our failure.
                own_failure = False
                sentence = f"{reason} (generation {g} was already ended by a peer)"
        self.gen.ending = Ending(g, reason, own_failure, cause)
        self.gen.drain = None  # the group is broken: what is in flight is lost already
        return Step(Action.ENDED, sentence, reread=True)

    def leave(self) -> str | None:
        """Destroys the generation's session (its rank key goes with it); None when there is none."""
        session, self.gen.session = self.gen.session, None
        if session is None:
            return None
        try:
            self.rdv.store.session_destroy(session)
        except ca.ConsulUnavailable:
            pass  # it dies with the heartbeat check or is gone with Consul's state anyway
        return f"left generation {self.gen.number} (session destroyed)"

    def reset(self) -> Generation:
        """Starts over outside any generation; returns the one left."""
        old, self.gen = self.gen, Generation()
        if self.serving is not None:
            self.serving.reopen()
        structlog.contextvars.unbind_contextvars("generation", "rank")
        return old


def _same_member(view: rdv.GroupView, m: rdv.Member) -> bool:
    """`m`'s rank key is held by `m` itself (same node and supervisor process), whichever its session."""
    now = view.members.get(m.rank)
    return now is not None and (now.node, now.pid, now.started) == (m.node, m.pid, m.started)


def _replaced(view: rdv.GroupView, m: rdv.Member) -> bool:
    """`m`'s rank key is held by somebody else: a replacement took it."""
    return m.rank in view.members and not _same_member(view, m)


def _lost(view: rdv.GroupView, missing: list[rdv.Member]) -> str:
    if view.generation is None:
        return "the group's keys"
    return "the rank keys of " + _names(missing)


def _names(members: list[rdv.Member]) -> str:
    return ", ".join(f"{m.node} (rank {m.rank})" for m in members)


__all__ = ["Action", "BARRIER_WAIT", "Ending", "Generation", "Membership", "RE_READ_EVERY", "Step"]
