"""The guard against Flagger, Argo Rollouts and a Kayenta-style judge (bench/guard_compare.py).

A few seeded cells with 60 runs each, asserting the comparison's headline claims
with a margin, and the anchors' rules on hand-made per-minute counts.
"""

from __future__ import annotations

import random
import statistics

import pytest

from bench.guard_compare import (
    ANCHORS,
    ARGO,
    FLAGGER,
    KAYENTA,
    TURNOUT,
    WINDOW,
    Cell,
    _may_breach,
    argo,
    classify_high,
    compare,
    conditional_power,
    detection_bound,
    flagger,
    mann_whitney_interval,
    run_once,
    wilcoxon_diff,
)
from proxy.guard import BREACH, Policy, Stats, verdict

pytestmark = pytest.mark.unit

RUNS = 60
SEED = 7


@pytest.fixture(scope="module")
def healthy() -> dict:
    """Healthy canaries at a 2% baseline (the budget itself) and at 1%."""
    cells = [
        Cell(0.02, 10.0, 0.1, "healthy"),  # 1 canary req/s
        Cell(0.02, 100.0, 0.5, "healthy"),  # 50
        Cell(0.02, 1000.0, 0.2, "healthy"),  # 200
        Cell(0.01, 100.0, 0.5, "healthy"),
    ]
    return compare(cells, RUNS, SEED)


def test_turnout_leaves_healthy_canaries_at_the_budget_alone(healthy: dict) -> None:
    at_budget = [tallies for cell, tallies in healthy.items() if cell.baseline == 0.02]
    for rule in (TURNOUT, WINDOW):
        rolled = sum(t[rule].early + len(t[rule].times) for t in at_budget)
        assert rolled <= 2, f"{rule}: {rolled} of {RUNS * len(at_budget)} healthy canaries"


def test_flagger_rolls_back_healthy_canaries_at_a_one_percent_baseline(healthy: dict) -> None:
    # 1% errors sits right on a 99% success-rate threshold: about half the minutes fail,
    # and failed checks add up over the analysis.
    tallies = healthy[Cell(0.01, 100.0, 0.5, "healthy")]
    assert tallies[FLAGGER].rolled_back >= 0.20
    assert tallies[TURNOUT].rolled_back <= 0.02


def test_a_quiet_canary_at_half_errors_is_caught_by_the_cumulative_tests() -> None:
    # 0.5 canary req/s: 15 requests in a 30 s window, never the 50 the window needs.
    cell = Cell(0.01, 10.0, 0.05, "50%", 0)
    tallies = compare([cell], RUNS, SEED)[cell]
    turnout = tallies[TURNOUT]
    within = sum(t <= 300 for t in turnout.times)
    assert within >= 0.95 * RUNS, f"{within} of {RUNS} caught within 300 s"
    assert turnout.speeds["cumulative"] >= 0.9 * RUNS
    assert tallies[WINDOW].caught <= 0.05


def test_turnout_at_200_canary_rps_is_faster_than_every_anchor() -> None:
    cell = Cell(0.01, 1000.0, 0.2, "5x", 60)
    tallies = compare([cell], RUNS, SEED)[cell]
    turnout = tallies[TURNOUT]
    assert turnout.caught >= 0.98
    assert turnout.median is not None and turnout.median <= 30
    for anchor in ANCHORS:
        other = tallies[anchor]
        assert other.median is None or other.median >= 4 * turnout.median, anchor
        assert other.failed_requests >= 4 * turnout.failed_requests, anchor


def test_a_canary_at_half_errors_behind_200_rps_at_10_percent_is_caught_within_3_s() -> None:
    cell = Cell(0.01, 200.0, 0.1, "50%", 60)
    turnout = compare([cell], RUNS, SEED)[cell][TURNOUT]
    assert turnout.caught == 1.0 and turnout.early == 0
    assert turnout.median is not None and turnout.median <= 3


def test_the_anchors_take_their_intervals_on_a_canary_at_half_errors() -> None:
    # Every minute fails every fixed check, so the times follow from the rules alone:
    # Argo at its 4th failed measurement, Flagger one interval after its 5th failed
    # check, the Kayenta-style judge at its first look (minute 5).
    cell = Cell(0.01, 100.0, 0.1, "50%", 0)
    tallies = compare([cell], RUNS, SEED)[cell]
    assert tallies[ARGO].times == [240] * RUNS
    assert tallies[FLAGGER].times == [360] * RUNS
    assert statistics.median(tallies[KAYENTA].times) == 300
    assert tallies[TURNOUT].median is not None and tallies[TURNOUT].median <= 5


def test_the_same_seed_gives_the_same_tallies() -> None:
    cell = Cell(0.02, 100.0, 0.1, "5x", 60)
    assert compare([cell], 20, SEED) == compare([cell], 20, SEED)
    assert compare([cell], 20, SEED) != compare([cell], 20, SEED + 1)


