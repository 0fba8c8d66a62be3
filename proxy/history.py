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
- Memory is bounded: SPAN + 1 samples of (versions × histogram buckets) integers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .guard import quantile_ms
from .metrics import Recorder

SPAN = 600  # seconds of history kept: the dashboard's ten minutes
RECENT = 10.0  # seconds behind the "recent" figures of /status


class History:
    def __init__(self, span: int = SPAN) -> None:
        # (wall-clock s, {version: (answers, errors, histogram counts)})
        self.samples: deque[tuple[float, dict[str, tuple[int, int, tuple[int, ...]]]]] = deque(
            maxlen=span + 1
        )

    def sample(self, now: float, rec: Recorder, versions: list[str]) -> None:
        totals = rec.version_totals()
        durations = rec.durations
        point = {}
        for name in versions:
            t = totals.get(name, {"requests": 0, "errors": 0})
            hist = durations.get(name)
            counts = tuple(hist.counts) if hist is not None else ()
            point[name] = (int(t["requests"]), int(t["errors"]), counts)
        self.samples.append((now, point))

    def recent(self, version: str, seconds: float = RECENT) -> dict[str, Any]:
        """Requests/s, error ratio and p99 over about the last `seconds`."""
        if len(self.samples) < 2:
            return {"seconds": 0.0, "rps": None, "error_rate": None, "p99_ms": None}
        now, last = self.samples[-1]
        then, first = self.samples[0]
        for at, point in reversed(self.samples):
            then, first = at, point
            if now - at >= seconds:
                break
        return {"seconds": round(now - then, 3), **_between(first, last, version, now - then)}

    def series(self, seconds: float = SPAN) -> dict[str, Any]:
        """Per second over the last `seconds`: {"at": [...], "versions": {v: {"rps": [...],
        "error_rate": [...], "p99_ms": [...]}}}, each list one value per interval."""
        samples = list(self.samples)
        if samples:
            cut = samples[-1][0] - seconds
            samples = [s for s in samples if s[0] >= cut]
        out: dict[str, Any] = {"at": [], "versions": {}}
        for (t0, p0), (t1, p1) in zip(samples, samples[1:], strict=False):
            out["at"].append(t1)
            for version in p1:
                fig = _between(p0, p1, version, t1 - t0)
                into = out["versions"].setdefault(
                    version, {"rps": [], "error_rate": [], "p99_ms": []}
                )
                for key in ("rps", "error_rate", "p99_ms"):
                    into[key].append(fig[key])
        # a version that appeared late gets leading gaps, so every list lines up with `at`
        for figures in out["versions"].values():
            for key, values in figures.items():
                figures[key] = [None] * (len(out["at"]) - len(values)) + values
        return out


def _between(
    first: dict[str, tuple[int, int, tuple[int, ...]]],
    last: dict[str, tuple[int, int, tuple[int, ...]]],
    version: str,
    seconds: float,
) -> dict[str, Any]:
    empty: dict[str, Any] = {"rps": None, "error_rate": None, "p99_ms": None}
    if seconds <= 0 or version not in last:
        return empty
    n1, e1, h1 = last[version]
    n0, e0, h0 = first.get(version, (0, 0, ()))
    n, e = n1 - n0, e1 - e0
    if n < 0 or e < 0:
        return empty  # a reset in between
    delta = tuple(a - b for a, b in zip(h1, h0, strict=True)) if h0 and h1 else h1
    p99 = quantile_ms(delta, 0.99) if delta and min(delta) >= 0 and any(delta) else None
    return {
        "rps": round(n / seconds, 3),
        "error_rate": round(e / n, 6) if n else None,
        "p99_ms": None if p99 is None else round(p99, 3),
    }
