"""The canary's error budget: sliding windows of outcomes and a pure verdict.

Job: keep, per version, a sliding window of request outcomes (`Window`), and
decide from two windows' `Stats` whether the canary is `healthy`, in `breach`
or `inconclusive` (`verdict`). docs/guard.md has the method, its sources and
the simulation that calibrates it.

Rules:
- No I/O, no clock, no randomness: `now` is always passed in.
- `Window.record` is the hot path: O(1), integer increments into preallocated
  lists, no objects created. Buckets are expired lazily when time advances.
- Errors are status >= 500 or a proxy-made failure (`error=True`); 4xx are not.
- Fewer than `min_requests` canary requests in the window is `inconclusive`:
  never healthy, never a breach.
- Every check is a one-sided exact test at a strict per-look `alpha`, because
  the controller looks every second at overlapping windows (many looks).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any

# Latency histogram: bucket i holds (UPPER_MS[i-1], UPPER_MS[i]] ms, the last one anything
# slower than 60 s. The edges are the usual "round" thresholds (1, 1.5, 2, 2.5, 3, 4, 5, 6,
# 8 per decade, from 0.1 ms) so that a max_p99_ms like 250 or 800 is an edge and the count
# of requests slower than it is exact.
_MANTISSAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
UPPER_MS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 6) for e in range(-1, 5) for m in _MANTISSAS if m * 10.0**e <= 60_000
)
LATENCY_BUCKETS = len(UPPER_MS) + 1
_NO_LATENCY: tuple[int, ...] = ()
_ZEROS = (0, 0, 0, 0)
P99_SLOW_SHARE = 0.01  # p99 > T  <=>  more than 1% of requests are slower than T

# The bounds (ms) of the exported duration histogram (`turnout_request_duration_seconds`),
# each one of the edges above. A guard that reads a Prometheus server sees only these, so
# its `max_p99_ms` must be one of them for the count of slower requests to be exact.
EXPORTED_MS: tuple[float, ...] = (
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
)  # fmt: skip

HEALTHY, BREACH, INCONCLUSIVE = "healthy", "breach", "inconclusive"
ON_BREACH = ("rollback", "pause", "alert")
SOURCES = ("local", "prometheus")


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """`guard.prometheus`: where the fleet's counts are read (see proxy/sources.py)."""

    url: str  # the Prometheus server, e.g. http://prometheus:9090
    job: str = "turnout"  # the scrape job of the replicas
    query_interval: float = 5.0  # seconds between queries
    timeout: float = 2.0  # seconds a query may take before the source counts as down

    def __post_init__(self) -> None:
        if not self.query_interval > 0 or not self.timeout > 0:
            raise ValueError("query_interval and timeout must be > 0")


