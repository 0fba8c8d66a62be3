"""proxy.rollout: the rollout state machine, driven by events with explicit times."""

from __future__ import annotations

import json

import pytest

from proxy import rollout
from proxy.config import RolloutConfig, Step
from proxy.rollout import (
    Forbidden,
    IllegalTransition,
    Pause,
    Phase,
    Progress,
    Promote,
    Resume,
    Tick,
    advance,
)

pytestmark = pytest.mark.unit

MIN = 50  # min_requests
PLAIN = RolloutConfig((Step(1), Step(10), Step(50), Step(100)), interval=60.0)
GATED = RolloutConfig((Step(1), Step(10), Step(50, approve="product"), Step(100)), interval=60.0)
ENGINEER = frozenset({"viewer", "engineer"})
PRODUCT = frozenset({"viewer", "product"})
VIEWER = frozenset({"viewer"})


def tick(p: Progress, now: float, requests: int, cfg: RolloutConfig = PLAIN, healthy=True):
    return advance(p, Tick(now, healthy, requests, evidence=True), cfg, MIN)


def test_walks_every_step_to_complete_with_ticks() -> None:
    p = rollout.start(PLAIN, now=0.0, canary_requests=0)
    assert (p.phase, p.step, rollout.weight(p, PLAIN)) == (Phase.PROGRESSING, 0, 1)
    weights = [rollout.weight(p, PLAIN)]
    now, requests = 0.0, 0
    for _ in range(4):
        now, requests = now + 60, requests + MIN
        p = tick(p, now, requests)
        weights.append(rollout.weight(p, PLAIN))
    assert weights == [1, 10, 50, 100, 100]
    assert p.phase is Phase.COMPLETE
    assert p.step == 3
    assert rollout.next_at(p, PLAIN) is None
    assert [h["event"] for h in p.history] == ["start", "tick", "tick", "tick", "tick"]
    assert p.history[-1] == {
        "at": 240.0,
        "event": "tick",
        "actor": None,
        "step": 3,
        "phase": "complete",
    }
    assert tick(p, now + 1000, requests + 1000) is p  # ticks change nothing once complete


def test_a_new_step_restarts_the_dwell_and_the_request_count() -> None:
    p = tick(rollout.start(PLAIN, 0.0, 100), 60.0, 150)
    assert (p.step, p.step_started_at, p.step_base_requests) == (1, 60.0, 150)
    assert rollout.next_at(p, PLAIN) == 120.0
    assert tick(p, 119.9, 1000) is p
    assert tick(p, 120.0, 199) is p
    assert tick(p, 120.0, 200).step == 2


def test_no_advance_before_the_dwell_has_passed() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    assert rollout.next_at(p, PLAIN) == 60.0
    assert tick(p, 59.999, 10_000) is p
    assert tick(p, 60.0, 10_000).step == 1


def test_a_step_interval_overrides_the_default_dwell() -> None:
    cfg = RolloutConfig((Step(5, interval=10.0), Step(20)), interval=600.0)
    p = rollout.start(cfg, 0.0, 0)
    assert rollout.next_at(p, cfg) == 10.0
    p = tick(p, 10.0, MIN, cfg)
    assert p.step == 1
    assert rollout.next_at(p, cfg) == 610.0


def test_no_advance_when_unhealthy() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    assert tick(p, 600.0, 10_000, healthy=False) is p


def test_no_advance_with_too_few_requests_in_the_step() -> None:
    p = rollout.start(PLAIN, 0.0, 1000)  # requests before the step do not count
    assert tick(p, 600.0, 1000 + MIN - 1) is p
    assert tick(p, 600.0, 1000 + MIN).step == 1


def test_no_advance_without_evidence_that_the_canary_is_under_its_limits() -> None:
    # time, health and requests are not enough: the step waits for the evidence
    p = rollout.start(PLAIN, 0.0, 0)
    quiet = Tick(600.0, True, 10_000, evidence=False)
    assert advance(p, quiet, PLAIN, MIN) is p
    assert rollout.waits(p, quiet, PLAIN, MIN) == ("evidence",)
    assert advance(p, Tick(600.0, True, 10_000, evidence=True), PLAIN, MIN).step == 1


