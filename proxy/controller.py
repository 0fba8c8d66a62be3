"""The release controller: guard verdicts, the rollback latch, rollout steps, admin actions.

Rules:
- Every `TICK` seconds: judge the canary from what the guard's source says of
  the window (sources.py: this process's windows, or the fleet's counts in
  Prometheus) with a pure verdict, act on a breach per `on_breach`, then feed
  the verdict to the rollout state machine. A source that cannot answer gives
  an inconclusive verdict, on which a rollout does not step. With the
  Prometheus source the window's tests are the fleet's; the cumulative tests
  (sequential.py), which count this process's outcomes, still gate the steps
  but never breach, so that every replica reaches the same verdict. Decisions
  are pure (guard.verdict, rollout.advance); this module only applies them:
  recompile routing, persist, notify.
- A rollback is in force *before* it is written down: routing flips to stable
  in memory first, then the state file is written atomically, then the event
  is logged and the webhook is called in the background (bounded retries,
  never blocking anything).
- A state that cannot be written stays in force in memory (a latch is never
  undone for want of a disk): the failure is counted
  (`turnout_state_write_failures_total`), logged once per distinct error,
  shown in /status `state`, and the write is retried every RETRY seconds
  until it succeeds. While a set latch is unsaved the proxy is not ready
  (/readyz 503): a restart would forget it. An action that sets the latch is
  reported done (`confirm`) only once it is on disk and in force in every
  worker.
- The latch survives reloads and restarts. It is cleared only by `resume`, or
  when `versions.<canary>.release` changes (a new build, which also restarts
  the rollout from its first step).
- A state file that cannot be read at start leaves the proxy latched to
  stable, with the reason saying why — never silently fresh.
- Under `--workers N` (workers.py) the leading worker runs all of the above on
  the fleet's summed counts and is the only writer of the state file; each
  state it puts in force gets a `mark` (its start time, a sequence number)
  and is handed to `share` (the fleet's ledger) and pushed to the followers.
  A following controller (`follower=True`) judges nothing, writes nothing,
  and `adopt`s the newest state the leader pushed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from . import rollout, sources, state
from .config import Config
from .guard import (
    BREACH,
    INCONCLUSIVE,
    UPPER_MS,
    FleetCounts,
    Policy,
    Stats,
    Verdict,
    Window,
    thresholds,
    verdict,
)
from .rollout import Forbidden, IllegalTransition, Pause, Progress, Promote, Resume, Tick
from .sequential import Cumulative, Outcomes
from .state import Latch, State, StateError
from .store import Redis, Unavailable

if TYPE_CHECKING:
    from .metrics import Recorder
    from .runtime import Runtime

log = logging.getLogger("turnout.controller")

T = TypeVar("T")

TICK = 0.25  # seconds between verdicts: a bound on detection latency beyond the evidence
RETRY = 1.0  # seconds between attempts to write a state file that could not be written
DEFAULT_POLICY = Policy()  # without a guard section a rollout still needs min_requests per step
MAX_EVENTS = 500  # kept in memory for GET /events
ALL_ROLES = frozenset({rollout.ANY_ROLE})  # a loopback caller when no tokens are configured


class ActionError(Exception):
    """An admin action that cannot be done now (HTTP 409), or is not allowed (403)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class Controller:
    def __init__(
        self,
        runtime: Runtime,
        notify: Callable[[dict], None] | None = None,
        follower: bool = False,
        store: Redis | None = None,
    ) -> None:
        self.runtime = runtime
        self.follower = follower  # a following worker: the state file decides
        # state.backend redis: the fleet's state, taken and changed in transactions
        # (store.py); None: the state file is the only record
        self.store = store
        self.intents: list[tuple[str, tuple]] = []  # rollbacks and pauses not yet in Redis
        self.in_change = False  # a change of the fleet's state is being applied
        self.fleet_events: list[dict] = []  # the events of the change being applied
        self.fleet_external: list[bool] = []  # ... and whether each leaves the process
        self.changing = asyncio.Lock()  # one change of the fleet's state at a time
        self.pushes: set[asyncio.Task] = set()
        # Where the guard and the rollout read counts: this process's Recorder, or
        # the sum over a fleet of workers; `collect` refreshes that sum each tick.
        self.counts: Callable[[], Recorder] = lambda: runtime.recorder
        # Under workers, on the leader: push the state in force to every follower and
        # take their counts (workers.Fleet.sync); `share` keeps the state in the
        # fleet's ledger, `keep` the guard's windows.
        self.collect: Callable[[], Awaitable[dict[int, str]]] | None = None
        self.share: Callable[[dict], object] | None = None
        self.keep: Callable[[dict], object] | None = None
        # The state in force is (epoch, seq): a leader that starts later has a larger
        # epoch (the clock is the machine's), each change a larger seq. A follower
        # keeps the mark of the state it adopted and never goes back to an older one.
        self.epoch = time.monotonic_ns()
        self.seq = 0
        self.mark: tuple[int, int] | None = None
        self.write_error: str | None = None  # why the state in force is not on disk
        self.unsaved_since: float | None = None
        self.retry_at = 0.0
        self.notify = notify  # called with each event that leaves the process (the webhook)
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self.windows: dict[str, Window] = {}
        self.window_length = 0.0
        # Recorder totals at the last feed, per (version, shadow)
        self.seen: dict[tuple[str, bool], tuple[int, int, list[int]]] = {}
        self.last_verdict: Verdict | None = None
        # The guard's slow speed: cumulative tests since the step began (sequential.py),
        # for the step, policy and judging episode in `cumulative_key`.
        self.cumulative: Cumulative | None = None
        self.cumulative_key: tuple | None = None
        self.alerting = False  # an `alert` breach episode is in progress
        self.last_tick: Tick | None = None  # what the rollout was last judged on
        self.task: asyncio.Task | None = None
        self.make_windows(runtime.config)
        self.source = self.make_source(runtime.config)  # where the guard reads its window
        self.closing: asyncio.Task | None = None  # a replaced source, closing

    # -- start ---------------------------------------------------------------------------

    def restore(self, shared: dict | None = None) -> None:
        """Take the state from `shared` (the fleet's ledger, newer than the file) or
        the state file; latch to stable if the file cannot be trusted."""
        rt = self.runtime
        cfg = rt.config
        saved = None
        if shared is not None:
            try:
                saved = self.shared_state(shared)
            except StateError as err:
                log.error("%s: reading the state file instead", err)
        if saved is None:
            try:
                saved = state.load(cfg.state_file)
            except StateError as err:
                self.start_latched(err)
                return
        rt.latch = saved.latch
        if saved.rollout is not None and cfg.rollout is not None:
            # The saved request base is the dead process's canary count; this process
            # counts from 0, so the step's count starts again at the next tick.
            saved_progress = rollout.from_dict(saved.rollout)
            rt.progress = replace(saved_progress, step_base_requests=rollout.UNKNOWN)
        if saved.release != _release(cfg) and (saved.latch.active or saved.rollout):
            self.new_release(cfg, saved.release)
        elif cfg.rollout is not None and rt.progress is None:
            rt.progress = rollout.start(cfg.rollout, time.time(), self.canary_requests)
        elif cfg.rollout is not None and rt.progress is not None:
            rt.progress = _fit(rt.progress, cfg, self.canary_requests)  # steps may be fewer
        rt.refresh()
        rt.recorder.rollout_step = rt.progress.step if rt.progress else 0
        if rt.latch.active:
            where = "the fleet's ledger" if self.mark is not None else cfg.state_file
            log.warning("rollback latch restored from %s: %s", where, rt.latch.reason)
        self.persist()

    def shared_state(self, shared: dict) -> State:
        """The state in a ledger doc (StateError when it is not one); its mark is kept."""
        try:
            saved = state.from_json(shared["state"])
            mark = (int(shared["mark"][0]), int(shared["mark"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise StateError(f"the fleet's copy of the state is unusable: {err}") from err
        self.mark = mark
        return saved

    def start_latched(self, err: StateError) -> None:
        """The state cannot be trusted: start latched to stable, saying why."""
        rt = self.runtime
        cfg = rt.config
        rt.latch = Latch(
            active=True, reason=f"state file unreadable, starting safe: {err}",
            at=time.time(), release=_release(cfg), actor="turnout",
        )  # fmt: skip
        # The rollout's place is lost with the file: it starts over at step 0, which
        # the latch holds at weight 0 until an operator resumes.
        if cfg.rollout is not None:
            rt.progress = rollout.start(cfg.rollout, time.time(), self.canary_requests)
        rt.refresh()
        rt.recorder.rollout_step = rt.progress.step if rt.progress else 0
        log.error("ROLLBACK LATCHED at start: %s", err)
        self.event("rollback", reason=rt.latch.reason, actor="turnout")
        # The unreadable file is left for the operator to inspect; a restart reads
        # it again and latches again, so the latch is as durable as the file. The
        # followers still get it.
        self.seq += 1
        if self.share is not None:
            self.share(self.current())

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())
        if not self.follower:
            self.source.start()

    async def stop(self) -> None:
        if self.task is not None:  # first: no tick may take the lease again meanwhile
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await self.source.close()
        if self.closing is not None:
            await self.closing
        if self.pushes:
            await asyncio.wait(set(self.pushes), timeout=1.0)
        if self.store is not None:
            await self.store.flush_audit()
            await self.store.close()

    async def run(self) -> None:
        if self.follower:
            return  # the leader pushes what is in force (`adopt`)
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.turn()
            except Exception:  # the controller must outlive any one bad tick
                log.exception("controller tick failed")

    async def turn(self) -> None:
        """One tick of the leader: fresh counts, a verdict, a retried write, a push."""
        if self.collect is not None:
            await self.collect()  # also re-pushes the state to any follower that missed it
        seq = self.seq
        if self.store is None:
            self.tick(time.monotonic(), time.time())
        else:
            await self.fleet_tick(time.monotonic(), time.time())
        if self.write_error is not None and time.monotonic() >= self.retry_at:
            self.write(self.saved_state())
        if self.collect is not None and self.seq != seq:
            await self.collect()  # the verdict changed the state: the followers take it now
        if self.keep is not None:
            self.keep(self.guard_doc())

    def adopt(self, doc: dict) -> bool:
        """A following worker: put the state the leader pushed in force, unless it is
        older than the one in force. ValueError/KeyError/TypeError if it is no state."""
        mark = (int(doc["mark"][0]), int(doc["mark"][1]))
        if self.mark is not None and mark < self.mark:
            return False  # two pushes crossed on the way: the newer one stands
        saved = state.from_json(doc["state"])
        self.mark = mark
        self.take_state(saved, "the leading worker")
        return True

    def take_state(self, saved: State, origin: str) -> bool:
        """Put a state another process decided in force here (no events: they are its
        own); False if it is the one in force already."""
        rt = self.runtime
        progress = rt.progress
        if saved.release == _release(rt.config) and rt.config.rollout is not None:
            # Another release is the leader's or this worker's reload still on the way:
            # the latch is taken anyway, the rollout once both run the same release.
            candidate = rollout.from_dict(saved.rollout) if saved.rollout is not None else None
            if candidate is not None and progress is not None and _same_step(candidate, progress):
                # The count of the step's requests is this process's own (the fleet's
                # state does not carry it): kept while the step is the same.
                candidate = replace(candidate, step_base_requests=progress.step_base_requests)
            if candidate is None or candidate.step < len(rt.config.rollout.steps):
                progress = candidate
        if saved.latch == rt.latch and progress == rt.progress:
            return False
        if saved.latch.active != rt.latch.active:
            log.warning("rollback latch %s by %s: %s",
                        "set" if saved.latch.active else "cleared", origin,
                        saved.latch.reason or rt.latch.reason)  # fmt: skip
        resumed = rt.latch.active and not saved.latch.active
        rt.latch = saved.latch
        rt.progress = progress
        rt.refresh()
        rt.recorder.rollout_step = progress.step if progress else 0
        if resumed:  # resumed elsewhere: the canary is judged afresh here too
            self.judge_afresh(rt.config)
        return True

    def judge_afresh(self, cfg: Config) -> None:
        """Forget what the canary was judged on (a resume, a new release): new windows,
        new cumulative evidence, and a source that counts from now."""
        self.cumulative = None
        self.last_tick = None
        self.windows = {}
        self.make_windows(cfg)
        self.source.restart(time.time())

    # -- the fleet's state in Redis (state.backend: redis) ---------------------------------

    async def join_fleet(self) -> None:
        """At start, before serving: take the fleet's state (or give it this one). A latch
        this replica set after the fleet's state was last written (Redis was unreachable
        when it fell, say) is put back on the fleet's state, never lost to it."""
        if self.store is None or self.follower:
            return
        store = self.store
        mine = self.runtime.latch
        kept = ("rollback", (mine.reason or "rollback", mine.actor or "turnout", mine.evidence))

        def first() -> None:
            fleet = self.runtime.latch
            if mine.active and not fleet.active and (mine.at or 0.0) > store.remote_at:
                log.warning("this replica's latch is newer than the fleet's state: written there")
                self.intents.append(kept)
                self.replay()

        try:
            await self.fleet_change(first)
        except Unavailable as err:
            log.error("state backend redis unreachable at start (%s): serving the state of "
                      "%s until it answers", err, self.runtime.config.state_file)  # fmt: skip
            if mine.active:
                self.intents.append(kept)
        self.runtime.recorder.state_backend_up = int(store.up)

    async def fleet_tick(self, now: float, wall: float) -> None:
        assert self.store is not None
        store = self.store
        seen = self.observe(now)
        try:
            await self.fleet_change(lambda: self.act(seen, wall, store.may_lead()))
        except Unavailable:
            self.act(seen, wall, False)  # here only; the rollout waits for the fleet
        self.runtime.recorder.state_backend_up = int(store.up)
        await store.flush_audit()

    async def fleet_change(self, apply: Callable[[], T]) -> T:
        """`apply` on the fleet's state, in a transaction (store.Redis.change), after the
        rollbacks and pauses not yet written there; the events it makes are kept (and
        sent) once the change is written. One at a time in this process."""
        assert self.store is not None
        store = self.store
        events: list[dict] = []
        external: list[bool] = []

        def attempt() -> T:
            events.clear()
            external.clear()
            self.fleet_events, self.fleet_external = events, external
            self.in_change = True
            try:
                self.replay()
                return apply()
            finally:
                self.in_change = False

        async with self.changing:
            result = await store.change(
                _release(self.runtime.config), self.take_fleet, attempt, self.fleet_state,
                events, self.snapshot, self.undo,
            )  # fmt: skip
        self.intents.clear()  # replayed in the change just written
        for ev, out in zip(events, external, strict=True):
            self.events.appendleft(ev)
            if out and self.notify is not None:
                self.notify(ev)
        return result

    def snapshot(self) -> tuple:
        """What a change may alter here: put back (`undo`) when it does not commit."""
        rt = self.runtime
        return (rt.latch, rt.progress, self.cumulative, self.cumulative_key, self.last_tick,
                self.alerting, list(self.intents), self.windows, dict(self.seen))  # fmt: skip

    def undo(self, m: tuple) -> None:
        rt = self.runtime
        changed = (rt.latch, rt.progress) != (m[0], m[1])
        (rt.latch, rt.progress, self.cumulative, self.cumulative_key, self.last_tick,
         self.alerting, self.intents, self.windows, self.seen) = m  # fmt: skip
        if changed:
            rt.refresh()
            rt.recorder.rollout_step = rt.progress.step if rt.progress else 0
            self.persist()

    def take_fleet(self, saved: State) -> None:
        if self.take_state(saved, "the fleet"):
            self.persist()  # the state file keeps the last state seen

    def replay(self) -> None:
        """Apply the rollbacks and pauses made while Redis was unreachable to the fleet's
        state as it is now (a latch found set there is kept as it is)."""
        for kind, args in list(self.intents):
            if kind == "rollback":
                self.rollback(*args)
            else:
                with contextlib.suppress(ActionError):
                    self.pause(*args)

    async def fleet_action(self, name: str, action: Callable[[], T]) -> T:
        """An admin action: on the fleet's state when there is one. Without Redis,
        rollback and pause act here (and are written when it answers); promote and
        resume need the fleet's state and are refused (503)."""
        if self.store is None:
            return action()
        try:
            return await self.fleet_change(action)
        except Unavailable as err:
            if name in ("rollback", "pause"):
                return action()
            what = "is unreachable" if not self.store.up else "cannot take the change"
            raise ActionError(
                f"state backend redis {what} ({err}): {name} needs the fleet's state and is "
                "refused; rollback and pause still work on this replica",
                503,
            ) from None

    # -- the hot-path hook -----------------------------------------------------------------

    def feed(self, now: float, slow_ms: float | None = None) -> dict[str, Outcomes]:
        """Move what the Recorder counted since the last tick into the guard's windows,
        and return each version's outcomes of this tick (requests slower than
        `slow_ms` counted as slow).

        The hot path records each exchange once, in the Recorder; the guard reads
        the differences of its cumulative counters here, so judging costs the
        forwarding path nothing.
        """
        rec = self.counts()
        first_slow = first_maybe = len(UPPER_MS) + 1
        if slow_ms is not None:
            first_slow = bisect.bisect_left(UPPER_MS, slow_ms) + 1  # as Stats.slower_than
            first_maybe = bisect.bisect_right(UPPER_MS, slow_ms)  # buckets reaching above
        ticks: dict[str, Outcomes] = {}
        for version, window in self.windows.items():
            tick = ticks[version] = Outcomes(live=(0, 0))
            for shadow, totals in ((False, rec.totals), (True, rec.shadow_totals)):
                requests, errors, latency = totals(version)
                seen = self.seen[version, shadow]
                self.seen[version, shadow] = (requests, errors, latency)
                if requests == seen[0]:
                    continue
                window.record_counts(now, requests - seen[0], errors - seen[1], shadow)
                delta = [a - b for a, b in zip(latency, seen[2], strict=True)]
                window.record_latencies(now, delta)
                tick.requests += requests - seen[0]
                tick.errors += errors - seen[1]
                if not shadow:
                    tick.live_requests += requests - seen[0]
                    tick.live_errors += errors - seen[1]
                tick.measured += sum(delta)
                tick.slow += sum(delta[first_slow:])
                tick.maybe_slow += sum(delta[first_maybe:])
        return ticks

    @property
    def canary_requests(self) -> int:
        """Requests the canary has answered since start (grows monotonically)."""
        canary = self.runtime.config.canary
        return sum(n for (version, _), n in self.counts().requests.items() if version == canary)

    def make_windows(self, cfg: Config) -> None:
        """One window per version; kept across reloads unless its length changed."""
        length = cfg.guard.window if cfg.guard is not None else 30.0
        old = self.windows if length == self.window_length else {}
        self.window_length = length
        self.windows = {}
        rec = self.counts()
        for name in (cfg.stable, cfg.canary):
            if name in old:
                self.windows[name] = old[name]
                continue
            self.windows[name] = Window(length)
            # A new window counts from now on (at start the totals are all zero).
            self.seen[name, False] = rec.totals(name)
            self.seen[name, True] = rec.shadow_totals(name)

    # -- the tick -----------------------------------------------------------------------------

    def stats(self, now: float) -> tuple[Stats, Stats]:
        cfg = self.runtime.config
        return self.windows[cfg.canary].stats(now), self.windows[cfg.stable].stats(now)

    def source_settings(self, cfg: Config) -> tuple[FleetCounts | None, float]:
        guard = cfg.guard
        fleet = guard.prometheus if guard is not None and guard.source == "prometheus" else None
        return fleet, self.window_length

    def make_source(self, cfg: Config) -> sources.Source:
        self.source_key = self.source_settings(cfg)
        return sources.make(*self.source_key, lambda: self.windows)

    def renew_source(self, cfg: Config) -> None:
        """After a reload: a new source if its settings or the window changed."""
        old = self.source
        self.source = self.make_source(cfg)
        if old.since:
            self.source.restart(old.since)  # still judging afresh since a resume
        if self.task is None or self.follower:
            return  # not running (yet): `start` starts it
        self.source.start()
        self.closing = asyncio.get_running_loop().create_task(old.close())

    def judge_source(self, now: float, policy: Policy, cum: Cumulative) -> Verdict:
        """The verdict on what the source says of the window, with the slow speed's."""
        cfg = self.runtime.config
        source = self.source
        self.runtime.recorder.guard_source_up = int(source.up())
        pair = source.stats(now, cfg.canary, cfg.stable)
        if pair is None:
            return Verdict(INCONCLUSIVE, (), {"source": source.doc(), "tests": {},
                                              "cumulative": cum.doc()})  # fmt: skip
        v = verdict(pair[0], pair[1], policy)
        if source.kind != "local":
            # The fleet's verdict only: this process's cumulative counts are shown and
            # gate the steps, but a breach is the fleet's window's to find.
            return Verdict(v.state, v.reasons, v.evidence | {"source": source.doc(),
                                                             "cumulative": cum.doc()})  # fmt: skip
        return self.judge(v, cum)

    def tick(self, now: float, wall: float, may_step: bool = True) -> None:
        self.act(self.observe(now), wall, may_step)

    def observe(self, now: float) -> tuple[Verdict | None, Cumulative | None, bool]:
        """This tick's counts and verdict: (verdict, the slow speed's evidence, healthy)."""
        cfg = self.runtime.config
        policy = cfg.guard
        gate = _evidence_policy(cfg)
        cum = None if gate is None else self.gather(self.feed(now, gate.max_p99_ms), gate)
        if policy is None or cum is None:
            return None, cum, True
        v = self.judge_source(now, policy, cum)
        # A canary too quiet for the window is judged by its cumulative evidence:
        # inconclusive there, and shown under its limits here, lets a step advance
        # (not when the source could not answer: that is no evidence of health).
        healthy = v.state == "healthy" or (
            v.state == INCONCLUSIVE and cum.promotable and self.source.up()
        )
        return v, cum, healthy

    def act(
        self, seen: tuple[Verdict | None, Cumulative | None, bool], wall: float, may_step: bool
    ) -> None:
        """Act on what `observe` saw: a breach per on_breach; a rollout step (`may_step`:
        this replica may advance the rollout, as the fleet's lease holder or alone)."""
        rt = self.runtime
        cfg = rt.config
        v, cum, healthy = seen
        if v is not None and cum is not None:
            self.last_verdict = v
            if v.state == "breach" and not rt.latch.active:
                self.breach(v, wall)
                if v.evidence.get("speed") == "cumulative":
                    # Acted on: the evidence starts afresh, so that a pause resumed by an
                    # operator, or an alert, is not repeated on evidence already used.
                    self.cumulative = None
            elif v.state == "healthy" or cum.promotable:
                # A breach episode ends on evidence of health, not on a lull: an
                # inconclusive window (or cumulative evidence started afresh) while the
                # fault goes on is the same episode, alerted once.
                self.alerting = False
        if may_step and cfg.rollout is not None and rt.progress is not None and not rt.latch.active:
            evidence = cum is not None and cum.promotable
            self.last_tick = Tick(wall, healthy, self.canary_requests, evidence)
            self.step(rollout.advance(rt.progress, self.last_tick, *self._rc()), "guard")

    def gather(self, ticks: dict[str, Outcomes], policy: Policy) -> Cumulative:
        """The slow speed's evidence, brought up to date with this tick's outcomes: kept
        while its subject stays the same (the tests' settings, which the evidence
        records; the versions; the release; the step), started afresh when it changes."""
        rt = self.runtime
        cfg = rt.config
        key = self.evidence_key(policy)
        if self.cumulative is None or key != self.cumulative_key:
            self.cumulative, self.cumulative_key = Cumulative(policy, time.time()), key
        if not rt.latch.active:  # after a rollback the canary is no longer judged
            self.cumulative.update(
                ticks.get(cfg.canary, Outcomes()), ticks.get(cfg.stable, Outcomes())
            )
        return self.cumulative

    def evidence_key(self, policy: Policy) -> tuple:
        """What the evidence is about: the tests' settings, the versions, the release, and
        the step with the weight and rings in force (so an approval, which puts a step's
        weight in force at the same index, or a reload that changes a step, starts it
        afresh: each step earns its own evidence)."""
        cfg, progress = self.runtime.config, self.runtime.progress
        exposure: tuple = ()
        if progress is not None and cfg.rollout is not None:
            exposure = (progress.step, rollout.weight(progress, cfg.rollout),
                        rollout.rings(progress, cfg.rollout))  # fmt: skip
        return (thresholds(policy), cfg.canary, cfg.stable, _release(cfg), exposure)

    def judge(self, v: Verdict, cum: Cumulative) -> Verdict:
        """The two speeds, one verdict: the window's, or a breach of the cumulative tests
        over everything since the step began (which also judge a canary too quiet for
        the window). The evidence carries both; `reasons` say which fired."""
        evidence = dict(v.evidence)
        evidence["cumulative"] = cum.doc()
        if v.state == BREACH:
            return Verdict(v.state, v.reasons, evidence | {"speed": "window"})
        fired = cum.breaches()
        if fired:
            reasons = tuple(f"{name}_cumulative" for name in fired)
            return Verdict(BREACH, reasons, evidence | {"speed": "cumulative"})
        return Verdict(v.state, v.reasons, evidence)

    def waiting_for(self) -> list[str]:
        """What the rollout's current step waits for before the next tick can advance
        it, in words for /status; [] when nothing (or when it does not advance on ticks)."""
        rt = self.runtime
        cfg, p, tick = rt.config, rt.progress, self.last_tick
        if cfg.rollout is None or p is None or p.phase is not rollout.Phase.PROGRESSING:
            return []
        if rt.latch.active:
            return ["the rollback latch to be cleared (resume, or a new release)"]
        if tick is None:
            return ["the guard's next look at the canary"]
        _, min_requests = self._rc()
        words = []
        for what in rollout.waits(p, tick, cfg.rollout, min_requests):
            if what == "dwell":
                at = rollout.next_at(p, cfg.rollout)  # set: the step is progressing
                words.append(f"the step's dwell, until {_iso(at) if at is not None else '?'}")
            elif what == "verdict":
                state = self.last_verdict.state if self.last_verdict else "inconclusive"
                words.append(f"a healthy guard verdict (now {state})")
            elif what == "requests":
                base = p.step_base_requests
                served = 0 if base == rollout.UNKNOWN else max(0, tick.canary_requests - base)
                more = min_requests - served
                words.append(f"{more} more canary requests in the step (min_requests)")
            elif what == "evidence":
                words.append(self.evidence_words())
        return words

    def evidence_words(self) -> str:
        cum = self.cumulative
        if cum is None:
            return "evidence that the canary is under its limits"
        needed = cum.needed()
        if needed is None:
            return ("evidence that the canary is under its limits, which what it served so "
                    "far (too close to a limit, or above it) does not give yet")  # fmt: skip
        return (
            f"evidence that the canary is under its limits: needs ~{needed} more canary "
            "requests to promote"
        )

    def breach(self, v: Verdict, wall: float) -> None:
        policy = self.runtime.config.guard
        assert policy is not None
        reasons = ", ".join(v.reasons)
        grpc = self.grpc_evidence()
        if grpc:
            v = Verdict(v.state, v.reasons, v.evidence | {"grpc_status": grpc})
        if policy.on_breach == "rollback":
            self.rollback(f"guard: canary breached ({reasons})", "guard", v.evidence)
        elif policy.on_breach == "pause":
            # Pause a moving rollout (again, if an operator resumed it while the breach
            # goes on); a paused or complete one is left alone. Alert once per episode:
            # this runs every tick while the breach lasts.
            progress = self.runtime.progress
            if progress is not None and progress.phase in (
                rollout.Phase.PROGRESSING,
                rollout.Phase.AWAITING,
            ):
                self.pause("guard")
            if not self.alerting:
                self.alert(v, wall, "pause")
        elif not self.alerting:
            self.alert(v, wall, "alert")

    def grpc_evidence(self) -> dict[str, dict[str, int]]:
        """The gRPC answers so far of the canary and the stable, by grpc-status (none when
        the release serves no gRPC)."""
        cfg = self.runtime.config
        out: dict[str, dict[str, int]] = {}
        for (version, code), n in sorted(self.counts().grpc.items()):
            if version in (cfg.canary, cfg.stable):
                out.setdefault(version, {})[str(code)] = n
        return out

    def alert(self, v: Verdict, wall: float, action: str) -> None:
        self.alerting = True
        self.runtime.recorder.breach_alerted()
        log.warning("GUARD BREACH (%s, on_breach=%s): %s", ", ".join(v.reasons), action, v.evidence)
        self.event("breach", action=action, reasons=v.reasons, evidence=v.evidence, actor="guard",
                   external=True)  # fmt: skip

    # -- actions (also the admin API's) ---------------------------------------------------------

    def rollback(self, reason: str, actor: str, evidence: dict | None = None) -> Latch:
        rt = self.runtime
        if rt.latch.active:
            return rt.latch
        started = time.perf_counter()
        rt.latch = Latch(active=True, reason=reason, at=time.time(), release=_release(rt.config),
                         evidence=evidence, actor=actor)  # fmt: skip
        if self.store is not None and not any(kind == "rollback" for kind, _ in self.intents):
            self.intents.append(("rollback", (reason, actor, evidence)))
        rt.refresh()  # all traffic to stable from the next request on
        rt.recorder.rolled_back()
        self.persist()
        log.warning("ROLLBACK to %s by %s: %s (in force after %.1f ms)", rt.config.stable, actor,
                    reason, 1000 * (time.perf_counter() - started))  # fmt: skip
        self.event("rollback", reason=reason, actor=actor, release=rt.latch.release,
                   evidence=evidence, stable=rt.config.stable, canary=rt.config.canary,
                   external=True)  # fmt: skip
        return rt.latch

    def resume(self, actor: str) -> None:
        rt = self.runtime
        was = rt.latch
        paused = rt.progress is not None and rt.progress.phase == rollout.Phase.PAUSED
        if was.active or paused:
            self.cumulative = None  # a resumed canary is judged on new evidence
            self.last_tick = None
        if was.active:
            rt.latch = Latch()
            self.judge_afresh(rt.config)
            self.event("resume", actor=actor, cleared=was.reason)
            log.warning("rollback latch cleared by %s", actor)
            if rt.progress is not None:
                # The step starts over: its dwell and its requests count from now,
                # so the canary earns the next step again after the incident.
                rt.progress = replace(
                    rt.progress,
                    step_started_at=time.time(),
                    step_base_requests=self.canary_requests,
                )
        if rt.progress is not None and rt.progress.phase == rollout.Phase.PAUSED:
            self.step(rollout.advance(rt.progress, Resume(time.time(), actor), *self._rc()), actor)
        rt.refresh()
        self.persist()

    def pause(self, actor: str) -> None:
        rt = self.runtime
        if rt.progress is None:
            raise ActionError("no rollout to pause")
        try:
            new = rollout.advance(rt.progress, Pause(time.time(), actor), *self._rc())
        except IllegalTransition as err:
            raise ActionError(str(err)) from None
        if self.store is not None and not any(kind == "pause" for kind, _ in self.intents):
            self.intents.append(("pause", (actor,)))
        self.step(new, actor)

    def promote(self, actor: str, roles: frozenset[str]) -> None:
        rt = self.runtime
        if rt.latch.active:
            raise ActionError("the rollback latch is set: resume first")
        if rt.progress is None:
            raise ActionError("no rollout to promote")
        event = Promote(time.time(), actor, roles, canary_requests=self.canary_requests)
        try:
            new = rollout.advance(rt.progress, event, *self._rc())
        except Forbidden as err:
            raise ActionError(str(err), 403) from None
        except IllegalTransition as err:
            raise ActionError(str(err)) from None
        self.step(new, actor)

    def _rc(self) -> tuple[Any, int]:
        cfg = self.runtime.config
        return cfg.rollout, (cfg.guard or DEFAULT_POLICY).min_requests

    def step(self, new: Progress, actor: str) -> None:
        """Put a new rollout progress in force if it differs."""
        rt = self.runtime
        old = rt.progress
        if new is old or new == old:
            return
        rt.progress = new
        self.last_tick = None  # what the new step waits for is known at the next tick
        rt.refresh()
        rt.recorder.rollout_step = new.step
        self.persist()
        if old is not None and (old.phase, old.step) == (new.phase, new.step):
            return  # bookkeeping (the step's request count began): not a move
        weight = rt.snapshot.table.weight
        log.info("rollout: %s step %d, weight %d%% (%s)", new.phase.value, new.step, weight, actor)
        self.event("rollout", phase=new.phase.value, step=new.step, weight=weight, actor=actor)

    # -- reloads -----------------------------------------------------------------------------

    def reloaded(self, old: Config, new: Config) -> None:
        """A new config is in force: windows, release and rollout follow it."""
        self.make_windows(new)
        if self.source_key != self.source_settings(new):
            self.renew_source(new)
        if _release(old) != _release(new):
            self.new_release(new, _release(old))
        elif new.rollout is None:
            self.runtime.progress = None
        elif self.runtime.progress is None or old.rollout != new.rollout:
            self.runtime.progress = _fit(self.runtime.progress, new, self.canary_requests)
        self.runtime.refresh()
        self.runtime.recorder.rollout_step = (
            self.runtime.progress.step if self.runtime.progress else 0
        )
        self.persist()

    def new_release(self, cfg: Config, previous: str | None) -> None:
        rt = self.runtime
        if rt.latch.active:
            self.event("resume", actor="release", cleared=rt.latch.reason,
                       release=_release(cfg), previous=previous)  # fmt: skip
            log.warning("new canary release %s (was %s): rollback latch cleared",
                        _release(cfg), previous)  # fmt: skip
        rt.latch = Latch()
        self.judge_afresh(cfg)
        rt.progress = (
            rollout.start(cfg.rollout, time.time(), self.canary_requests) if cfg.rollout else None
        )

    # -- persistence and events ---------------------------------------------------------------

    def fleet_state(self) -> State:
        """The state in force as the fleet shares it: without this process's own count
        of the step's canary requests."""
        saved = self.saved_state()
        if saved.rollout is None:
            return saved
        return replace(saved, rollout=saved.rollout | {"step_base_requests": rollout.UNKNOWN})

    def saved_state(self) -> State:
        rt = self.runtime
        return State(
            latch=rt.latch,
            rollout=rollout.to_dict(rt.progress) if rt.progress is not None else None,
            release=_release(rt.config),
        )

    def current(self) -> dict:
        """The state in force with its mark: what the leader shares and pushes."""
        return {"mark": [self.epoch, self.seq], "state": state.to_json(self.saved_state())}

    def persist(self) -> bool:
        """The state in force changed: share it with the fleet, then write it down."""
        if self.follower:
            return True  # the leading worker writes the state file
        self.seq += 1
        if self.share is not None:
            self.share(self.current())  # first: a worker that starts now must see it
        if self.keep is not None:
            # the evidence and windows too: a resume or a new release discards them, and a
            # leader that takes over right after must not take the discarded ones
            self.keep(self.guard_doc())
        return self.write(self.saved_state())

    def write(self, doc: State) -> bool:
        path = self.runtime.config.state_file
        try:
            state.save(path, doc)
        except (OSError, ValueError) as err:
            # Routing already follows the in-memory state; say loudly that it is not
            # durable, once per distinct error (the write is retried every RETRY s).
            self.runtime.recorder.state_write_failed()
            # Not str(err): it names the temp file, which differs at every attempt.
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            message = f"cannot write state file {path}: {why}"
            if message != self.write_error:
                log.error("%s (retrying every %.0f s)", message, RETRY)
                self.event("error", message=message, actor="turnout")
            self.write_error = message
            self.unsaved_since = self.unsaved_since or time.time()
            self.retry_at = time.monotonic() + RETRY
            return False
        if self.write_error is not None:
            log.warning("state file %s written: the state in force is on disk again", path)
            self.event("state", message="state file written again", actor="turnout")
        self.write_error = None
        self.unsaved_since = None
        return True

    @property
    def latch_unsaved(self) -> bool:
        """A set latch that a restart would forget: the proxy is not ready."""
        return self.runtime.latch.active and self.write_error is not None

    def persistence(self) -> dict:
        """/status `state`: whether the state in force is on disk, and why not."""
        since = self.unsaved_since
        doc: dict[str, Any] = {
            "backend": "file",
            "up": self.write_error is None,
            "file": self.runtime.config.state_file,
            "persisted": self.write_error is None,
            "error": self.write_error,
            "unsaved_since": _iso(since) if since is not None else None,
            "write_failures": self.runtime.recorder.state_write_failures,
        }
        if self.store is not None:
            fleet = self.store.doc()
            down = fleet.pop("down_since")
            doc |= fleet | {
                "file_error": self.write_error,
                "unwritten": [kind for kind, _ in self.intents],
                "down_since": _iso(down) if down is not None else None,
            }
        return doc

    async def confirm(self) -> dict:
        """After an action that set the latch: whether it is on disk and in force in
        every worker. `ok` only when both; the latch stays in force either way."""
        workers = await self.collect() if self.collect is not None else {}
        unconfirmed = {str(i): r for i, r in workers.items() if r not in ("ok", "down")}
        errors = [self.write_error] if self.write_error is not None else []
        if self.store is not None and self.intents:
            errors.append(f"state backend redis is unreachable ({self.store.error}): the latch "
                          "is in force on this replica only until it is written there")  # fmt: skip
        errors += [f"worker {i} has not confirmed it: {r}" for i, r in unconfirmed.items()]
        return {
            "ok": not errors,
            "latched": self.runtime.latch.active,
            "persisted": self.write_error is None,
            "in_force": {
                "workers": 1 + len(workers),
                "unconfirmed": unconfirmed,
                "starting": [i for i, r in workers.items() if r == "down"],
            },
            "error": "; ".join(errors) or None,
        }

    # -- the guard's windows, handed to a leader that takes over ------------------------------

    def guard_doc(self) -> dict:
        cum = self.cumulative
        return {
            "window": self.window_length,
            "windows": {name: w.dump() for name, w in self.windows.items()},
            "seen": [[v, shadow, list(t[:2]), t[2]] for (v, shadow), t in self.seen.items()],
            # the slow speed's evidence with what it is about (compared as text: the key
            # holds the policy's settings, the versions, the release and the step)
            "cumulative": None if cum is None else {
                "key": repr(self.cumulative_key), "evidence": cum.dump(),
            },
        }  # fmt: skip

    def take_over(self, doc: dict | None) -> None:
        """A leader that starts with counts carried over: keep judging from where the
        last one was (its windows and what they had been fed), or start the windows
        from the counts as they are now, never from the counts of the past."""
        self.windows = {}
        self.window_length = 0.0
        self.make_windows(self.runtime.config)  # seen = the counts as they are now
        if doc is None or doc.get("window") != self.window_length:
            return
        try:
            windows = {n: Window.restored(d, self.window_length) for n, d in doc["windows"].items()}
            seen = {(v, bool(sh)): (int(c[0]), int(c[1]), [int(x) for x in lat])
                    for v, sh, c, lat in doc["seen"]}  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            log.error("cannot take the guard's windows over (%s): they start afresh", err)
            return
        taken = set()
        for name in list(self.windows):
            window = windows.get(name)
            if window is not None and (name, False) in seen and (name, True) in seen:
                self.windows[name] = window
                self.seen[name, False], self.seen[name, True] = seen[name, False], seen[name, True]
                taken.add(name)
        cfg = self.runtime.config
        if {cfg.canary, cfg.stable} <= taken:  # what the evidence saw is what was fed
            self.take_evidence_over(doc.get("cumulative"))

    def take_evidence_over(self, doc: Any) -> None:
        """Keep the last leader's cumulative evidence if it is about what this leader
        judges now (the same settings, versions, release and step)."""
        policy = _evidence_policy(self.runtime.config)
        if not isinstance(doc, dict) or policy is None:
            return
        key = self.evidence_key(policy)
        if doc.get("key") != repr(key):
            log.info("the last leader's cumulative evidence is about another step or policy: "
                     "it starts afresh")  # fmt: skip
            return
        try:
            self.cumulative = Cumulative.restored(policy, doc["evidence"])
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as err:
            log.error("cannot take the cumulative evidence over (%s): it starts afresh", err)
            return
        self.cumulative_key = key

    def event(self, kind: str, external: bool = False, **fields: Any) -> dict:
        ev = {"at": time.time(), "kind": kind, **fields}
        if self.in_change:  # kept (and sent) when the change is written
            self.fleet_events.append(ev)
            self.fleet_external.append(external)
            return ev
        self.events.appendleft(ev)
        if external and self.notify is not None:
            self.notify(ev)
        if self.store is not None and self.store.up:
            task = asyncio.get_running_loop().create_task(self.store.push_event(ev))
            self.pushes.add(task)
            task.add_done_callback(self.pushes.discard)
        return ev

    def audit_path(self) -> str:
        return os.path.join(os.path.dirname(self.runtime.config.state_file), "turnout-audit.jsonl")


def _same_step(a: Progress, b: Progress) -> bool:
    return (a.phase, a.step, a.step_started_at) == (b.phase, b.step, b.step_started_at)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _evidence_policy(cfg: Config) -> Policy | None:
    """The policy the cumulative evidence is gathered under: the guard's, or, for a
    rollout without a guard, the default limits (its steps still move on evidence;
    only a guard acts on a breach). None when there is nothing to gather it for."""
    return cfg.guard or (DEFAULT_POLICY if cfg.rollout is not None else None)


def _release(cfg: Config) -> str | None:
    return cfg.versions[cfg.canary].release


def _fit(progress: Progress | None, cfg: Config, canary_requests: int) -> Progress:
    """Keep the rollout's place when its steps change; start it when it is new."""
    assert cfg.rollout is not None
    if progress is None or progress.step >= len(cfg.rollout.steps):
        return rollout.start(cfg.rollout, time.time(), canary_requests)
    return progress
