"""The rollout: a state machine that walks the canary's weight through the steps.

Pure: no I/O, no clock. Every event carries its own `now`; the caller persists
what `advance` returns (see state.py) and compiles routing from `weight()`.

Rules (modelled on h11's `_state.py`: the rules here, the table as data below):

- The phases are PROGRESSING, AWAITING (awaiting_approval), PAUSED and COMPLETE.
  `start` enters step 0: AWAITING if step 0 has `approve`, else PROGRESSING.
- The effective weight is `steps[step].weight` while PROGRESSING, COMPLETE or
  PAUSED from PROGRESSING. While AWAITING (or PAUSED from AWAITING) it stays at
  the previous step's weight, 0 before the first step: a step that needs an
  approval is not entered until it is approved. The rings in force (cohorts routed
  to the canary on top of the weight) are those of every step in force so far.
- A PROGRESSING step advances on a `Tick` when ALL of: its dwell (`step.interval`,
  else `cfg.interval`) has passed since `step_started_at`, the tick is healthy,
  the canary served at least `min_requests` since the step started
  (`canary_requests - step_base_requests`), and the tick carries evidence that
  the canary is under its limits (the guard's cumulative tests: time alone never
  promotes). `waits` names what is missing. One tick advances one step.
- Advancing moves to step+1: AWAITING if that step has `approve`, else
  PROGRESSING with `step_started_at=now` and `step_base_requests=canary_requests`.
  Advancing past the last step makes the phase COMPLETE (the step stays the last).
- `Promote` needs a role other than "viewer"; promoting into a step with
  `approve: R` needs role R as well. Without them it raises `Forbidden` and
  nothing changes. In AWAITING it approves the step (which becomes PROGRESSING);
  in PROGRESSING it advances to the next step at once, skipping the dwell.
  In PAUSED or COMPLETE it is an `IllegalTransition`.
- `Pause` from PROGRESSING or AWAITING gives PAUSED and remembers `paused_from`;
  a second pause changes nothing; pausing a COMPLETE rollout is illegal.
- `Resume` from PAUSED returns to `paused_from` and restarts the dwell
  (`step_started_at=now`); anywhere else it changes nothing. (It also clears the
  rollback latch, but the latch is not the rollout's business.)
- Ticks change nothing in AWAITING, PAUSED or COMPLETE.
- `advance` returns the very same object when nothing changes, so `new is old`
  tells the caller there is nothing to save. Every real transition appends a
  short record to `history` (the last HISTORY_LIMIT are kept).
- Events that cannot tell how many requests the canary has served (a `Promote`
  without `canary_requests`) enter a step with `step_base_requests = UNKNOWN`;
  the next `Tick` sets it, so the step's count starts then.
- A holder of ANY_ROLE ("*", never a configured role name) satisfies every role
  check: for callers that trust a request entirely (e.g. loopback, no tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RolloutConfig, Step

HISTORY_LIMIT = 50
UNKNOWN = -1  # step_base_requests before a tick has told how many requests there were
VIEWER = "viewer"
ANY_ROLE = "*"


class Phase(StrEnum):  # a str, so it is JSON-ready
    PROGRESSING = "progressing"
    AWAITING = "awaiting_approval"
    PAUSED = "paused"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Progress:
    phase: Phase
    step: int  # 0-based index into cfg.steps
    step_started_at: float  # when the step (or its dwell, after a resume) began
    step_base_requests: int  # the canary's request total when the step began; UNKNOWN
    paused_from: Phase | None = None
    history: tuple[dict, ...] = ()  # {"at", "event", "actor", "step", "phase"}, oldest first


# ------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Tick:
    now: float
    healthy: bool  # the guard's verdict: no breach
    canary_requests: int  # a monotonically growing total of canary requests
    evidence: bool  # the guard's evidence shows the canary under its limits


@dataclass(frozen=True)
class Promote:
    now: float
    actor: str
    roles: frozenset[str]
    canary_requests: int | None = None  # when known: the new step's request base


@dataclass(frozen=True)
class Pause:
    now: float
    actor: str


@dataclass(frozen=True)
class Resume:
    now: float
    actor: str


Event = Tick | Promote | Pause | Resume


class IllegalTransition(Exception):
    """The event makes no sense in this phase (e.g. promoting a complete rollout)."""

    def __init__(self, phase: Phase, event: object) -> None:
        name = _event_name(event)
        super().__init__(f"cannot {name} a rollout that is {phase.value}")
        self.phase = phase
        self.event = event


class Forbidden(Exception):
    """The actor lacks a role the event needs; `.role` is the approve role, if any."""

    def __init__(self, role: str | None, message: str) -> None:
        super().__init__(message)
        self.role = role


# -------------------------------------------------------------------- queries


def start(cfg: RolloutConfig, now: float, canary_requests: int) -> Progress:
    """The progress of a rollout that begins now, at step 0."""
    phase = Phase.AWAITING if cfg.steps[0].approve else Phase.PROGRESSING
    p = Progress(phase, 0, now, canary_requests)
    return _record(p, now, "start", None)


def weight(p: Progress, cfg: RolloutConfig) -> int:
    """The canary weight this progress puts in force."""
    step = _in_force(p, cfg)
    return cfg.steps[step].weight if step >= 0 else 0


def rings(p: Progress, cfg: RolloutConfig) -> tuple[str, ...]:
    """The cohorts this progress routes to the canary: those of every step entered so
    far, in order, so that the users of an earlier ring stay on the canary."""
    names: dict[str, None] = {}
    for step in cfg.steps[: _in_force(p, cfg) + 1]:
        names.update(dict.fromkeys(step.cohorts))
    return tuple(names)


def _in_force(p: Progress, cfg: RolloutConfig) -> int:
    """The index of the step whose weight and rings are in force; -1 before the first.
    A step that waits for its approval is not in force yet."""
    step = min(p.step, len(cfg.steps) - 1)  # a reload may have shortened the steps
    paused_waiting = p.phase is Phase.PAUSED and p.paused_from is Phase.AWAITING
    return step - 1 if p.phase is Phase.AWAITING or paused_waiting else step


def next_at(p: Progress, cfg: RolloutConfig) -> float | None:
    """When the current step's dwell ends; None unless PROGRESSING."""
    if p.phase is not Phase.PROGRESSING:
        return None
    return p.step_started_at + _dwell(_step(cfg, p.step), cfg)


