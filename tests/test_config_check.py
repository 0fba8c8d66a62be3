"""`python -m proxy check` as a subprocess: every problem on stderr with its key path
and line, exit status 2, never a traceback. The rules themselves are in test_config.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_config import _nested

pytestmark = pytest.mark.live


def test_turnout_check_prints_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stable: blue\ncanary: green\nversions:\n"
        "  blue: {endpoints: [http://127.0.0.1:1]}\n"
        "  green: {endpoints: [http://127.0.0.1:2]}\n"
        "routing:\n  weight: 150\n  wieght: 3\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 2
    assert "routing.weight: must be an integer 0..100, got 150 (line 7)" in run.stderr
    assert "routing.wieght: unknown key (did you mean 'weight'?) (line 8)" in run.stderr
    assert "Traceback" not in run.stderr
    good = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", "config/demo.yaml"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr


def test_turnout_check_of_a_deep_file_prints_the_problem_and_exits_2(tmp_path):
    bad = tmp_path / "deep.yaml"
    bad.write_text(_nested(100_000))
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"{bad}: 1 problem",
        "  routing.rules[0][0][0][0][0]…: nested deeper than the limit of 64 levels (line 8)",
    ]