@dataclass(frozen=True, slots=True)
class Policy:
    """The `guard:` section, plus the statistical knobs (defaults in docs/guard.md)."""

    window: float = 30.0
    min_requests: int = 50
    max_error_rate: float = 0.02
    max_p99_ms: float | None = None
    relative_to_stable: bool = True
    on_breach: str = "rollback"
    webhook: str | None = None
    alpha: float = 1e-5  # per-look false-breach probability of each test
    relative_min_ratio: float = 2.0  # canary rate must be >= 2x stable's ...
    relative_min_difference: float = 0.002  # ... and >= 0.2 points above it
    sequential_alpha: float = 1e-3  # a false breach of the cumulative tests, per step
    promotion_alpha: float = 0.05  # evidence "under its limits" for a canary at its limits
    source: str = "local"  # local: this process's counts; prometheus: the fleet's
    prometheus: FleetCounts | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "prometheus":
            if self.prometheus is None:
                raise ValueError("source prometheus needs the prometheus settings")
            if self.max_p99_ms is not None and self.max_p99_ms not in EXPORTED_MS:
                raise ValueError(
                    f"with source prometheus, max_p99_ms must be a bound of the exported "
                    f"histogram {EXPORTED_MS}, got {self.max_p99_ms}"
                )
        if not self.window > 0:
            raise ValueError(f"window must be > 0, got {self.window}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if not 0 <= self.max_error_rate < 1:
            raise ValueError(f"max_error_rate must be in [0, 1), got {self.max_error_rate}")
        if self.max_p99_ms is not None and not self.max_p99_ms > 0:
            raise ValueError(f"max_p99_ms must be > 0, got {self.max_p99_ms}")
        if self.on_breach not in ON_BREACH:
            raise ValueError(f"on_breach must be one of {ON_BREACH}, got {self.on_breach!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        for name in ("sequential_alpha", "promotion_alpha"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if self.relative_min_ratio < 1 or self.relative_min_difference < 0:
            raise ValueError("relative_min_ratio must be >= 1 and relative_min_difference >= 0")


@dataclass(frozen=True, slots=True)
class Stats:
    """One version's outcomes over a window. Totals include shadow outcomes."""

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None
    shadow_requests: int = 0
    shadow_errors: int = 0
    latency: tuple[int, ...] = field(default=_NO_LATENCY, repr=False)  # histogram counts

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def slower_than(self, ms: float) -> int:
        """Requests certainly slower than `ms`: those in buckets whose lower edge is >= ms.

        Exact when `ms` is a bucket edge; otherwise `ms` is in effect rounded up to the
        next edge, so a breach is never claimed on requests that may have been faster.
        """
        first = bisect.bisect_left(UPPER_MS, ms) + 1  # buckets from here start at >= ms
        return sum(self.latency[first:])


def quantile_ms(latency: tuple[int, ...], q: float) -> float | None:
    """The q-quantile of a latency histogram, interpolated geometrically in its bucket."""
    total = sum(latency)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(latency):
        if count and seen + count >= rank:
            if i >= len(UPPER_MS):
                return UPPER_MS[-1]  # beyond the last edge: report the edge
            hi = UPPER_MS[i]
            lo = UPPER_MS[i - 1] if i else hi
            return lo * (hi / lo) ** ((rank - seen) / count)
        seen += count
    return UPPER_MS[-1]


def latency_bucket(seconds: float) -> int:
    """Index of the histogram bucket for a latency in seconds (NaN counts as fast)."""
    return bisect.bisect_left(UPPER_MS, seconds * 1000.0)


class Window:
    """A sliding window of one version's outcomes, in ring buckets of `resolution` s.

    The window is the last ceil(window / resolution) buckets, the current
    (partial) one included. Running totals make `stats` O(1) in the window
    length; a bucket is subtracted from them when time moves past it.
    """

    __slots__ = ("size", "resolution", "_head", "_cnt", "_lat", "_lat_n", "_tot")

    def __init__(self, window: float = 30.0, resolution: float = 1.0) -> None:
        if not window > 0 or not resolution > 0:
            raise ValueError("window and resolution must be > 0")
        self.size = max(1, math.ceil(window / resolution - 1e-9))
        self.resolution = resolution
        self._head: int | None = None  # the newest bucket's absolute index
        # per bucket: requests, errors, shadow requests, shadow errors
        self._cnt = [0] * (4 * self.size)
        self._lat = [0] * (LATENCY_BUCKETS * self.size)  # per bucket: latency histogram
        self._lat_n = [0] * self.size  # latencies per bucket, to skip empty ones on expiry
        # running totals over the window: the four counts, latencies, then the histogram
        self._tot = [0] * (5 + LATENCY_BUCKETS)

    def record(
        self, now: float, status: int, seconds: float, error: bool, shadow: bool = False
    ) -> None:
        """One outcome. `error` flags a proxy-made failure; status >= 500 is one anyway."""
        slot = self._slot(now)
        if slot < 0:
            return
        bad = error or status >= 500
        cnt, tot, base = self._cnt, self._tot, 4 * slot
        cnt[base] += 1
        tot[0] += 1
        if bad:
            cnt[base + 1] += 1
            tot[1] += 1
        if shadow:
            cnt[base + 2] += 1
            tot[2] += 1
            if bad:
                cnt[base + 3] += 1
                tot[3] += 1
        j = latency_bucket(seconds)
        self._lat[slot * LATENCY_BUCKETS + j] += 1
        self._lat_n[slot] += 1
        tot[4] += 1
        tot[5 + j] += 1

    def record_counts(self, now: float, requests: int, errors: int, shadow: bool = False) -> None:
        """Many outcomes at once, without latencies (simulations, aggregated sources)."""
        slot = self._slot(now)
        if slot < 0:
            return
        cnt, tot, base = self._cnt, self._tot, 4 * slot
        cnt[base] += requests
        cnt[base + 1] += errors
        tot[0] += requests
        tot[1] += errors
        if shadow:
            cnt[base + 2] += requests
            cnt[base + 3] += errors
            tot[2] += requests
            tot[3] += errors

    def record_latencies(self, now: float, counts: list[int]) -> None:
        """Add a latency histogram (indexed like `UPPER_MS`, plus overflow) to `now`'s bucket."""
        slot = self._slot(now)
        if slot < 0:
            return
        lat, tot, base = self._lat, self._tot, slot * LATENCY_BUCKETS
        n = 0
        for j, c in enumerate(counts):
            if c:
                lat[base + j] += c
                tot[5 + j] += c
                n += c
        self._lat_n[slot] += n
        tot[4] += n

    def dump(self) -> dict[str, Any]:
        """The window as plain JSON, for a process that takes over (see `restored`)."""
        return {
            "size": self.size, "resolution": self.resolution, "head": self._head,
            "cnt": self._cnt, "lat": self._lat, "lat_n": self._lat_n, "tot": self._tot,
        }  # fmt: skip

    @classmethod
    def restored(cls, d: dict[str, Any], window: float) -> Window | None:
        """A window from `dump()` output; None when it has another shape than `window` asks."""
        w = cls(window)
        try:
            if (d["size"], d["resolution"]) != (w.size, w.resolution):
                return None
            parts = [list(map(int, d[k])) for k in ("cnt", "lat", "lat_n", "tot")]
            head = d["head"] if d["head"] is None else int(d["head"])
        except (KeyError, TypeError, ValueError):
            return None
        if [len(p) for p in parts] != [len(w._cnt), len(w._lat), len(w._lat_n), len(w._tot)]:
            return None
        w._cnt, w._lat, w._lat_n, w._tot = parts
        w._head = head
        return w

    def stats(self, now: float) -> Stats:
        """Totals over the window ending at `now`."""
        self._advance(int(now // self.resolution))
        t = self._tot
        if not t[4]:
            return Stats(t[0], t[1], None, t[2], t[3])
        latency = tuple(t[5:])
        return Stats(t[0], t[1], quantile_ms(latency, 0.99), t[2], t[3], latency)

    def _slot(self, now: float) -> int:
        """The ring index for `now`, advancing the window; -1 if `now` is too old."""
        tick = int(now // self.resolution)
        head = self._head
        if head is None or tick > head:
            self._advance(tick)
        elif tick <= head - self.size:
            return -1
        return tick % self.size

    def _advance(self, tick: int) -> None:
        head = self._head
        if head is None:
            self._head = tick
            return
        if tick <= head:
            return
        for t in range(head + 1, min(tick, head + self.size) + 1):
            self._expire(t % self.size)
        self._head = tick

    def _expire(self, slot: int) -> None:
        cnt, tot, base = self._cnt, self._tot, 4 * slot
        tot[0] -= cnt[base]
        tot[1] -= cnt[base + 1]
        tot[2] -= cnt[base + 2]
        tot[3] -= cnt[base + 3]
        cnt[base : base + 4] = _ZEROS
        if self._lat_n[slot]:
            tot[4] -= self._lat_n[slot]
            self._lat_n[slot] = 0
            lat, base = self._lat, slot * LATENCY_BUCKETS
            for j in range(LATENCY_BUCKETS):
                if lat[base + j]:
                    tot[5 + j] -= lat[base + j]
                    lat[base + j] = 0


# --- exact tail probabilities ------------------------------------------------------


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


_RTOL = 1e-12  # stop summing once a term adds less than this, relative to the sum


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact; sums from k away from the mode."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    upper = k > n * p
    j = k if upper else k - 1  # the lower side gives 1 - P(X <= k - 1)
    term = math.exp(_log_comb(n, j) + j * math.log(p) + (n - j) * math.log1p(-p))
    total, odds = term, p / (1.0 - p)
    if upper:
        while j < n and term > total * _RTOL:
            term *= (n - j) / (j + 1) * odds
            total += term
            j += 1
        return min(1.0, total)
    while j > 0 and term > total * _RTOL:
        term *= j / ((n - j + 1) * odds)
        total += term
        j -= 1
    return max(0.0, 1.0 - total)


def hypergeometric_sf(k: int, total: int, marked: int, drawn: int) -> float:
    """P(X >= k) drawing `drawn` of `total` items of which `marked` are marked, exact."""
    lo, hi = max(0, drawn + marked - total), min(drawn, marked)
    if k <= lo:
        return 1.0
    if k > hi:
        return 0.0
    rest = total - marked
    upper = k > drawn * marked / total
    j = k if upper else k - 1  # the lower side gives 1 - P(X <= k - 1)
    log_pmf = _log_comb(marked, j) + _log_comb(rest, drawn - j) - _log_comb(total, drawn)
    term = acc = math.exp(log_pmf)
    if upper:
        while j < hi and term > acc * _RTOL:
            term *= (marked - j) * (drawn - j) / ((j + 1) * (rest - drawn + j + 1))
            acc += term
            j += 1
        return min(1.0, acc)
    while j > lo and term > acc * _RTOL:
        term *= j * (rest - drawn + j) / ((marked - j + 1) * (drawn - j + 1))
        acc += term
        j -= 1
    return max(0.0, 1.0 - acc)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p, by bisection."""
    if k <= 0:
        return 0.0
    lo, hi = 0.0, k / n
    for _ in range(40):
        mid = (lo + hi) / 2
        if binomial_sf(k, n, mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo


# --- the verdict ---------------------------------------------------------------------

# the policy's other fields go into the evidence
_NOT_EVIDENCE = ("webhook", "on_breach", "source", "prometheus")


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str  # healthy | breach | inconclusive
    reasons: tuple[str, ...]  # error_rate | p99 | relative, in that order
    evidence: dict[str, Any]  # JSON-serializable: counts, rates, tests, thresholds


def verdict(canary: Stats, stable: Stats, policy: Policy) -> Verdict:
    """The canary's state over the window both `Stats` cover (PRODUCT.md §6)."""
    evidence: dict[str, Any] = {
        "canary": _describe(canary),
        "stable": _describe(stable),
        "thresholds": dict(thresholds(policy)),
    }
    if canary.requests < policy.min_requests:
        evidence["tests"] = {}
        return Verdict(INCONCLUSIVE, (), evidence)
    tests: dict[str, dict[str, Any]] = {"error_rate": _error_rate_test(canary, policy)}
    if policy.max_p99_ms is not None:
        tests["p99"] = _p99_test(canary, policy.max_p99_ms, policy.alpha)
    if policy.relative_to_stable:
        tests["relative"] = _relative_test(canary, stable, policy)
    evidence["tests"] = tests
    reasons = tuple(name for name, test in tests.items() if test["breach"])
    return Verdict(BREACH if reasons else HEALTHY, reasons, evidence)


@functools.lru_cache(maxsize=32)
def thresholds(policy: Policy) -> dict[str, Any]:
    """The policy's fields that the evidence records: all but `webhook` and `on_breach`."""
    return {f.name: getattr(policy, f.name) for f in fields(policy) if f.name not in _NOT_EVIDENCE}


def evaluate(canary: Window, stable: Window, policy: Policy, now: float) -> Verdict:
    """The controller's call: both windows' stats at `now`, then `verdict`."""
    return verdict(canary.stats(now), stable.stats(now), policy)


def _describe(s: Stats) -> dict[str, Any]:
    return {
        "requests": s.requests,
        "errors": s.errors,
        "error_rate": s.error_rate,
        "shadow_requests": s.shadow_requests,
        "shadow_errors": s.shadow_errors,
        "p99_ms": None if s.p99_ms is None else round(s.p99_ms, 3),
    }


def _error_rate_test(c: Stats, policy: Policy) -> dict[str, Any]:
    """H0: canary error rate <= max_error_rate; exact one-sided binomial test."""
    test: dict[str, Any] = {"test": "binomial_exact_one_sided", "statistic": c.errors}
    p0 = policy.max_error_rate
    if c.errors <= c.requests * p0:  # not even the point estimate is above the limit
        return test | {"p_value": None, "lower_bound": None, "breach": False}
    p_value = binomial_sf(c.errors, c.requests, p0)
    breach = p_value < policy.alpha
    # The bound is for the record; it is only worth its bisection on a breach.
    lower = clopper_pearson_lower(c.errors, c.requests, policy.alpha) if breach else None
    return test | {
        "p_value": p_value,
        "lower_bound": None if lower is None else round(lower, 6),  # one-sided, 1 - alpha
        "breach": breach,
    }


def _p99_test(c: Stats, max_p99_ms: float, alpha: float) -> dict[str, Any]:
    """H0: at most 1% of requests are slower than max_p99_ms (i.e. p99 <= max_p99_ms)."""
    measured = sum(c.latency)
    slow = c.slower_than(max_p99_ms)
    test: dict[str, Any] = {"test": "binomial_exact_one_sided_on_slow_share"}
    p99 = None if c.p99_ms is None else round(c.p99_ms, 3)
    test |= {"statistic": slow, "measured": measured, "p99_ms": p99}
    if slow <= measured * P99_SLOW_SHARE:
        return test | {"p_value": None, "breach": False}
    p_value = binomial_sf(slow, measured, P99_SLOW_SHARE)
    return test | {"p_value": p_value, "breach": p_value < alpha}


def material(rate_c: float, rate_s: float, policy: Policy) -> bool:
    """Whether the canary's error rate is materially above stable's: at least
    `relative_min_ratio` times it and `relative_min_difference` above it."""
    return (
        rate_c >= policy.relative_min_ratio * rate_s
        and rate_c - rate_s >= policy.relative_min_difference
    )


def _relative_test(c: Stats, s: Stats, policy: Policy) -> dict[str, Any]:
    """H0: same error rate; one-sided Fisher exact test, conditional on the total errors."""
    test: dict[str, Any] = {"test": "fisher_exact_one_sided", "statistic": c.errors}
    if not s.requests:
        return test | {"p_value": None, "material": False, "breach": False}
    rate_c, rate_s = c.error_rate, s.error_rate
    is_material = material(rate_c, rate_s, policy)
    total, errors = c.requests + s.requests, c.errors + s.errors
    test |= {
        "expected": round(errors * c.requests / total, 3),  # canary errors under H0
        "rate_ratio": round(rate_c / rate_s, 4) if rate_s else None,
        "difference": round(rate_c - rate_s, 6),
        "material": is_material,
    }
    if not is_material:
        return test | {"p_value": None, "breach": False}
    p_value = hypergeometric_sf(c.errors, total, errors, c.requests)
    return test | {"p_value": p_value, "breach": p_value < policy.alpha}
