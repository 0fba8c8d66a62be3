"""The controller's decisions without sockets: latch, resume, reloads."""

from __future__ import annotations

import time

from proxy import rollout
from proxy.config import parse
from proxy.controller import Controller
from proxy.runtime import Runtime
from proxy.state import load

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