def awaiting(p: Progress, cfg: RolloutConfig) -> str | None:
    """The role whose `promote` the rollout waits for, if it waits for one."""
    return _step(cfg, p.step).approve if p.phase is Phase.AWAITING else None


def _step(cfg: RolloutConfig, index: int) -> Step:
    return cfg.steps[min(index, len(cfg.steps) - 1)]


def _dwell(step: Step, cfg: RolloutConfig) -> float:
    return step.interval if step.interval is not None else cfg.interval


# -------------------------------------------------------------------- actions
# Each takes (progress, event, cfg, min_requests) and returns the next progress;
# the table below says which one applies where.

Action = Callable[["Progress", Any, "RolloutConfig", int], Progress]


def _same(p: Progress, event: Any, cfg: RolloutConfig, min_requests: int) -> Progress:
    return p


def waits(p: Progress, event: Tick, cfg: RolloutConfig, min_requests: int) -> tuple[str, ...]:
    """What keeps a PROGRESSING step from advancing on `event`, in a fixed order:
    "dwell", "verdict" (not healthy), "requests" (fewer than min_requests in the
    step), "evidence"; () when the tick advances it. A step whose count has not
    started yet (UNKNOWN) has served nothing."""
    if p.phase is not Phase.PROGRESSING:
        return ()
    served = 0 if p.step_base_requests == UNKNOWN else event.canary_requests - p.step_base_requests
    missing = []
    if event.now < p.step_started_at + _dwell(_step(cfg, p.step), cfg):
        missing.append("dwell")
    if not event.healthy:
        missing.append("verdict")
    if served < min_requests:
        missing.append("requests")
    if not event.evidence:
        missing.append("evidence")
    return tuple(missing)


