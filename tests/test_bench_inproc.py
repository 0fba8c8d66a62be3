"""`python -m bench.inproc` drives the core in both builds and checks what it counted:
every request answered once, by the version routing chose."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[1]


def test_inproc_reports_both_builds_after_checking_every_answer() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.inproc", "--requests", "3000", "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^\| (compiled|pure) \| ([0-9.]+) \|", result.stdout, re.M))
    assert set(rows) == {"compiled", "pure"}, result.stdout
    assert all(float(us) > 0 for us in rows.values())