def test_waits_names_everything_a_step_still_needs_in_order() -> None:
    p = rollout.start(PLAIN, 0.0, 100)
    early = Tick(30.0, False, 120, evidence=False)
    assert rollout.waits(p, early, PLAIN, MIN) == ("dwell", "verdict", "requests", "evidence")
    assert rollout.waits(p, Tick(60.0, True, 150, True), PLAIN, MIN) == ()
    paused = advance(p, Pause(1.0, "ops"), PLAIN, MIN)
    assert rollout.waits(paused, early, PLAIN, MIN) == ()  # it does not advance on ticks
    counting = Progress(Phase.PROGRESSING, 0, 0.0, rollout.UNKNOWN)
    assert rollout.waits(counting, Tick(60.0, True, 10_000, True), PLAIN, MIN) == ("requests",)


RINGS = RolloutConfig(
    (
        Step(0, cohorts=("internal",)),
        Step(0, approve="product", cohorts=("internal", "beta")),
        Step(10),
        Step(50, cohorts=("late",)),
    ),
    interval=60.0,
)


def test_rings_accumulate_as_the_steps_are_entered() -> None:
    p = rollout.start(RINGS, 0.0, 0)
    assert (rollout.weight(p, RINGS), rollout.rings(p, RINGS)) == (0, ("internal",))
    p = tick(p, 60.0, MIN, RINGS)
    assert p.phase is Phase.AWAITING  # beta is not in force before the approval
    assert (rollout.weight(p, RINGS), rollout.rings(p, RINGS)) == (0, ("internal",))
    paused = advance(p, Pause(61.0, "ops"), RINGS, MIN)
    assert rollout.rings(paused, RINGS) == ("internal",)
    p = advance(p, Promote(62.0, "pat", PRODUCT, canary_requests=MIN), RINGS, MIN)
    assert rollout.rings(p, RINGS) == ("internal", "beta")
    p = tick(p, 122.0, 2 * MIN, RINGS)
    assert (rollout.weight(p, RINGS), rollout.rings(p, RINGS)) == (10, ("internal", "beta"))
    p = tick(p, 182.0, 3 * MIN, RINGS)
    assert (rollout.weight(p, RINGS), rollout.rings(p, RINGS)) == (50, ("internal", "beta", "late"))
    assert rollout.rings(p, PLAIN) == ()  # steps without cohorts have no rings


def test_an_approval_step_waits_at_the_previous_weight() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    assert (p.phase, p.step) == (Phase.AWAITING, 2)
    assert rollout.weight(p, GATED) == 10  # not 50 until approved
    assert rollout.awaiting(p, GATED) == "product"
    assert rollout.next_at(p, GATED) is None
    assert tick(p, 10_000.0, 10_000, GATED) is p  # ticks do not approve


def test_forbidden_without_the_approve_role_changes_nothing() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    for roles in (ENGINEER, VIEWER, frozenset()):
        with pytest.raises(Forbidden) as info:
            advance(p, Promote(130.0, "ci-bot", roles), GATED, MIN)
        assert info.value.role == "product"
        assert "product" in str(info.value)
    assert (p.phase, p.step, rollout.weight(p, GATED)) == (Phase.AWAITING, 2, 10)


def test_the_right_role_approves_and_the_step_then_dwells() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    q = advance(p, Promote(130.0, "pat", PRODUCT, canary_requests=120), GATED, MIN)
    assert (q.phase, q.step, rollout.weight(q, GATED)) == (Phase.PROGRESSING, 2, 50)
    assert (q.step_started_at, q.step_base_requests) == (130.0, 120)
    assert rollout.awaiting(q, GATED) is None
    assert q.history[-1] == {
        "at": 130.0,
        "event": "promote",
        "actor": "pat",
        "step": 2,
        "phase": "progressing",
    }
    assert tick(q, 189.0, 1000, GATED) is q
    assert tick(q, 190.0, 170, GATED).phase is Phase.PROGRESSING
    assert tick(q, 190.0, 170, GATED).step == 3