def _tick(p: Progress, event: Tick, cfg: RolloutConfig, min_requests: int) -> Progress:
    if p.step_base_requests == UNKNOWN:  # the step's count starts now; not a transition
        p = replace(p, step_base_requests=event.canary_requests)
    if waits(p, event, cfg, min_requests):
        return p
    return _enter(p, p.step + 1, event.now, event.canary_requests, cfg, "tick", None)


def _promote(p: Progress, event: Promote, cfg: RolloutConfig, min_requests: int) -> Progress:
    """PROGRESSING: go to the next step now; AWAITING: approve this one."""
    approving = p.phase is Phase.AWAITING
    target = p.step if approving else p.step + 1
    needed = cfg.steps[target].approve if target < len(cfg.steps) else None
    _authorize(event, needed)
    base = UNKNOWN if event.canary_requests is None else event.canary_requests
    if approving:
        p = replace(p, phase=Phase.PROGRESSING, step_started_at=event.now, step_base_requests=base)
        return _record(p, event.now, "promote", event.actor)
    return _enter(p, target, event.now, base, cfg, "promote", event.actor, approved=True)


def _pause(p: Progress, event: Pause, cfg: RolloutConfig, min_requests: int) -> Progress:
    p = replace(p, phase=Phase.PAUSED, paused_from=p.phase)
    return _record(p, event.now, "pause", event.actor)


def _resume(p: Progress, event: Resume, cfg: RolloutConfig, min_requests: int) -> Progress:
    back = p.paused_from or Phase.PROGRESSING
    p = replace(p, phase=back, paused_from=None, step_started_at=event.now)
    return _record(p, event.now, "resume", event.actor)


def _enter(
    p: Progress,
    index: int,
    now: float,
    base: int,
    cfg: RolloutConfig,
    event: str,
    actor: str | None,
    approved: bool = False,
) -> Progress:
    """Move to step `index`: COMPLETE past the last, AWAITING if it needs an approval."""
    if index >= len(cfg.steps):
        p = replace(p, phase=Phase.COMPLETE, step=len(cfg.steps) - 1)
    else:
        waits = cfg.steps[index].approve is not None and not approved
        phase = Phase.AWAITING if waits else Phase.PROGRESSING
        p = replace(p, phase=phase, step=index, step_started_at=now, step_base_requests=base)
    return _record(p, now, event, actor)


def _authorize(event: Promote, needed: str | None) -> None:
    roles = event.roles
    if ANY_ROLE in roles:
        return
    if needed is not None and needed not in roles:
        raise Forbidden(needed, f"promoting into this step needs role {needed!r}")
    if not roles - {VIEWER}:
        raise Forbidden(needed, "promoting needs a role other than 'viewer'")


def _record(p: Progress, now: float, event: str, actor: str | None) -> Progress:
    entry = {"at": now, "event": event, "actor": actor, "step": p.step, "phase": p.phase.value}
    return replace(p, history=(*p.history, entry)[-HISTORY_LIMIT:])


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Transition:
    """What an event does in a phase: the action, and where it may lead (for the diagram)."""

    action: Action
    edges: tuple[tuple[Phase, str], ...] = ()  # (next phase, when); () = changes nothing


_NOTHING = Transition(_same)
P, A, Z, C = Phase.PROGRESSING, Phase.AWAITING, Phase.PAUSED, Phase.COMPLETE

