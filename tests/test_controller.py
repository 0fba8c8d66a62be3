"""The controller's decisions without sockets: latch, resume, reloads."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from proxy import rollout
from proxy.config import parse
from proxy.controller import Controller
from proxy.runtime import Runtime
from proxy.state import load

pytestmark = pytest.mark.unit

CONFIG = """
state_file: state.json
stable: blue
canary: green
versions:
  blue: {endpoints: ["http://127.0.0.1:9001"]}
  green: {endpoints: ["http://127.0.0.1:9002"], release: "%s"}
routing: {sticky: {key: "header:X-User-Id"}}
guard: {window: 10s, min_requests: 5}
rollout: {interval: 1m, steps: [5, 50, 100]}
"""


def controller(tmp_path, release: str = "1") -> Controller:
    cfg = parse(CONFIG % release, str(tmp_path / "turnout.yaml"))
    ctl = Controller(Runtime(cfg))
    ctl.restore()
    return ctl


def test_rollback_routes_to_stable_and_is_written_down(tmp_path):
    ctl = controller(tmp_path)
    rt = ctl.runtime
    assert rt.snapshot.table.weight == 5
    ctl.rollback("bad canary", "ops", {"canary": {"errors": 9}})
    assert rt.snapshot.table.latched and rt.snapshot.table.weight == 0
    saved = load(rt.config.state_file)
    assert saved.latch.active and saved.latch.reason == "bad canary"
    assert saved.latch.actor == "ops" and saved.latch.evidence == {"canary": {"errors": 9}}
    assert rt.recorder.rollbacks == 1 and rt.recorder.rollback_active == 1


def test_a_second_rollback_keeps_the_first_reason(tmp_path):
    ctl = controller(tmp_path)
    ctl.rollback("first", "ops")
    ctl.rollback("second", "ops")
    assert ctl.runtime.latch.reason == "first" and ctl.runtime.recorder.rollbacks == 1


def test_resume_restarts_the_steps_dwell(tmp_path):
    ctl = controller(tmp_path)
    before = ctl.runtime.progress
    assert before is not None
    ctl.rollback("bad", "ops")
    time.sleep(0.01)
    ctl.resume("ops")
    after = ctl.runtime.progress
    assert not ctl.runtime.latch.active
    assert after.step == before.step and after.step_started_at > before.step_started_at
    assert ctl.runtime.snapshot.table.weight == 5


def test_latch_survives_a_restart_and_a_new_release_clears_it(tmp_path):
    ctl = controller(tmp_path)
    ctl.rollback("bad", "ops")
    again = controller(tmp_path)  # a new process on the same state file
    assert again.runtime.latch.active and again.runtime.snapshot.table.weight == 0
    fixed = controller(tmp_path, release="2")
    assert not fixed.runtime.latch.active
    assert fixed.runtime.progress is not None and fixed.runtime.progress.step == 0
    assert fixed.runtime.progress.phase == rollout.Phase.PROGRESSING


def test_corrupt_state_file_starts_latched(tmp_path):
    (tmp_path / "state.json").write_text('{"latch": {"active": fal')
    ctl = controller(tmp_path)
    assert ctl.runtime.latch.active
    assert "state file unreadable" in ctl.runtime.latch.reason
    assert ctl.runtime.snapshot.table.weight == 0


# -- a state that cannot be written down ---------------------------------------------------


def unwritable(tmp_path) -> None:
    """Put a plain file where the state folder was: every write fails (for root too)."""
    (tmp_path / "state").rename(tmp_path / "state.away")
    (tmp_path / "state").write_text("not a folder")


def mend(tmp_path) -> None:
    (tmp_path / "state").unlink()
    (tmp_path / "state.away").rename(tmp_path / "state")


def in_folder(tmp_path) -> Controller:
    (tmp_path / "state").mkdir()
    text = CONFIG.replace("state_file: state.json", "state_file: state/state.json") % "1"
    ctl = Controller(Runtime(parse(text, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    return ctl


def test_an_unwritable_latch_stays_in_force_and_is_retried_until_saved(tmp_path, caplog):
    ctl = in_folder(tmp_path)
    rt = ctl.runtime
    unwritable(tmp_path)
    ctl.rollback("bad canary", "ops")
    assert rt.snapshot.table.latched and rt.snapshot.table.weight == 0  # in force regardless
    assert ctl.latch_unsaved and rt.recorder.state_write_failures == 1
    doc = ctl.persistence()
    assert doc["persisted"] is False and "Not a directory" in doc["error"]
    assert doc["unsaved_since"] is not None and doc["write_failures"] == 1
    for _ in range(3):  # retried, logged once
        ctl.retry_at = 0.0
        asyncio.run(ctl.turn())
    assert rt.recorder.state_write_failures == 4
    assert sum("cannot write state file" in r.getMessage() for r in caplog.records) == 1
    mend(tmp_path)
    ctl.retry_at = 0.0
    asyncio.run(ctl.turn())
    assert not ctl.latch_unsaved and ctl.persistence()["persisted"] is True
    assert load(rt.config.state_file).latch.reason == "bad canary"


def test_confirm_names_what_is_missing(tmp_path):
    ctl = in_folder(tmp_path)
    unwritable(tmp_path)
    ctl.rollback("bad", "ops")

    async def followers() -> dict[int, str]:
        return {1: "ok", 2: "no answer within 0.8 s", 3: "down"}

    ctl.collect = followers
    doc = asyncio.run(ctl.confirm())
    assert doc["ok"] is False and doc["latched"] is True and doc["persisted"] is False
    assert doc["in_force"] == {"workers": 4, "unconfirmed": {"2": "no answer within 0.8 s"},
                               "starting": [3]}  # fmt: skip
    assert "cannot write state file" in doc["error"] and "worker 2" in doc["error"]
    mend(tmp_path)
    ctl.write(ctl.saved_state())

    async def all_ok() -> dict[int, str]:
        return {1: "ok", 2: "ok"}

    ctl.collect = all_ok
    assert asyncio.run(ctl.confirm())["ok"] is True


# -- a following worker ---------------------------------------------------------------------


def test_a_follower_adopts_the_newest_pushed_state_only(tmp_path):
    leader = controller(tmp_path)
    cfg = leader.runtime.config
    follower = Controller(Runtime(cfg), follower=True)
    follower.restore()
    leader.rollback("bad", "ops")
    latched = leader.current()
    leader.resume("ops")
    cleared = leader.current()
    assert follower.adopt(cleared) and not follower.runtime.latch.active
    assert not follower.adopt(latched)  # older: crossed on the way
    assert not follower.runtime.latch.active
    leader.rollback("again", "ops")
    assert follower.adopt(leader.current())
    assert follower.runtime.snapshot.table.latched and follower.runtime.latch.reason == "again"


def test_a_follower_on_another_release_takes_the_latch_but_keeps_its_rollout(tmp_path):
    leader = controller(tmp_path, release="2")
    follower = Controller(Runtime(parse(CONFIG % "1", str(tmp_path / "other.yaml"))), True)
    follower.restore()
    before = follower.runtime.progress
    leader.rollback("bad", "ops")
    assert follower.adopt(leader.current())
    assert follower.runtime.latch.active and follower.runtime.progress == before


def test_a_new_leader_keeps_the_windows_of_the_last_one(tmp_path):
    old = controller(tmp_path)
    rec = old.runtime.recorder
    for _ in range(7):
        rec.finished(("green", "weight"), 200, 0.01, None)
    now = time.monotonic()
    old.feed(now)
    doc = json.loads(json.dumps(old.guard_doc()))  # through the ledger's JSON
    new = controller(tmp_path)
    new.runtime.recorder.add_counts(rec.counts())  # the counts carried over, plus 2 more
    for _ in range(2):
        new.runtime.recorder.finished(("green", "weight"), 200, 0.01, None)
    new.take_over(doc)
    new.feed(now)
    assert new.windows["green"].stats(now).requests == 9  # not 2, not 16


def test_a_new_leader_keeps_the_cumulative_evidence_of_the_last_one(tmp_path):
    old = controller(tmp_path)
    rec, now = old.runtime.recorder, time.monotonic()
    for second in range(20):
        for i in range(10):
            rec.finished(("green", "weight"), 503 if i == second % 10 == 0 else 200, 0.01, None)
            rec.finished(("blue", "weight"), 200, 0.01, None)
        old.tick(now + second, time.time())
    before = old.cumulative.dump()
    assert old.cumulative.error_rate.total == 200 and old.cumulative.error_rate.bad == 2
    doc = json.loads(json.dumps(old.guard_doc(), allow_nan=False))
    new = controller(tmp_path)
    new.runtime.recorder.add_counts(rec.counts())  # the counts carried over, plus 10 more
    for _ in range(10):
        new.runtime.recorder.finished(("green", "weight"), 200, 0.01, None)
    new.take_over(doc)
    assert new.cumulative is not None and new.cumulative.dump() == before
    new.tick(now + 21, time.time())
    assert new.cumulative.error_rate.total == 210  # carried on, not restarted, not doubled
    assert new.cumulative.promote.logs != old.cumulative.promote.logs

    # evidence about another step, or broken, is not taken: it starts afresh
    moved = json.loads(json.dumps(doc))
    assert moved["cumulative"]["key"].endswith("(0, 5, ()))")  # step 0, weight 5, no rings
    moved["cumulative"]["key"] = moved["cumulative"]["key"].replace("(0, 5, ())", "(1, 50, ())")
    broken = json.loads(json.dumps(doc))
    broken["cumulative"]["evidence"]["tests"]["promote"]["logs"] = ["many"]
    for bad in (moved, broken):
        other = controller(tmp_path)
        other.runtime.recorder.add_counts(rec.counts())
        other.take_over(bad)
        assert other.cumulative is None
        other.tick(now + 21, time.time())
        assert other.cumulative.error_rate.total == 0


def test_without_a_handover_the_windows_start_from_the_counts_as_they_are(tmp_path):
    ctl = controller(tmp_path)
    for _ in range(5):
        ctl.runtime.recorder.finished(("green", "weight"), 200, 0.01, None)
    ctl.take_over(None)
    ctl.feed(time.monotonic())
    assert ctl.windows["green"].stats(time.monotonic()).requests == 0  # the past is not news


QUIET = """
state_file: state.json
stable: blue
canary: green
versions:
  blue: {endpoints: ["http://127.0.0.1:9001"]}
  green: {endpoints: ["http://127.0.0.1:9002"]}