def test_both_speeds_never_act_later_than_the_window_alone() -> None:
    rng, noise = random.Random(3), random.Random(4)
    cell = Cell(0.01, 100.0, 0.05, "5x", 60)
    for _ in range(30):
        out = run_once(rng, cell, noise=noise)
        both, window = out[TURNOUT].at, out[WINDOW].at
        if window is not None:
            assert both is not None and both <= window
        if both is not None and both != window:
            assert out[TURNOUT].speed == "cumulative"


def test_skipping_the_verdict_never_skips_a_breach() -> None:
    policy, rng = Policy(), random.Random(11)
    for _ in range(20_000):
        n_c, n_s = rng.randint(0, 400), rng.randint(0, 4000)
        c = Stats(n_c, rng.randint(0, n_c) if rng.random() < 0.3 else rng.randint(0, n_c // 20))
        s = Stats(n_s, rng.randint(0, n_s // 20))
        if not _may_breach(c, s, policy):
            assert verdict(c, s, policy).state != BREACH, (c, s)


def test_flagger_counts_failed_checks_without_resetting_them() -> None:
    ok, bad = (1000, 0), (1000, 20)
    minutes = [bad, ok, bad, ok, bad, ok, bad, ok, bad, ok]
    # the 5th failure is minute 9; the threshold is checked at the next interval
    assert flagger([n for n, _ in minutes], [e for _, e in minutes]) == 600
    assert flagger([1000] * 10, [20] * 10) == 360
    assert flagger([0] * 10, [0] * 10) == 360  # no data is a failed check
    assert flagger([100] * 10, [1] * 10) is None  # exactly 99% passes


def test_argo_fails_when_failures_exceed_the_limit() -> None:
    assert argo([100] * 10, [6] * 10) == 240  # the 4th failure > failureLimit 3
    assert argo([100, 100, 0, 100, 100] + [100] * 5, [6, 0, 0, 6, 0] + [0] * 4 + [6]) == 600
    assert argo([100] * 10, [5] * 10) is None  # exactly 95% passes
    assert argo([0] * 10, [0] * 10) == 240  # 0/0 is NaN, which fails


def test_mann_whitney_interval_matches_kayentas_own_case() -> None:
    # kayenta-mannwhitney's MannWhitneySuite: (6, 39) and 22.5 at 95%.
    assert mann_whitney_interval([10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], 0.95) == (
        pytest.approx(6.0),
        pytest.approx(39.0),
        pytest.approx(22.5),
    )


def test_interval_ends_are_where_the_statistic_changes_sign() -> None:
    z = statistics.NormalDist().inv_cdf(0.01)
    rng = random.Random(5)
    for _ in range(300):
        x = [rng.randint(0, 30) / rng.choice([60, 600, 6000]) for _ in range(rng.randint(5, 10))]
        y = [rng.randint(0, 30) / 600 for _ in range(rng.randint(5, 10))]
        if len(set(x) | set(y)) == 1:
            continue
        lower, upper, estimate = mann_whitney_interval(x, y, 0.98)
        assert lower <= estimate <= upper
        for end, q in ((lower, -z), (upper, z)):
            # just left of the root the statistic is above q, just right at or below it
            if end > min(x) - max(y):
                assert wilcoxon_diff(end - 1e-9, q, x, y) > 0
            if end < max(x) - min(y):
                assert wilcoxon_diff(end + 1e-9, q, x, y) <= 0


def test_kayenta_classifies_only_a_clear_increase_as_high() -> None:
    noise = random.Random(1)
    stable = [0.010, 0.012, 0.009, 0.011, 0.010, 0.013]
    assert classify_high([0.05, 0.06, 0.045, 0.055, 0.05, 0.052], stable, noise)
    assert not classify_high(stable, stable, noise)
    assert not classify_high([0.001, 0.002, 0.0, 0.001, 0.002, 0.001], stable, noise)
    assert not classify_high([0.011, 0.010, 0.012, 0.009, 0.013, 0.011], stable, noise)
    # both constant: noise breaks the ties, and a far higher canary is still High
    assert classify_high([0.5] * 5, [0.01] * 5, noise)


def test_the_detection_bounds_are_what_their_tests_catch() -> None:
    # A Poisson(60) count of requests, 2% against 10% at level 1e-3: the Neyman-Pearson
    # test rejects at about 7 errors or more; randomized at its edge it catches about half.
    upper = detection_bound(60.0, 0.02, 0.10)
    assert 0.45 < upper < 0.6
    assert detection_bound(600.0, 0.02, 0.10) > 0.999  # ten times the traffic: certain
    assert detection_bound(60.0, 0.02, 0.02 * 1.0001) < 0.0011  # no fault: about alpha
    # Not knowing stable's rate costs power: the best unbiased two-sample test catches
    # less than the bound, and more when stable's own traffic pins its rate down.
    small, large = Cell(0.02, 10.0, 0.01, "5x", 0), Cell(0.02, 100.0, 0.1, "5x", 0)
    assert conditional_power(small) <= detection_bound(small.canary_rps * 600, 0.02, 0.10)
    assert conditional_power(large) > 0.999
    even = Cell(0.001, 10.0, 0.5, "5x", 0)  # 5 req/s each: ~15 canary errors against ~3
    assert 0.3 < conditional_power(even) < 0.5