# (phase, event type) -> Transition. A pair that is absent is illegal.
TRANSITIONS: dict[tuple[Phase, type], Transition] = {
    (P, Tick): Transition(
        _tick,
        (
            (P, "tick (dwell over, healthy, enough requests and evidence)"),
            (A, "tick (next step needs approval)"),
            (C, "tick (last step done)"),
        ),
    ),
    (P, Promote): Transition(
        _promote,
        ((P, "promote (next step now)"), (C, "promote (past the last step)")),
    ),
    (P, Pause): Transition(_pause, ((Z, "pause"),)),
    (P, Resume): _NOTHING,
    (A, Tick): _NOTHING,
    (A, Promote): Transition(_promote, ((P, "promote by the approve role"),)),
    (A, Pause): Transition(_pause, ((Z, "pause"),)),
    (A, Resume): _NOTHING,
    (Z, Tick): _NOTHING,
    (Z, Pause): _NOTHING,
    (Z, Resume): Transition(_resume, ((P, "resume (dwell restarts)"), (A, "resume"))),
    (C, Tick): _NOTHING,
    (C, Resume): _NOTHING,
    # Illegal, by absence: (Z, Promote), (C, Promote), (C, Pause).
}
del P, A, Z, C


def advance(p: Progress, event: Event, cfg: RolloutConfig, min_requests: int) -> Progress:
    """The progress after `event`; `p` itself when nothing changes.

    Raises IllegalTransition when the event has no place in the phase, and
    Forbidden when the actor lacks a role (nothing changes in either case).
    """
    transition = TRANSITIONS.get((p.phase, type(event)))
    if transition is None:
        raise IllegalTransition(p.phase, event)
    return transition.action(p, event, cfg, min_requests)


def diagram() -> str:
    """A mermaid stateDiagram of TRANSITIONS, for the docs."""
    lines = ["stateDiagram-v2"]
    lines.append(f"    [*] --> {Phase.PROGRESSING.value}: start")
    lines.append(f"    [*] --> {Phase.AWAITING.value}: start, step 0 needs approval")
    for (phase, _kind), transition in TRANSITIONS.items():
        for target, when in transition.edges:
            lines.append(f"    {phase.value} --> {target.value}: {when}")
    lines.append(f"    {Phase.COMPLETE.value} --> [*]")
    illegal = [
        f"{_event_name(kind)} when {phase.value}"
        for phase in Phase
        for kind in (Tick, Promote, Pause, Resume)
        if (phase, kind) not in TRANSITIONS
    ]
    if illegal:
        lines.append(f"    note right of {Phase.COMPLETE.value}")
        lines.append(f"        illegal: {', '.join(illegal)}")
        lines.append("    end note")
    return "\n".join(lines) + "\n"


def _event_name(event: object) -> str:
    kind = event if isinstance(event, type) else type(event)
    return kind.__name__.lower()


# -------------------------------------------------------------------- JSON form


def to_dict(p: Progress) -> dict[str, Any]:
    """A JSON-safe dict of `p`, for the state file."""
    return {
        "phase": p.phase.value,
        "step": p.step,
        "step_started_at": p.step_started_at,
        "step_base_requests": p.step_base_requests,
        "paused_from": p.paused_from.value if p.paused_from else None,
        "history": [dict(entry) for entry in p.history],
    }


def from_dict(d: Any) -> Progress:
    """The inverse of to_dict; ValueError naming the field when `d` has the wrong shape."""
    if not isinstance(d, dict):
        raise ValueError(f"rollout must be an object, got {type(d).__name__}")
    phase = _phase(d.get("phase"), "phase")
    paused_from = None if d.get("paused_from") is None else _phase(d["paused_from"], "paused_from")
    step = _int(d.get("step"), "step")
    base = _int(d.get("step_base_requests"), "step_base_requests")
    if step < 0 or base < UNKNOWN:
        raise ValueError("rollout.step and rollout.step_base_requests must not be negative")
    started = d.get("step_started_at")
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise ValueError(f"rollout.step_started_at must be a number, got {started!r}")
    if not math.isfinite(started):
        raise ValueError(f"rollout.step_started_at must be finite, got {started!r}")
    history = d.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("rollout.history must be a list of objects")
    records = tuple(dict(h) for h in history[-HISTORY_LIMIT:])
    return Progress(phase, step, float(started), base, paused_from, records)


def _phase(value: Any, name: str) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        phases = ", ".join(p.value for p in Phase)
        raise ValueError(f"rollout.{name} must be one of {phases}, got {value!r}") from None


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"rollout.{name} must be an integer, got {value!r}")
    return value