routing: {weight: 5}
guard: {window: 30s, min_requests: 50, max_error_rate: 0.02}
"""


def test_a_canary_too_quiet_for_the_window_is_judged_by_the_cumulative_tests(tmp_path):
    """One canary request every two seconds, half of them failing: the window never has
    min_requests, so its verdict stays inconclusive; the cumulative test latches."""
    ctl = Controller(Runtime(parse(QUIET, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    rec, now = ctl.runtime.recorder, time.monotonic()
    for second in range(300):
        for _ in range(19):
            rec.finished(("blue", "weight"), 200, 0.01, None)
        if second % 2 == 0:
            status = 503 if second % 4 == 0 else 200
            rec.finished(("green", "weight"), status, 0.01, None)
        ctl.tick(now + second, time.time())
        if ctl.runtime.latch.active:
            break
    assert ctl.runtime.latch.active, ctl.last_verdict
    v = ctl.last_verdict
    assert v is not None and v.state == "breach" and v.evidence["speed"] == "cumulative"
    assert "error_rate_cumulative" in v.reasons
    assert v.evidence["canary"]["requests"] < 50  # the window alone could not have judged
    assert second < 120, second  # about 30 canary requests at most
    test = v.evidence["cumulative"]["tests"]["error_rate"]
    assert test["e_value"] >= test["threshold"]
    json.dumps(ctl.runtime.latch.evidence, allow_nan=False)  # goes to the state file


def test_a_healthy_quiet_canary_is_never_latched_and_resume_starts_the_evidence_afresh(tmp_path):
    ctl = Controller(Runtime(parse(QUIET, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    rec, now = ctl.runtime.recorder, time.monotonic()
    for second in range(600):  # 1.5% errors on both, under the 2% budget
        for version in ("blue", "green"):
            status = 503 if (second * 7 + len(version)) % 67 == 0 else 200
            rec.finished((version, "weight"), status, 0.01, None)
        ctl.tick(now + second, time.time())
    assert not ctl.runtime.latch.active
    cum = ctl.last_verdict.evidence["cumulative"]
    assert cum["breaches"] == [] and cum["tests"]["error_rate"]["total"] == 600
    assert cum["tests"]["error_rate"]["bad"] > 0 and cum["tests"]["relative"]["canary"][0] > 0
    ctl.rollback("by hand", "ops")
    ctl.resume("ops")
    ctl.tick(now + 201, time.time())
    assert ctl.last_verdict.evidence["cumulative"]["tests"]["error_rate"]["total"] == 0


def test_a_cumulative_pause_resumed_by_an_operator_is_not_repeated_on_the_same_evidence(
    tmp_path,
):
    cfg = QUIET.replace("max_error_rate: 0.02}", "max_error_rate: 0.02, on_breach: pause}")
    cfg = cfg.replace("routing: {weight: 5}", "rollout: {interval: 60m, steps: [5, 50]}")
    ctl = Controller(Runtime(parse(cfg, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    rec, now = ctl.runtime.recorder, time.monotonic()
    second = 0
    for second in range(120):  # a quiet canary, half failing: the cumulative test fires
        rec.finished(("green", "weight"), 503 if second % 2 else 200, 0.01, None)
        ctl.tick(now + second, time.time())
        if ctl.runtime.progress.phase == rollout.Phase.PAUSED:
            break
    assert ctl.runtime.progress.phase == rollout.Phase.PAUSED
    assert ctl.last_verdict.evidence["speed"] == "cumulative"
    assert not ctl.runtime.latch.active  # on_breach: pause
    ctl.resume("ops")
    assert ctl.runtime.progress.phase == rollout.Phase.PROGRESSING
    ctl.tick(now + second + 1, time.time())  # no new outcome: nothing to act on
    assert ctl.runtime.progress.phase == rollout.Phase.PROGRESSING


def test_one_breach_episode_is_alerted_once_whichever_speed_sees_it_first(tmp_path):
    """The cumulative test fires first on a quiet canary; the fault goes on, traffic
    grows, and the window fires too: still one episode, one breach event."""
    cfg = QUIET.replace("max_error_rate: 0.02}", "max_error_rate: 0.02, on_breach: alert}")
    ctl = Controller(Runtime(parse(cfg, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    rec, now = ctl.runtime.recorder, time.monotonic()
    speeds = []
    for second in range(200):
        canary = 1 if second < 100 else 10  # quiet, then enough for the window
        for i in range(canary):
            rec.finished(("green", "weight"), 503 if i % 2 == 0 else 200, 0.01, None)
        for _ in range(19):
            rec.finished(("blue", "weight"), 200, 0.01, None)
        ctl.tick(now + second, time.time())
        if ctl.last_verdict.state == "breach":
            speeds.append(ctl.last_verdict.evidence["speed"])
    assert speeds[0] == "cumulative" and "window" in speeds  # both speeds saw it
    breaches = [e for e in ctl.events if e["kind"] == "breach"]
    assert len(breaches) == 1, breaches


QUIET_ROLLOUT = QUIET.replace(
    "routing: {weight: 5}", "rollout: {interval: 10s, steps: [5, 50, 100]}"
)


def test_a_rollout_with_a_canary_too_quiet_to_judge_does_not_advance_and_says_why(tmp_path):
    """The dwell is over and the step has its min_requests, but one canary request a
    second is too few for the window, and 60 error-free ones too few to show it is under
    a 2% budget: the step waits, and /status says for what. When the cumulative
    evidence is enough, it advances on it, the window still inconclusive."""
    ctl = Controller(Runtime(parse(QUIET_ROLLOUT, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    rec, now = ctl.runtime.recorder, time.monotonic()
    started = ctl.runtime.progress.step_started_at
    for second in range(60):
        for _ in range(50):
            rec.finished(("blue", "weight"), 200, 0.01, None)
        rec.finished(("green", "weight"), 200, 0.01, None)
        ctl.tick(now + second, started + second)
    progress = ctl.runtime.progress
    assert (progress.phase, progress.step) == (rollout.Phase.PROGRESSING, 0)
    assert not ctl.runtime.latch.active
    waits = ctl.waiting_for()
    assert len(waits) == 2, waits  # the window's verdict and the evidence; not the dwell
    assert waits[0] == "a healthy guard verdict (now inconclusive)"
    needed = ctl.cumulative.needed()
    assert needed is not None and 100 < needed < 200, needed
    assert waits[1] == (
        f"evidence that the canary is under its limits: needs ~{needed} more canary "
        "requests to promote"
    )
    # the same trickle goes on: the window stays inconclusive, and once the evidence
    # has crossed the step advances on it
    for second in range(60, 600):
        for _ in range(50):
            rec.finished(("blue", "weight"), 200, 0.01, None)
        rec.finished(("green", "weight"), 200, 0.01, None)
        ctl.tick(now + second, started + second)
        if ctl.runtime.progress.step == 1:
            break
    assert ctl.runtime.progress.step == 1, ctl.waiting_for()
    assert ctl.last_verdict.state == "inconclusive"
    assert 60 + needed - 2 <= second <= 60 + needed + 2, (second, needed)  # as foretold
    ctl.tick(now + second + 1, started + second + 1)
    assert ctl.cumulative.error_rate.total == 0  # the next step gathers its evidence afresh


def test_a_rollout_without_a_guard_still_waits_for_evidence_under_the_default_limits(tmp_path):
    cfg = QUIET_ROLLOUT.replace(
        "guard: {window: 30s, min_requests: 50, max_error_rate: 0.02}\n", ""
    )
    ctl = Controller(Runtime(parse(cfg, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    assert ctl.runtime.config.guard is None
    rec, now = ctl.runtime.recorder, time.monotonic()
    started = ctl.runtime.progress.step_started_at
    for second in range(30):  # 10% errors: never evidence under 2%, never a rollback
        for i in range(10):
            rec.finished(("green", "weight"), 503 if i == 0 else 200, 0.01, None)
        ctl.tick(now + second, started + second)
    assert ctl.runtime.progress.step == 0 and not ctl.runtime.latch.active
    assert ctl.last_verdict is None  # no guard: no verdict
    assert ctl.waiting_for() == [
        "evidence that the canary is under its limits, which what it served so far (too close "
        "to a limit, or above it) does not give yet"
    ]


APPROVAL = QUIET.replace(
    "routing: {weight: 5}",
    "rollout: {interval: 1s, steps: [5, {weight: 50, approve: product}, 100]}",
)


def serve(ctl: Controller, start: float, wall: float, seconds: range, canary: int = 20) -> None:
    """`canary` clean requests a second to each version and a tick a second, at
    monotonic `start + second` and wall-clock `wall + second`."""
    rec = ctl.runtime.recorder
    for second in seconds:
        for _ in range(canary):
            rec.finished(("green", "weight"), 200, 0.01, None)
            rec.finished(("blue", "weight"), 200, 0.01, None)
        ctl.tick(start + second, wall + second)


def test_an_approved_step_earns_its_own_evidence(tmp_path):
    """Evidence gathered while a step waits for its approval is about the previous
    step's weight: once approved, the step starts its evidence afresh."""
    ctl = Controller(Runtime(parse(APPROVAL, str(tmp_path / "turnout.yaml"))))
    ctl.restore()
    wall, now = ctl.runtime.progress.step_started_at, time.monotonic()
    serve(ctl, now, wall, range(40))
    assert ctl.runtime.progress.phase == rollout.Phase.AWAITING
    serve(ctl, now, wall, range(40, 80))  # 800 clean requests while awaiting: promotable
    assert ctl.cumulative.promotable
    ctl.promote("pat", frozenset({"product"}))
    assert ctl.runtime.progress.phase == rollout.Phase.PROGRESSING
    serve(ctl, now, wall, range(80, 82))
    assert ctl.runtime.progress.step == 1  # not advanced on the awaiting evidence
    assert ctl.cumulative.error_rate.total == 40 and not ctl.cumulative.promotable


