"""The guard against Flagger, Argo Rollouts and a Kayenta-style judge, on identical traffic.

    python -m bench.guard_compare                 # the full grid, 200 runs per cell
    python -m bench.guard_compare --quick         # a small subset, 40 runs per cell
    python -m bench.guard_compare --json out.json --cells

Traffic. A run is 600 simulated seconds at 1 s ticks. Each second the canary
gets Poisson(R*w) requests and stable Poisson(R*(1-w)), each failing
independently with its version's error rate, drawn by Poisson thinning with
`bench.guard_sim.poisson` as in bench/guard_sim.py. Grid: baseline error rate
p in {0.1%, 1%, 2%}, total rate R in {10, 100, 1000} req/s, canary weight w in
{1%, 10%, 50%}, and a canary that is healthy (p), 5x worse (5p) or at 50%
errors from the fault onset (t = 0 or t = 60 s; before it the canary runs at
p). Every rule judges the same counts of the same run. Once both Turnout rules
have rolled back, nothing looks at single seconds any more, so the rest of the
run is drawn a minute (or the part of one) at a time: the sum of independent
Poisson counts is one Poisson count, so the minutes the other rules read have
the same law either way, and the run costs far less.

The rules, and what was taken from each project's source (read, not copied):

- **Turnout**, as `Controller.tick` and `Controller.judge` (proxy/controller.py)
  do each second: one real `proxy.guard.Window` per version fed that second's
  counts at now = t + 0.5, the real `verdict` on both windows' `Stats`, and a
  real `proxy.sequential.Cumulative` updated with each version's `Outcomes`.
  "Turnout" rolls back at the first second the window is in breach or
  `Cumulative.breaches()` is not empty; "Turnout, window only" uses the window
  verdict alone (the guard before the cumulative tests). Policy: the defaults
  (30 s window, min_requests 50, max_error_rate 2%, relative to stable). The
  verdict is skipped only when it cannot be a breach: fewer than min_requests
  canary requests, or a canary rate neither above the budget nor materially
  above stable's, the two cases in which proxy/guard.py's tests return no breach
  without computing a p-value.
- **Flagger**, `analysis: {interval: 1m, threshold: 5}` with the builtin
  `request-success-rate` metric, `thresholdRange.min: 99`. From
  fluxcd/flagger pkg/controller/scheduler.go (commit 15bd6ad5): each interval,
  `advanceCanary` first rolls back when `Status.FailedChecks >=
  GetAnalysisThreshold()`, and only then runs the checks; a failed check sets
  `FailedChecks+1`. Nothing resets the count after a check that passes: it is
  zeroed only when the analysis restarts (a new revision, `FailedChecks: 0` in
  the status sync). So failed checks are counted cumulatively over the
  analysis, and the rollback comes one interval after the threshold-th failure.
  From pkg/controller/scheduler_metrics.go (`runBuiltinMetricChecks`): a query
  with no values (`providers.ErrNoValuesFound`, a canary with no requests) halts
  advancement and is a failed check; a success rate (100 x non-5xx / total over
  the last minute) below `thresholdRange.min` is a failed check. Flagger's
  first iteration, which runs the pre-rollout hooks at weight 0, is not
  modelled: the canary has its weight from t = 0 and the checks run at the end
  of each minute, so a rollback can come at 6 min at the earliest.
- **Argo Rollouts**, an AnalysisTemplate metric with `interval: 1m`,
  `successCondition: result[0] >= 0.95` on the last minute's success ratio and
  `failureLimit: 3`. From argoproj/argo-rollouts (commit 9f8d111d):
  utils/evaluate/evaluate.go (`EvaluateResult`): with only a success condition,
  a measurement is Failed when the condition is false, and NaN >= 0.95 is false,
  so a 0/0 ratio (no canary requests) fails; it can never be Inconclusive.
  analysis/analysis.go (`assessMetricFailureInconclusiveOrError`): the metric
  fails when `result.Failed > failureLimit`, strictly greater, so at the 4th
  failed measurement; `Failed` only ever grows (`metricResult.Failed++`), and
  `consecutiveSuccessLimit` is only applied when set (it is not here). The
  measurements are taken at the end of each minute (as with `initialDelay: 1m`,
  so that each one covers a full minute of canary traffic).
- **Kayenta-style judge**: from minute 5 on, at the end of each minute, the
  per-minute error rates of canary (experiment) and stable (control) over all
  complete minutes so far (stable stands for Kayenta's baseline cluster) go
  through the classifier of spinnaker/kayenta (commit a69573be). From
  kayenta-judge/.../judge/NetflixACAJudge.scala: the classifier is
  `MannWhitneyClassifier(tolerance = 0.25, confLevel = 0.98)`,
  with the `meanRatio` effect size and `allowedIncrease` 1.0 by default, and
  NaN values replaced by 0.0 (nanStrategy "none"). From
  .../classifiers/metric/MannWhitneyClassifier.scala: identical samples, or a
  single distinct value over both, Pass; both samples constant get Gaussian
  noise of sd 1e-5 x their value; the metric is High when the lower end of the
  confidence interval on the location shift exceeds tolerance x |estimate| and
  the mean ratio (canary mean / baseline mean) is >= allowedIncrease, or
  cannot be computed (a zero mean). From kayenta-mannwhitney/.../MannWhitney.scala:
  the interval is the asymptotic one R's wilcox.test computes (roots, in the
  shift mu, of the normal approximation of the rank-sum statistic of x - mu
  against y, with the continuity correction 0.5 sign(dz) and the tie
  correction of the variance, at z = +/-2.326 for 98%). The statistic is a
  step function of mu with jumps at the pairwise differences x_i - y_j, so each
  root here is the exact jump where it changes sign (Kayenta's Brent solver
  stops within 1e-4 of it). The estimate is the Hodges-Lehmann median of the
  pairwise differences, which is where that statistic at z = 0 changes sign
  (Kayenta's solver lands in the same flat stretch). scipy is not used. With one
  metric, High scores 0 (kayenta-judge/.../scorers/WeightedSumScorer.scala), so
  the canary fails at once; a classification error counts as no data (pass).

Times are from the fault onset to the rollback; a rollback at or before the
onset of a faulty canary is reported apart and is not a detection. "Failed
requests" are the errors the canary served from the onset until the rollback
(or the end of the run). The seeds are derived from `--seed` and the cell, so a
cell's runs do not depend on the other cells or on `--jobs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.guard_sim import poisson
from proxy.guard import BREACH, Policy, Stats, Window, material, verdict
from proxy.sequential import Cumulative, Outcomes

DURATION = 600  # simulated seconds per run, as in bench/guard_sim.py
MINUTE = 60  # the anchors' analysis interval
BASELINES = (0.001, 0.01, 0.02)
RATES = (10.0, 100.0, 1000.0)
WEIGHTS = (0.01, 0.10, 0.50)
FAULTS = ("healthy", "5x", "50%")
ONSETS = (0, 60)
RUNS = 200
SEED = 20240611
POLICY = Policy()  # the defaults, as a guard: section without keys gets them

TURNOUT, WINDOW = "turnout", "turnout_window"
FLAGGER, ARGO, KAYENTA = "flagger", "argo", "kayenta"
RULES = (TURNOUT, WINDOW, FLAGGER, ARGO, KAYENTA)
ANCHORS = (FLAGGER, ARGO, KAYENTA)
LABELS = {
    TURNOUT: "Turnout (both speeds: 30 s window + cumulative tests)",
    WINDOW: "Turnout, window only (30 s window, min_requests 50, budget 2%)",
    FLAGGER: "Flagger (interval 1m, threshold 5; success rate ≥ 99%)",
    ARGO: "Argo Rollouts (interval 1m, failureLimit 3, ≥ 95%)",
    KAYENTA: "Kayenta-style Mann-Whitney judge, each minute from minute 5",
}
SHORT = {TURNOUT: "Turnout", WINDOW: "window", FLAGGER: "Flagger", ARGO: "Argo",
         KAYENTA: "Kayenta"}  # fmt: skip

# Flagger and Argo settings, as in the manifests the docstring quotes
FLAGGER_THRESHOLD, FLAGGER_MIN_SUCCESS = 5, 99.0
ARGO_FAILURE_LIMIT, ARGO_MIN_RATIO = 3, 0.95
# NetflixACAJudge's classifier settings
KAYENTA_FIRST_MINUTE, KAYENTA_CONFIDENCE, KAYENTA_TOLERANCE = 5, 0.98, 0.25
KAYENTA_ALLOWED_INCREASE = 1.0
KAYENTA_NOISE = 1e-5  # sd of the noise added to constant samples, relative to their value


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One point of the grid: the traffic and the canary's condition."""

    baseline: float  # stable's error rate, and the canary's before the onset
    rate: float  # R, requests per second to both versions
    weight: float  # w, the canary's share
    fault: str  # healthy | 5x | 50%
    onset: int = 0  # second the canary's fault starts (0 for a healthy canary)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")
        if not 0 <= self.onset < DURATION:
            raise ValueError(f"onset must be in [0, {DURATION}), got {self.onset}")

    @property
    def canary_rps(self) -> float:
        return round(self.rate * self.weight, 6)

    @property
    def p_canary(self) -> float:
        """The canary's error rate from the onset on."""
        if self.fault == "5x":
            return 5.0 * self.baseline
        return 0.5 if self.fault == "50%" else self.baseline

    @property
    def key(self) -> str:
        return f"{self.baseline:g}|{self.rate:g}|{self.weight:g}|{self.fault}|{self.onset}"

    def doc(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline, "rate": self.rate, "weight": self.weight,
            "canary_rps": self.canary_rps, "fault": self.fault, "onset": self.onset,
        }  # fmt: skip


