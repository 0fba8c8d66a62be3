"""`turnout status` as a person reads it: at most 80 columns, the versions with their
releases, the weight as a bar, the steps with the current one marked, the latch, the
guard's evidence in words, rates and p99 per version (PRODUCT.md §2)."""

from __future__ import annotations

import copy

import pytest

from proxy.cli import render_status

pytestmark = pytest.mark.unit

DOC = {
    "config": {"path": "/etc/turnout/turnout.yaml", "generation": 4,
               "loaded_at": "2026-12-03T06:00:00.000+00:00", "last_error": None},
    "stable": "blue", "canary": "green",
    "weight": {"configured": 10, "effective": 25},
    "rollback": {"active": False, "reason": None, "at": None, "release": None,
                 "evidence": None, "actor": None},
    "rollout": {"state": "awaiting_approval", "step": 2, "steps": [1, 10, 25, 50, 100],
                "step_approvals": [None, None, "product", None, None], "weight": 10,
                "rings": [], "next_at": None, "awaiting": "product", "waiting_for": []},
    "guard": {"state": "healthy", "reasons": [], "summary": None,
              "source": {"kind": "local", "up": True},
              "evidence": {"canary": {"requests": 226, "errors": 10, "error_rate": 10 / 226},
                           "stable": {"requests": 526, "errors": 0, "error_rate": 0.0},
                           "tests": {"relative": {"p_value": 5e-6}},
                           "thresholds": {"alpha": 1e-5}}},
    "versions": {
        "blue": {"requests": 12345, "errors": 0, "error_rate": 0.0, "p99_ms": 2.5,
                 "release": "2.3.1",
                 "recent": {"seconds": 10.0, "rps": 180.2, "error_rate": 0.0, "p99_ms": 1.9}},
        "green": {"requests": 1234, "errors": 10, "error_rate": 0.0081, "p99_ms": 3.0,
                  "release": "2.4.0",
                  "recent": {"seconds": 10.0, "rps": 20.1, "error_rate": 0.01, "p99_ms": 2.1}},
    },
    "mirror": None, "workers": None,
    "state": {"backend": "file", "up": True, "file": "/var/lib/turnout/turnout-state.json",
              "persisted": True, "error": None},
}  # fmt: skip


def test_the_summary_fits_80_columns_and_says_what_matters() -> None:
    out = render_status(DOC)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert lines[0] == "stable blue 2.3.1 · canary green 2.4.0 · weight 25% (configured 10%)"
    bar = lines[1]
    assert bar.startswith("canary  ") and bar.endswith(" 25%")
    filled, empty = bar.count("█"), bar.count("░")
    assert filled + empty == 58 and round(100 * filled / 58) in (24, 25, 26)
    assert "steps   ✓1%  ✓10%  ▶25% (product approves)  ·50%  ·100%" in lines
    assert "rollback latch: clear" in lines
    assert "guard: healthy · source local" in lines
    assert "  canary 10/226 errors (4.4%) vs stable 0/526; Fisher p = 5.0e-06 < 1e-05" in lines
    table = {line.split()[0]: line.split() for line in lines if line.startswith(("blue", "green"))}
    assert table["blue"] == ["blue", "12,345", "0", "0.00%", "180.2", "1.9"]
    assert table["green"] == ["green", "1,234", "10", "1.00%", "20.1", "2.1"]


def test_a_set_latch_is_said_first_and_long_lines_wrap() -> None:
    doc = copy.deepcopy(DOC)
    reason = "guard: canary breached (error_rate, relative) — " + "x" * 120
    doc["rollback"] = {"active": True, "reason": reason, "at": "2026-12-03T06:01:00+00:00",
                       "actor": "guard", "release": "2.4.0", "evidence": {}}  # fmt: skip
    doc["weight"]["effective"] = 0
    out = render_status(doc)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert lines[1].endswith("  0%  LATCHED") and "█" not in lines[1]
    latch = lines.index(next(x for x in lines if x.startswith("rollback latch: SET")))
    joined = " ".join(x.strip() for x in lines[latch : latch + 3])
    assert "by guard — guard: canary breached" in joined and "x" * 60 in joined
    assert "✗latched" in out


def test_without_recent_figures_the_lifetime_ones_are_shown() -> None:
    doc = copy.deepcopy(DOC)
    for v in doc["versions"].values():
        v["recent"] = {"seconds": 0.0, "rps": None, "error_rate": None, "p99_ms": None}
    lines = render_status(doc).splitlines()
    green = next(line for line in lines if line.startswith("green")).split()
    assert green == ["green", "1,234", "10", "0.81%", "-", "3.0"]