def test_a_promote_without_a_request_count_starts_counting_at_the_next_tick() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    q = advance(p, Promote(5.0, "ci-bot", ENGINEER), PLAIN, MIN)
    assert (q.step, q.step_base_requests) == (1, rollout.UNKNOWN)
    r = tick(q, 10.0, 500)  # sets the base; not a transition
    assert (r.step, r.step_base_requests, r.history) == (1, 500, q.history)
    assert tick(r, 65.0, 549) is r
    assert tick(r, 65.0, 550).step == 2


def test_the_first_step_may_need_an_approval() -> None:
    cfg = RolloutConfig((Step(5, approve="product"), Step(100)))
    p = rollout.start(cfg, 0.0, 0)
    assert (p.phase, p.step, rollout.weight(p, cfg)) == (Phase.AWAITING, 0, 0)
    assert rollout.awaiting(p, cfg) == "product"
    p = advance(p, Promote(1.0, "pat", PRODUCT, 0), cfg, MIN)
    assert (p.phase, rollout.weight(p, cfg)) == (Phase.PROGRESSING, 5)


def test_promote_while_progressing_skips_the_dwell() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    q = advance(p, Promote(1.0, "ci-bot", ENGINEER, canary_requests=3), PLAIN, MIN)
    assert (q.phase, q.step, rollout.weight(q, PLAIN)) == (Phase.PROGRESSING, 1, 10)
    assert (q.step_started_at, q.step_base_requests) == (1.0, 3)
    assert rollout.next_at(q, PLAIN) == 61.0


def test_promote_while_progressing_needs_a_role_beyond_viewer() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    with pytest.raises(Forbidden) as info:
        advance(p, Promote(1.0, "reader", VIEWER), PLAIN, MIN)
    assert info.value.role is None


def test_promote_into_an_approval_step_needs_its_role_and_enters_it() -> None:
    p = tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED)
    assert p.step == 1
    with pytest.raises(Forbidden) as info:
        advance(p, Promote(61.0, "ci-bot", ENGINEER), GATED, MIN)
    assert info.value.role == "product"
    q = advance(p, Promote(61.0, "pat", PRODUCT, 60), GATED, MIN)
    assert (q.phase, q.step, rollout.weight(q, GATED)) == (Phase.PROGRESSING, 2, 50)


def test_promote_past_the_last_step_completes() -> None:
    p = rollout.start(RolloutConfig((Step(100),)), 0.0, 0)
    q = advance(p, Promote(1.0, "ci-bot", ENGINEER), RolloutConfig((Step(100),)), MIN)
    assert (q.phase, q.step) == (Phase.COMPLETE, 0)


def test_any_role_satisfies_every_role_check() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    q = advance(p, Promote(121.0, "loopback", frozenset({rollout.ANY_ROLE})), GATED, MIN)
    assert q.phase is Phase.PROGRESSING


def test_pause_and_resume_from_progressing() -> None:
    p = tick(rollout.start(PLAIN, 0.0, 0), 60.0, 50)
    paused = advance(p, Pause(70.0, "ci-bot"), PLAIN, MIN)
    assert (paused.phase, paused.paused_from, paused.step) == (Phase.PAUSED, Phase.PROGRESSING, 1)
    assert rollout.weight(paused, PLAIN) == 10  # frozen at the current step
    assert rollout.next_at(paused, PLAIN) is None
    assert tick(paused, 1000.0, 10_000) is paused
    assert advance(paused, Pause(71.0, "pat"), PLAIN, MIN) is paused
    resumed = advance(paused, Resume(500.0, "ci-bot"), PLAIN, MIN)
    assert (resumed.phase, resumed.paused_from) == (Phase.PROGRESSING, None)
    assert resumed.step_started_at == 500.0  # the dwell restarts
    assert rollout.next_at(resumed, PLAIN) == 560.0
    assert tick(resumed, 559.0, 10_000) is resumed
    assert tick(resumed, 560.0, 10_000).step == 2
    assert [h["event"] for h in resumed.history] == ["start", "tick", "pause", "resume"]
    assert resumed.history[-2]["actor"] == "ci-bot"


def test_pause_and_resume_while_awaiting_approval() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    paused = advance(p, Pause(130.0, "ci-bot"), GATED, MIN)
    assert (paused.phase, paused.paused_from) == (Phase.PAUSED, Phase.AWAITING)
    assert rollout.weight(paused, GATED) == 10
    assert rollout.awaiting(paused, GATED) is None
    resumed = advance(paused, Resume(140.0, "ci-bot"), GATED, MIN)
    assert resumed.phase is Phase.AWAITING
    assert rollout.awaiting(resumed, GATED) == "product"