def grid(quick: bool = False) -> list[Cell]:
    """The full grid (a healthy canary once, since its onset changes nothing), or a subset."""
    baselines, rates, weights, onsets = BASELINES, RATES, WEIGHTS, ONSETS
    if quick:
        baselines, rates, weights, onsets = (0.01, 0.02), (100.0,), (0.01, 0.50), (0,)
    cells = []
    for p in baselines:
        for r in rates:
            for w in weights:
                cells.append(Cell(p, r, w, "healthy", 0))
                for fault in FAULTS[1:]:
                    cells.extend(Cell(p, r, w, fault, onset) for onset in onsets)
    return cells


@dataclass(slots=True)
class Outcome:
    """What one rule did in one run."""

    at: int | None  # seconds of traffic when it rolled back, None if it never did
    errors: int  # canary errors served from the onset until then (or the end)
    speed: str | None = None  # Turnout: which speed fired, window or cumulative


@dataclass(slots=True)
class Minutes:
    """Per-minute counts of one run, what the anchors' queries see."""

    canary: list[int]
    canary_errors: list[int]
    stable: list[int]
    stable_errors: list[int]
    after_onset: list[int]  # canary errors in the minute at or after the onset

    def errors_until(self, at: int | None) -> int:
        """Canary errors from the onset until a rollback at `at` (a minute's end) or the end."""
        return sum(self.after_onset if at is None else self.after_onset[: at // MINUTE])


def _may_breach(c: Stats, s: Stats, policy: Policy) -> bool:
    """False only when `verdict` certainly is no breach: proxy/guard.py returns one from
    none of its tests without a p-value in exactly these cases (latency is not simulated)."""
    if c.requests < policy.min_requests:
        return False  # inconclusive
    if c.errors > c.requests * policy.max_error_rate:
        return True  # the budget test computes a p-value
    if not policy.relative_to_stable or not s.requests:
        return False
    return material(c.error_rate, s.error_rate, policy)


def run_once(
    rng: random.Random, cell: Cell, policy: Policy = POLICY, noise: random.Random | None = None
) -> dict[str, Outcome]:
    """One run of `cell`: every rule's decision on the same simulated traffic."""
    if policy.max_p99_ms is not None:
        raise ValueError("the simulation has no latencies: max_p99_ms must be unset")
    minutes = DURATION // MINUTE
    m = Minutes([0] * minutes, [0] * minutes, [0] * minutes, [0] * minutes, [0] * minutes)
    lam_c, lam_s = cell.rate * cell.weight, cell.rate * (1.0 - cell.weight)
    p, onset = cell.baseline, cell.onset
    se, so = lam_s * p, lam_s * (1.0 - p)
    canary, stable = Window(policy.window), Window(policy.window)
    cumulative = Cumulative(policy)
    window_at = cumulative_at = None
    window_errors = cumulative_errors = 0
    served = 0  # canary errors since the onset
    t = 0
    # Second by second while a Turnout rule can still act: the window verdict until its
    # first breach (after which both Turnout rules have rolled back), the cumulative tests
    # until the first breach of either speed (the "both speeds" rule has acted then).
    while t < DURATION and window_at is None:
        p_c = cell.p_canary if t >= onset else p
        errors = poisson(rng, lam_c * p_c)
        requests = errors + poisson(rng, lam_c * (1.0 - p_c))
        s_errors = poisson(rng, se)
        s_requests = s_errors + poisson(rng, so)
        k = t // MINUTE
        m.canary[k] += requests
        m.canary_errors[k] += errors
        m.stable[k] += s_requests
        m.stable_errors[k] += s_errors
        if t >= onset:
            m.after_onset[k] += errors
            served += errors
        now = t + 0.5
        canary.record_counts(now, requests, errors)
        stable.record_counts(now, s_requests, s_errors)
        c_stats, s_stats = canary.stats(now), stable.stats(now)
        t += 1
        may = _may_breach(c_stats, s_stats, policy)
        if may and verdict(c_stats, s_stats, policy).state == BREACH:
            window_at, window_errors = t, served
            break
        if cumulative_at is None:
            cumulative.update(Outcomes(requests, errors), Outcomes(s_requests, s_errors))
            if cumulative.breaches():
                cumulative_at, cumulative_errors = t, served
    # The rest of the run in bulk: spans of constant rates, cut at minute ends and the onset.
    while t < DURATION:
        end = min((t // MINUTE + 1) * MINUTE, DURATION)
        if t < onset < end:
            end = onset
        span = end - t
        p_c = cell.p_canary if t >= onset else p
        errors = poisson(rng, lam_c * p_c * span)
        k = t // MINUTE
        m.canary[k] += errors + poisson(rng, lam_c * (1.0 - p_c) * span)
        m.canary_errors[k] += errors
        s_errors = poisson(rng, se * span)
        m.stable[k] += s_errors + poisson(rng, so * span)
        m.stable_errors[k] += s_errors
        if t >= onset:
            m.after_onset[k] += errors
            served += errors
        t = end
    if window_at is None:
        window_errors = served
    out = {WINDOW: Outcome(window_at, window_errors)}
    if cumulative_at is not None and (window_at is None or cumulative_at < window_at):
        out[TURNOUT] = Outcome(cumulative_at, cumulative_errors, "cumulative")
    else:
        out[TURNOUT] = Outcome(window_at, window_errors, "window" if window_at else None)
    for name, rule in ((FLAGGER, flagger), (ARGO, argo)):
        at = rule(m.canary, m.canary_errors)
        out[name] = Outcome(at, m.errors_until(at))
    at = kayenta(m, noise if noise is not None else random.Random(0))
    out[KAYENTA] = Outcome(at, m.errors_until(at))
    return out


# --- the anchors -------------------------------------------------------------------------


def flagger(
    requests: Sequence[int],
    errors: Sequence[int],
    threshold: int = FLAGGER_THRESHOLD,
    min_success: float = FLAGGER_MIN_SUCCESS,
) -> int | None:
    """Flagger's analysis over per-minute canary counts: the second it rolls back, or None.

    At each interval's end the threshold is checked first (a rollback once the failed
    checks have reached it), then the minute just ended: no requests (no value from the
    query) or a success rate under `min_success` percent is one more failed check. Failed
    checks are never reset by a passing one.
    """
    failed = 0
    for k, (n, e) in enumerate(zip(requests, errors, strict=True), start=1):
        if failed >= threshold:
            return k * MINUTE
        if n == 0 or 100.0 * (n - e) / n < min_success:
            failed += 1
    return None


def argo(
    requests: Sequence[int],
    errors: Sequence[int],
    failure_limit: int = ARGO_FAILURE_LIMIT,
    min_ratio: float = ARGO_MIN_RATIO,
) -> int | None:
    """Argo Rollouts' analysis run over per-minute canary counts: the second it fails, or None.

    One measurement per minute, the success ratio; 0/0 is NaN, which fails `>= min_ratio`.
    The run fails as soon as the failed measurements exceed `failure_limit`.
    """
    failed = 0
    for k, (n, e) in enumerate(zip(requests, errors, strict=True), start=1):
        ratio = (n - e) / n if n else math.nan
        if not ratio >= min_ratio:
            failed += 1
            if failed > failure_limit:
                return k * MINUTE
    return None


def kayenta(m: Minutes, noise: random.Random, first: int = KAYENTA_FIRST_MINUTE) -> int | None:
    """The Kayenta-style judge, at each minute's end from minute `first` on, over all
    complete minutes: the second the error rate is classified High, or None."""
    canary = [e / n if n else 0.0 for n, e in zip(m.canary, m.canary_errors, strict=True)]
    stable = [e / n if n else 0.0 for n, e in zip(m.stable, m.stable_errors, strict=True)]
    for k in range(first, len(canary) + 1):
        if classify_high(canary[:k], stable[:k], noise):
            return k * MINUTE
    return None


def _average_ranks(values: Sequence[float]) -> tuple[list[float], float]:
    """Ranks from 1 with ties at their average, and the sum of t^3 - t over tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    return ranks, ties


def wilcoxon_diff(mu: float, quantile: float, x: Sequence[float], y: Sequence[float]) -> float:
    """The normal approximation of the rank-sum statistic of x - mu against y, with the
    continuity and tie corrections, minus `quantile`: the function whose roots in mu are
    the interval's ends (and, at quantile 0, the estimate)."""
    n, m = len(x), len(y)
    ranks, ties = _average_ranks([v - mu for v in x] + list(y))
    dz = sum(ranks[:n]) - n * (n + 1) / 2 - n * m / 2
    correction = math.copysign(0.5, dz) if dz else 0.0
    sigma = math.sqrt(n * m / 12 * ((n + m + 1) - ties / ((n + m) * (n + m - 1))))
    if sigma == 0:
        raise ValueError("cannot compute the interval when all observations are tied")
    return (dz - correction) / sigma - quantile


def _tie_sum(values: Iterable[float]) -> float:
    return float(sum(t**3 - t for t in Counter(values).values()))


def mann_whitney_interval(
    x: Sequence[float], y: Sequence[float], confidence: float = KAYENTA_CONFIDENCE
) -> tuple[float, float, float]:
    """(lower, upper, estimate) of the shift of x against y, as Kayenta's MannWhitney computes
    them: the asymptotic two-sided interval and the Hodges-Lehmann estimate."""
    n, m = len(x), len(y)
    diffs = sorted(a - b for a in x for b in y)
    jumps = sorted(set(diffs))
    # Between two consecutive jumps no x - mu ties a y, so the statistic is constant there:
    # the count of differences above mu, and the within-sample ties in the variance.
    ties = _tie_sum(x) + _tie_sum(y)
    sigma = math.sqrt(n * m / 12 * ((n + m + 1) - ties / ((n + m) * (n + m - 1))))
    above = []  # per gap after jumps[i]: differences above it
    seen = 0
    counts = Counter(diffs)
    for d in jumps[:-1]:
        seen += counts[d]
        above.append(n * m - seen)
    mu_min, mu_max = min(x) - max(y), max(x) - min(y)

    def root(quantile: float) -> float:
        if wilcoxon_diff(mu_min, quantile, x, y) <= 0:
            return mu_min
        if wilcoxon_diff(mu_max, quantile, x, y) >= 0:
            return mu_max
        for i, u in enumerate(above):
            dz = u - n * m / 2
            correction = math.copysign(0.5, dz) if dz else 0.0
            gap = (dz - correction) / sigma - quantile
            if gap < 0:
                return jumps[i]  # the sign changes at this jump
            if gap == 0:
                return (jumps[i] + jumps[i + 1]) / 2  # zero over the whole gap
        return mu_max

    z = statistics.NormalDist().inv_cdf((1.0 - confidence) / 2)  # negative
    return root(-z), root(z), statistics.median(diffs)


def classify_high(
    canary: Sequence[float],
    baseline: Sequence[float],
    noise: random.Random,
    tolerance: float = KAYENTA_TOLERANCE,
    confidence: float = KAYENTA_CONFIDENCE,
    allowed_increase: float = KAYENTA_ALLOWED_INCREASE,
) -> bool:
    """MannWhitneyClassifier's High for a metric whose direction is "increase"."""
    if not canary or not baseline:
        return False  # no data
    if sorted(canary) == sorted(baseline) or len(set(canary) | set(baseline)) == 1:
        return False  # identical: pass
    x, y = list(canary), list(baseline)
    if len(set(x)) == 1 and len(set(y)) == 1:  # both constant: break the ties with noise
        x = [v + noise.gauss(0.0, x[0] * KAYENTA_NOISE) for v in x]
        y = [v + noise.gauss(0.0, y[0] * KAYENTA_NOISE) for v in y]
    try:
        lower, _, estimate = mann_whitney_interval(x, y, confidence)
    except ValueError:
        return False  # a classification error: scored as no data
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    ratio = math.nan if mean_x == 0 or mean_y == 0 else mean_x / mean_y
    return lower > tolerance * abs(estimate) and (math.isnan(ratio) or ratio >= allowed_increase)


# --- running the grid ------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One rule's runs of one cell, or of a pool of cells."""

    runs: int = 0
    early: int = 0  # rolled back at or before the fault onset
    times: list[int] = field(default_factory=list)  # seconds from the onset, rollbacks after it
    errors: int = 0  # canary errors served from the onset until the rollback, summed
    speeds: Counter = field(default_factory=Counter)

    def add(self, outcome: Outcome, onset: int) -> None:
        self.runs += 1
        self.errors += outcome.errors
        if outcome.at is None:
            return
        if outcome.at > onset:
            self.times.append(outcome.at - onset)
        else:
            self.early += 1
        if outcome.speed:
            self.speeds[outcome.speed] += 1

    def merge(self, other: Tally) -> Tally:
        self.runs += other.runs
        self.early += other.early
        self.times.extend(other.times)
        self.errors += other.errors
        self.speeds.update(other.speeds)
        return self

    @property
    def rolled_back(self) -> float:
        """Share of runs rolled back at any time (a healthy canary: false rollbacks)."""
        return (self.early + len(self.times)) / self.runs if self.runs else math.nan

    @property
    def caught(self) -> float:
        """Share of runs rolled back after the onset (a faulty canary: detections)."""
        return len(self.times) / self.runs if self.runs else math.nan

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def p90(self) -> int | None:
        if not self.times:
            return None
        ordered = sorted(self.times)
        return ordered[math.ceil(0.9 * len(ordered)) - 1]  # nearest rank

    @property
    def failed_requests(self) -> float:
        return self.errors / self.runs if self.runs else math.nan

    def doc(self) -> dict[str, Any]:
        return {
            "runs": self.runs, "rolled_back": self.early + len(self.times),
            "rolled_back_before_onset": self.early, "caught": len(self.times),
            "median_s": self.median, "p90_s": self.p90,
            "failed_requests_mean": self.failed_requests, "speeds": dict(self.speeds),
            "times_s": self.times,
        }  # fmt: skip


Results = dict[Cell, dict[str, Tally]]


def run_cell(cell: Cell, runs: int = RUNS, seed: int = SEED) -> dict[str, Tally]:
    """`runs` seeded runs of one cell; the same cell, runs and seed give the same tallies."""
    rng = random.Random(f"{seed}|{cell.key}")
    noise = random.Random(f"{seed}|{cell.key}|noise")  # apart, so the traffic is the same
    tallies = {rule: Tally() for rule in RULES}
    for _ in range(runs):
        for rule, outcome in run_once(rng, cell, POLICY, noise).items():
            tallies[rule].add(outcome, cell.onset)
    return tallies


def _job(args: tuple[Cell, int, int]) -> tuple[Cell, dict[str, Tally]]:
    cell, runs, seed = args
    return cell, run_cell(cell, runs, seed)


def _cost(cell: Cell) -> float:
    """A rough cost, to start the longest cells first: healthy and quiet canaries run to
    the end second by second."""
    slow = cell.fault == "healthy" or cell.canary_rps < 5 or cell.p_canary < 0.02
    return (2.0 if slow else 1.0) + math.log10(cell.rate)


def compare(cells: Iterable[Cell], runs: int = RUNS, seed: int = SEED, jobs: int = 1) -> Results:
    """Every rule's tallies for every cell, in `jobs` processes (1: in this one)."""
    todo = sorted(cells, key=_cost, reverse=True)
    if jobs <= 1:
        found = [_job((cell, runs, seed)) for cell in todo]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            found = list(pool.imap_unordered(_job, [(c, runs, seed) for c in todo]))
    return dict(sorted(found))


def pool(results: Results, rule: str, **where: Any) -> Tally:
    """One rule's runs pooled over the cells that match `where` (Cell fields or canary_rps)."""
    total = Tally()
    for cell, tallies in results.items():
        if all(getattr(cell, k) == v for k, v in where.items()):
            total.merge(tallies[rule])
    return total


# --- tables ------------------------------------------------------------------------------------


def _pct1(share: float) -> str:
    return _pct(share, 1)


def _pct(share: float, digits: int = 0) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.{digits}f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _values(results: Results, attr: str) -> list[Any]:
    return sorted({getattr(cell, attr) for cell in results})


def headline(results: Results) -> str:
    baselines = _values(results, "baseline")
    names = " / ".join(f"{100 * p:g}" for p in baselines)
    lines = [
        f"| rule | healthy canary rolled back (baseline {names}% errors) "
        "| canary 5× worse: caught, median time | canary at 50% errors: median time |",
        "|---|---|---|---|",
    ]
    for rule in RULES:
        healthy = [pool(results, rule, fault="healthy", baseline=p) for p in baselines]
        false = " / ".join(_pct(t.rolled_back, 1).rstrip("%") for t in healthy) + "%"
        five, half = pool(results, rule, fault="5x"), pool(results, rule, fault="50%")
        lines.append(
            f"| {LABELS[rule]} | {false} | {_pct(five.caught)}, {_secs(five.median)} "
            f"| {_secs(half.median)} ({_pct(half.caught)} caught) |"
        )
    return "\n".join(lines)


def by_baseline(results: Results) -> str:
    """The 5x canary per baseline: at 0.1% it is 0.5% errors, under every fixed threshold."""
    baselines = _values(results, "baseline")
    head = " | ".join(f"baseline {100 * p:g}% (5× = {500 * p:g}%)" for p in baselines)
    lines = [f"| rule | {head} |", "|---|" + "---|" * len(baselines)]
    for rule in RULES:
        cols = [_figure(pool(results, rule, fault="5x", baseline=p)) for p in baselines]
        lines.append(f"| {SHORT[rule]} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def speeds(results: Results) -> str:
    """Which of Turnout's speeds fired first, by canary condition."""
    lines = [
        "| canary | rolled back | by the window | by the cumulative tests |",
        "|---|---:|---:|---:|",
    ]
    for fault in _values(results, "fault"):
        t = pool(results, TURNOUT, fault=fault)
        n = t.early + len(t.times)
        share = {k: v / n if n else math.nan for k, v in t.speeds.items()}
        lines.append(
            f"| {fault} | {n} of {t.runs} | {_pct(share.get('window', 0.0), 1)} "
            f"| {_pct(share.get('cumulative', 0.0), 1)} |"
        )
    return "\n".join(lines)


def _fault_columns(t: Tally) -> str:
    return (
        f"{_pct(t.caught)} | {_secs(t.median)} | {_secs(t.p90)} | {t.failed_requests:.1f}"
        if t.runs
        else "- | - | - | -"
    )


def by_rate(results: Results) -> str:
    """Per rule and canary request rate: false rollbacks, and each fault's detection."""
    lines = [
        "| rule | canary req/s | healthy rolled back | 5×: caught | median | p90 | failed req. "
        "| 50%: caught | median | p90 | failed req. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rates: list[float | None] = [*_values(results, "canary_rps"), None]
    for rule in RULES:
        for rps in rates:
            where = {} if rps is None else {"canary_rps": rps}
            healthy = pool(results, rule, fault="healthy", **where)
            five = pool(results, rule, fault="5x", **where)
            half = pool(results, rule, fault="50%", **where)
            label = "all" if rps is None else f"{rps:g}"
            lines.append(
                f"| {SHORT[rule]} | {label} | {_pct(healthy.rolled_back, 1)} "
                f"| {_fault_columns(five)} | {_fault_columns(half)} |"
            )
    return "\n".join(lines)


def by_cell(results: Results) -> str:
    lines = [
        "| rule | baseline | R | w | canary req/s | canary | onset | rolled back | caught "
        "| median | p90 | failed req. |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rule in RULES:
        for cell, tallies in results.items():
            t = tallies[rule]
            lines.append(
                f"| {SHORT[rule]} | {100 * cell.baseline:g}% | {cell.rate:g} | {cell.weight:g} "
                f"| {cell.canary_rps:g} | {cell.fault} | {cell.onset} | {_pct(t.rolled_back, 1)} "
                f"| {_fault_columns(t)} |"
            )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Match:
    """Turnout against the best anchor in one (canary rate, fault, baseline) cell."""

    canary_rps: float
    fault: str
    baseline: float
    turnout: Tally
    best: dict[str, tuple[str, Tally] | None]  # "all" and "calibrated": the best anchor

    def loses(self, which: str) -> bool:
        best = self.best[which]
        if best is None:
            return False
        t, b = self.turnout, best[1]
        slower = t.median is not None and b.median is not None and t.median > b.median
        return t.caught < b.caught or slower


FALSE_ROLLBACK_LIMIT = 0.01  # an anchor above this on healthy canaries is not detecting
BOUND_ALPHA = 1e-3  # the false-rollback rate the detection bound is computed at


def detection_bound(requests: float, p0: float, p1: float, alpha: float = BOUND_ALPHA) -> float:
    """The most any rule can catch of a canary whose error rate went from p0 to p1, over
    Poisson(`requests`) canary requests since the onset, if it rolls back a canary that
    stayed at p0 with probability at most `alpha`: the power of the Neyman-Pearson test
    of p0 against p1 on those requests, randomized at its edge, knowing both rates.

    Whatever a rule does (look every second, compare with stable, stop early), its
    rollback is an event in the run's data; under both hypotheses everything but the
    canary's outcomes after the onset has the same law, so no event of probability at
    most `alpha` under p0 has more probability under p1 than this test's rejection. The
    request count N has the same law under both, and given N the errors are binomial:
    the likelihood ratio is (p1/p0)^E ((1-p1)/(1-p0))^(N-E).
    """
    sd = math.sqrt(requests)
    low, high = max(0, math.floor(requests - 9 * sd - 5)), math.ceil(requests + 9 * sd + 5)
    a, c = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    points = []  # (log LR, P under p0, P under p1) of every (N, E) worth counting
    for n in range(low, high + 1):
        pn = math.exp(n * math.log(requests) - requests - math.lgamma(n + 1)) if requests else 1.0
        if pn < 1e-15:
            continue
        top = min(n, math.ceil(n * p1 + 9 * math.sqrt(n * p1 + 1) + 5))
        for e in range(top + 1):
            log_choose = math.lgamma(n + 1) - math.lgamma(e + 1) - math.lgamma(n - e + 1)
            q0 = pn * math.exp(log_choose + e * math.log(p0) + (n - e) * math.log1p(-p0))
            q1 = pn * math.exp(log_choose + e * math.log(p1) + (n - e) * math.log1p(-p1))
            points.append((e * a + (n - e) * c + e * 1e-12, q0, q1))
    points.sort(reverse=True)
    spent = power = 0.0
    for _, q0, q1 in points:
        if spent + q0 > alpha:  # the edge: reject with the probability that uses the rest
            return power + (q1 * (alpha - spent) / q0 if q0 > 0 else q1)
        spent += q0
        power += q1
    return power


def _binomial_pmf(t: int, k: int, theta: float) -> float:
    log_choose = math.lgamma(t + 1) - math.lgamma(k + 1) - math.lgamma(t - k + 1)
    return math.exp(log_choose + k * math.log(theta) + (t - k) * math.log1p(-theta))


def conditional_power(cell: Cell, alpha: float = BOUND_ALPHA) -> float:
    """What the best test that compares with stable, not knowing the baseline, catches
    when it looks once at the end of the run and knows when the fault began: the
    uniformly most powerful unbiased test of equal rates, which, given the errors of
    both versions since the onset, rejects when the canary's share of them is too large
    for Binomial(errors, w) (randomized at its edge, at level `alpha`)."""
    seconds = DURATION - cell.onset
    lam_c = cell.rate * cell.weight * cell.p_canary * seconds  # canary errors, on average
    lam_s = cell.rate * (1 - cell.weight) * cell.baseline * seconds
    theta0, theta1 = cell.weight, lam_c / (lam_c + lam_s)
    total = lam_c + lam_s
    power = 0.0
    spread = 9 * math.sqrt(total) + 10
    for t in range(max(1, math.floor(total - spread)), math.ceil(total + spread) + 1):
        pt = math.exp(t * math.log(total) - total - math.lgamma(t + 1))
        spent, reject = 0.0, 0.0  # the rejection region, from the largest canary share down
        # above `top` neither law has mass worth counting
        top = min(t, math.ceil(t * max(theta0, theta1) + 12 * math.sqrt(t / 4) + 10))
        for k in range(top, -1, -1):
            q0 = _binomial_pmf(t, k, theta0)
            q1 = _binomial_pmf(t, k, theta1)
            if spent + q0 > alpha:
                reject += q1 * (alpha - spent) / q0
                break
            spent += q0
            reject += q1
        power += pt * reject
    return power


def bound(m: Match, cells: Iterable[Cell]) -> tuple[float, float]:
    """For a match, pooled over its cells as its figures are: `detection_bound` (an
    upper bound for any rule) and `conditional_power` (what the best test comparing
    with stable at one look would catch)."""
    p1 = 5.0 * m.baseline if m.fault == "5x" else 0.5
    mine = [c for c in cells if (c.canary_rps, c.fault, c.baseline) ==
            (m.canary_rps, m.fault, m.baseline)]  # fmt: skip
    upper = statistics.fmean(
        detection_bound(c.canary_rps * (DURATION - c.onset), c.baseline, p1) for c in mine
    )
    return upper, statistics.fmean(conditional_power(c) for c in mine)


def matches(results: Results) -> list[Match]:
    out = []
    for rps in _values(results, "canary_rps"):
        for baseline in _values(results, "baseline"):
            false = {
                a: pool(results, a, fault="healthy", baseline=baseline, canary_rps=rps).rolled_back
                for a in ANCHORS
            }
            for fault in [f for f in _values(results, "fault") if f != "healthy"]:
                where = {"canary_rps": rps, "fault": fault, "baseline": baseline}
                tallies = {a: pool(results, a, **where) for a in ANCHORS}
                calibrated = [a for a in ANCHORS if false[a] <= FALSE_ROLLBACK_LIMIT]
                best = {"all": _best(tallies, ANCHORS), "calibrated": _best(tallies, calibrated)}
                out.append(Match(rps, fault, baseline, pool(results, TURNOUT, **where), best))
    return out


def _best(tallies: dict[str, Tally], names: Iterable[str]) -> tuple[str, Tally] | None:
    """The anchor that catches most, the faster median breaking a tie."""
    ranked = sorted(
        ((n, tallies[n]) for n in names),
        key=lambda nt: (-nt[1].caught, math.inf if nt[1].median is None else nt[1].median),
    )
    return ranked[0] if ranked else None


def _figure(t: Tally) -> str:
    return f"{_pct(t.caught, 1)}, {_secs(t.median)}"


def _noise(a: Tally, b: Tally) -> str:
    """A note when two detection shares differ by no more than two standard errors."""
    se = math.sqrt(a.caught * (1 - a.caught) / a.runs + b.caught * (1 - b.caught) / b.runs)
    return " (within 2 s.e.)" if abs(a.caught - b.caught) <= 2 * se else ""


def wins(results: Results) -> str:
    """Turnout (both speeds) against the best anchor, per (canary rate, fault, baseline)."""
    found = matches(results)
    lines = [
        "| canary req/s | canary | baseline | Turnout: caught, median | best anchor (a) "
        "| best anchor (b), false rollbacks ≤ 1% |",
        "|---:|---|---:|---|---|---|",
    ]
    for m in found:
        cols = []
        for which in ("all", "calibrated"):
            best = m.best[which]
            mark = " **Turnout loses**" if m.loses(which) else ""
            cols.append("none" if best is None else f"{SHORT[best[0]]} {_figure(best[1])}{mark}")
        lines.append(
            f"| {m.canary_rps:g} | {m.fault} | {100 * m.baseline:g}% | {_figure(m.turnout)} "
            f"| {cols[0]} | {cols[1]} |"
        )
    titles = {
        "all": "(a) over all anchors",
        "calibrated": "(b) over anchors with ≤ 1% false rollbacks at that baseline and canary rate",
    }
    for which, title in titles.items():
        lost = [m for m in found if m.loses(which)]
        lines += ["", f"Cells where Turnout is below the best anchor {title}: {len(lost)}"]
        for m in lost:
            name, b = m.best[which]  # type: ignore[misc]
            lines.append(
                f"- canary {m.canary_rps:g} req/s, {m.fault}, baseline {100 * m.baseline:g}%: "
                f"Turnout {_figure(m.turnout)}; {SHORT[name]} {_figure(b)}"
                + (_noise(m.turnout, b) if m.turnout.caught < b.caught else "")
                + "; at ≤ {:g}% false rollbacks any rule: at most {}, one look comparing "
                "with stable: {}".format(100 * BOUND_ALPHA, *map(_pct1, bound(m, results)))
            )
    return "\n".join(lines)


def report(results: Results) -> str:
    return "\n\n".join(
        [
            "## Headline (pooled over rates, weights, onsets, and baselines for the faults)",
            headline(results),
            "The canary 5× worse, by baseline (caught, median time):",
            by_baseline(results),
            "Which of Turnout's speeds fired first:",
            speeds(results),
            "## By canary request rate (R·w), pooled over baselines and onsets",
            by_rate(results),
            "## Where Turnout wins / loses (pooled over onsets and (R, w) of one canary rate)",
            wins(results),
        ]
    )


def to_json(results: Results, runs: int, seed: int) -> dict[str, Any]:
    return {
        "runs": runs, "seed": seed, "duration_s": DURATION,
        "policy": dataclasses.asdict(POLICY),
        "cells": [
            cell.doc() | {"rules": {r: t.doc() for r, t in tallies.items()}}
            for cell, tallies in results.items()
        ],
        "matches": [
            {
                "canary_rps": m.canary_rps, "fault": m.fault, "baseline": m.baseline,
                "turnout": {"caught": m.turnout.caught, "median_s": m.turnout.median},
                **{
                    f"best_{w}": None if m.best[w] is None else {
                        "rule": m.best[w][0], "caught": m.best[w][1].caught,  # type: ignore[index]
                        "median_s": m.best[w][1].median,  # type: ignore[index]
                    }
                    for w in ("all", "calibrated")
                },
                "loses_all": m.loses("all"), "loses_calibrated": m.loses("calibrated"),
            }
            for m in matches(results)
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.guard_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, help=f"runs per cell ({RUNS}; 40 with --quick)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument("--jobs", type=int, default=2, help="processes")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--cells", action="store_true", help="also print every cell")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (40 if args.quick else RUNS)
    cells = grid(args.quick)
    started, cpu = time.perf_counter(), os.times()
    results = compare(cells, runs, args.seed, args.jobs)
    print(report(results))
    if args.cells:
        print("\n## Every cell\n\n" + by_cell(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(results, runs, args.seed), f, indent=1)
    took, now = time.perf_counter() - started, os.times()
    used = sum(getattr(now, k) - getattr(cpu, k) for k in ("user", "system", "children_user",
                                                               "children_system"))  # fmt: skip
    print(
        f"\n{len(cells)} cells x {runs} runs x {DURATION} s, {args.jobs} process(es): "
        f"{took:.1f} s wall, {used:.1f} s CPU",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