def test_a_resume_that_changes_nothing_keeps_the_evidence(tmp_path):
    ctl = Controller(Runtime(parse(QUIET_ROLLOUT.replace("10s", "60m"),
                                   str(tmp_path / "turnout.yaml"))))  # fmt: skip
    ctl.restore()
    serve(ctl, time.monotonic(), time.time(), range(30))
    gathered = ctl.cumulative.error_rate.total
    assert gathered == 600
    ctl.resume("ops")  # progressing, no latch: nothing to resume
    assert ctl.cumulative is not None and ctl.cumulative.error_rate.total == gathered
    ctl.pause("ops")
    ctl.resume("ops")  # a real resume: the canary is judged on new evidence
    assert ctl.cumulative is None


def test_a_broken_handover_of_the_evidence_starts_it_afresh(tmp_path, caplog):
    old = controller(tmp_path)
    serve(old, time.monotonic(), time.time(), range(5))
    good = json.loads(json.dumps(old.guard_doc()))
    breakages = [
        lambda d: d.__setitem__("cumulative", ["not", "a", "dict"]),
        lambda d: d["cumulative"]["evidence"].__setitem__("since", 10**400),
        lambda d: d["cumulative"]["evidence"]["tests"]["promote"].__setitem__("logs", ["inf"] * 5),
        lambda d: d["cumulative"]["evidence"]["tests"]["promote"].__setitem__("bad", 10**6),
        lambda d: d["cumulative"]["evidence"]["tests"]["error_rate"].__setitem__("bad", 1),
    ]
    for breakage in breakages:
        doc = json.loads(json.dumps(good))
        breakage(doc)
        new = controller(tmp_path)
        new.runtime.recorder.add_counts(old.runtime.recorder.counts())
        new.take_over(doc)  # never raises: the worker must come up
        assert new.cumulative is None, doc["cumulative"]
    clean = controller(tmp_path)
    clean.runtime.recorder.add_counts(old.runtime.recorder.counts())
    clean.take_over(json.loads(json.dumps(good)))
    assert clean.cumulative is not None and clean.cumulative.error_rate.total == 100