@pytest.mark.parametrize("phase", [Phase.PROGRESSING, Phase.AWAITING, Phase.COMPLETE])
def test_resume_when_not_paused_changes_nothing(phase: Phase) -> None:
    p = Progress(phase, 2, 0.0, 0)
    assert advance(p, Resume(1.0, "ci-bot"), GATED, MIN) is p


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (Phase.COMPLETE, Promote(1.0, "ci-bot", ENGINEER)),
        (Phase.PAUSED, Promote(1.0, "ci-bot", ENGINEER)),
        (Phase.COMPLETE, Pause(1.0, "ci-bot")),
    ],
)
def test_illegal_transitions_raise(phase: Phase, event: object) -> None:
    p = Progress(phase, 3, 0.0, 0, Phase.PROGRESSING if phase is Phase.PAUSED else None)
    with pytest.raises(IllegalTransition) as info:
        advance(p, event, PLAIN, MIN)  # type: ignore[arg-type]
    assert phase.value in str(info.value)


def test_unknown_events_are_illegal() -> None:
    with pytest.raises(IllegalTransition):
        advance(rollout.start(PLAIN, 0.0, 0), object(), PLAIN, MIN)  # type: ignore[arg-type]


def test_the_table_covers_every_phase_and_event_or_leaves_it_illegal_on_purpose() -> None:
    events = (Tick, Promote, Pause, Resume)
    missing = {(ph, ev) for ph in Phase for ev in events} - set(rollout.TRANSITIONS)
    assert missing == {
        (Phase.COMPLETE, Promote),
        (Phase.PAUSED, Promote),
        (Phase.COMPLETE, Pause),
    }


def test_history_keeps_the_last_entries() -> None:
    p = rollout.start(PLAIN, 0.0, 0)
    for i in range(60):
        p = advance(p, Pause(float(i), "a"), PLAIN, MIN)
        p = advance(p, Resume(float(i), "a"), PLAIN, MIN)
    assert len(p.history) == rollout.HISTORY_LIMIT
    assert p.history[-1]["event"] == "resume"


def test_to_dict_from_dict_round_trip_through_json() -> None:
    p = tick(tick(rollout.start(GATED, 0.0, 0), 60.0, 50, GATED), 120.0, 100, GATED)
    p = advance(p, Pause(130.0, "ci-bot"), GATED, MIN)
    d = json.loads(json.dumps(rollout.to_dict(p)))
    assert d["phase"] == "paused"
    assert d["paused_from"] == "awaiting_approval"
    assert rollout.from_dict(d) == p


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"phase": "running"}, "phase"),
        ({"step": "1"}, "step"),
        ({"step": -1}, "negative"),
        ({"step_started_at": None}, "step_started_at"),
        ({"paused_from": 3}, "paused_from"),
        ({"history": {}}, "history"),
    ],
)
def test_from_dict_rejects_the_wrong_shape(change: dict, word: str) -> None:
    d = rollout.to_dict(rollout.start(PLAIN, 0.0, 0)) | change
    with pytest.raises(ValueError, match=word):
        rollout.from_dict(d)
    with pytest.raises(ValueError):
        rollout.from_dict([])


def test_the_diagram_is_drawn_from_the_table() -> None:
    text = rollout.diagram()
    assert text.startswith("stateDiagram-v2\n")
    for phase in Phase:
        assert phase.value in text
    edges = sum(len(t.edges) for t in rollout.TRANSITIONS.values())
    assert text.count(" --> ") == edges + 3  # + two starts and the end
    assert "progressing --> paused: pause" in text
    assert "promote when complete" in text


def test_weight_tolerates_steps_shortened_by_a_reload() -> None:
    p = Progress(Phase.PROGRESSING, 5, 0.0, 0)
    assert rollout.weight(p, PLAIN) == 100
    assert rollout.next_at(p, PLAIN) == 60.0


def test_readme_diagram_is_the_one_the_table_draws():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "```mermaid\n" + rollout.diagram().rstrip() + "\n```" in readme
