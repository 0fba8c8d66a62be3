"""A short history of each version's traffic: what `turnout status` and the dashboard show
as rates, recent error ratios and recent p99, without a Prometheus.

Job: once a second (the server's sweep) keep a sample of the cumulative counters per
version — answers, errors, the duration histogram — for the last SPAN seconds, and
answer from the differences between samples.

Rules:
- Samples are of cumulative counters, so a rate over any span is one subtraction,
  and a lost sample costs nothing but resolution.
- Counters never go down (workers.py keeps them across restarts); should one
  (a reset), the span that contains it reports nothing rather than a negative rate.
- Memory is bounded: SPAN + 1 samples of (versions × histogram buckets) integers,
  and SPAN intervals' figures, each worked out once (a dashboard polling every
  second reads them, it does not recompute ten minutes of quantiles).
- Intervals are measured on the monotonic clock; the wall clock only labels them.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .guard import quantile_ms
from .metrics import Recorder

SPAN = 600  # seconds of history kept: the dashboard's ten minutes
RECENT = 10.0  # seconds behind the "recent" figures of /status


class History:
    def __init__(self, span: int = SPAN) -> None:
        # (wall-clock s, monotonic s, {version: (answers, errors, histogram counts)})
        self.samples: deque[tuple[float, float, dict[str, Counts]]] = deque(maxlen=span + 1)
        # the figures of each interval, worked out once when its second sample came:
        # (wall-clock s, {version: {"rps", "error_rate", "p99_ms"}})
        self.points: deque[tuple[float, dict[str, dict[str, Any]]]] = deque(maxlen=span)

    def sample(
        self, wall: float, rec: Recorder, versions: list[str], mono: float | None = None
    ) -> None:
        mono = time.monotonic() if mono is None else mono
        totals = rec.version_totals()
        durations = rec.durations
        point: dict[str, Counts] = {}
        for name in versions:
            t = totals.get(name, {"requests": 0, "errors": 0})
            hist = durations.get(name)
            counts = tuple(hist.counts) if hist is not None else ()
            point[name] = (int(t["requests"]), int(t["errors"]), counts)
        if self.samples:
            _, mono0, before = self.samples[-1]
            figures = {v: _between(before, point, v, mono - mono0) for v in point}
            self.points.append((wall, figures))
        self.samples.append((wall, mono, point))

    def recent(self, version: str, seconds: float = RECENT) -> dict[str, Any]:
        """Requests/s, error ratio and p99 over about the last `seconds`."""
        if len(self.samples) < 2:
            return {"seconds": 0.0, "rps": None, "error_rate": None, "p99_ms": None}
        _, now, last = self.samples[-1]
        then, first = self.samples[0][1], self.samples[0][2]
        for _, at, point in reversed(self.samples):
            then, first = at, point
            if now - at >= seconds:
                break
        return {"seconds": round(now - then, 3), **_between(first, last, version, now - then)}

    def series(self, seconds: float = SPAN) -> dict[str, Any]:
        """Per second over the last `seconds`: {"at": [...], "versions": {v: {"rps": [...],
        "error_rate": [...], "p99_ms": [...]}}}, each list one value per interval (None
        where the version had no figures: before it was added, after it was removed)."""
        points = list(self.points)
        if points:
            cut = points[-1][0] - seconds
            points = [pt for pt in points if pt[0] >= cut]
        names = {v for _, figures in points for v in figures}
        out: dict[str, Any] = {
            "at": [at for at, _ in points],
            "versions": {v: {"rps": [], "error_rate": [], "p99_ms": []} for v in sorted(names)},
        }
        for _, figures in points:
            for v, into in out["versions"].items():
                fig = figures.get(v) or _EMPTY
                for key in ("rps", "error_rate", "p99_ms"):
                    into[key].append(fig[key])
        return out


Counts = tuple[int, int, tuple[int, ...]]
_EMPTY: dict[str, Any] = {"rps": None, "error_rate": None, "p99_ms": None}


def _between(
    first: dict[str, Counts], last: dict[str, Counts], version: str, seconds: float
) -> dict[str, Any]:
    if seconds <= 0 or version not in last or version not in first:
        return dict(_EMPTY)  # a version just added (a reload) has no interval yet
    n1, e1, h1 = last[version]
    n0, e0, h0 = first[version]
    n, e = n1 - n0, e1 - e0
    if n < 0 or e < 0:
        return dict(_EMPTY)  # a reset in between
    delta = tuple(a - b for a, b in zip(h1, h0, strict=True)) if h0 and h1 else h1
    p99 = quantile_ms(delta, 0.99) if delta and min(delta) >= 0 and any(delta) else None
    return {
        "rps": round(n / seconds, 3),
        "error_rate": round(e / n, 6) if n else None,
        "p99_ms": None if p99 is None else round(p99, 3),
    }
