"""proxy.history: rates, recent error ratios and p99 from once-a-second samples of the
cumulative counters (what `turnout status` and /history show)."""

from __future__ import annotations

import pytest

from proxy.history import History
from proxy.metrics import Recorder

pytestmark = pytest.mark.unit


def answer(rec: Recorder, version: str, n: int, status: int = 200, seconds: float = 0.002) -> None:
    for _ in range(n):
        rec.finished((version, "weight"), status, seconds, None)


def test_recent_figures_are_over_the_last_ten_seconds() -> None:
    rec, h = Recorder(), History()
    assert h.recent("blue")["rps"] is None  # nothing sampled yet
    h.sample(100.0, rec, ["blue", "green"], mono=100.0)
    answer(rec, "blue", 500)  # before the window: not in the recent figures
    for t in range(1, 21):
        answer(rec, "green", 9)
        answer(rec, "green", 1, status=503, seconds=0.2)
        h.sample(100.0 + t, rec, ["blue", "green"], mono=100.0 + t)
    green = h.recent("green")
    assert green["seconds"] == 10.0
    assert green["rps"] == 10.0 and green["error_rate"] == 0.1
    assert green["p99_ms"] is not None and green["p99_ms"] > 100  # the slow 10 %
    blue = h.recent("blue")
    assert blue["rps"] == 0.0 and blue["error_rate"] is None  # served nothing lately


def test_series_has_one_point_a_second_aligned_for_every_version() -> None:
    rec, h = Recorder(), History(span=5)
    h.sample(0.0, rec, ["blue"], mono=0.0)
    answer(rec, "blue", 4)
    h.sample(1.0, rec, ["blue"], mono=1.0)
    answer(rec, "blue", 2)
    answer(rec, "green", 3)
    h.sample(2.0, rec, ["blue", "green"], mono=2.0)  # green added by a reload
    answer(rec, "green", 5)
    h.sample(3.0, rec, ["blue", "green"], mono=3.0)
    answer(rec, "blue", 1)
    h.sample(4.0, rec, ["blue"], mono=4.0)  # and removed again
    doc = h.series()
    assert doc["at"] == [1.0, 2.0, 3.0, 4.0]
    assert doc["versions"]["blue"]["rps"] == [4.0, 2.0, 0.0, 1.0]
    # no interval before it was there (not its lifetime count as one second), none after
    assert doc["versions"]["green"]["rps"] == [None, None, 5.0, None]
    for t in range(5, 20):
        h.sample(float(t), rec, ["blue", "green"], mono=float(t))
    assert len(h.samples) == 6 and len(h.points) == 5  # span (+ 1): bounded
    assert len(h.series(2.0)["at"]) == 3


def test_a_counter_that_went_down_reports_nothing_for_that_span() -> None:
    rec, h = Recorder(), History()
    answer(rec, "blue", 10)
    h.sample(0.0, rec, ["blue"], mono=0.0)
    h.sample(1.0, Recorder(), ["blue"], mono=1.0)  # counts restarted from zero
    assert h.recent("blue")["rps"] is None
