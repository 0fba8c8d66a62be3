"""The guard's calibration: 1,000 seeded simulated runs per batch (bench/guard_sim.py).

A/A (canary as good as stable) must revert at most 1% of runs; A/B (canary 5x
worse, >= 2% errors, enough canary traffic to decide) at least 99%. The
batches use the real Window and verdict, ticking every simulated second.
"""

from __future__ import annotations

import random
import statistics

import pytest

from bench.guard_sim import AB_MIN_CANARY_RPS, DURATION, poisson, simulate

pytestmark = pytest.mark.unit

RUNS = 1000


def test_a_a_healthy_canaries_are_not_rolled_back_by_noise() -> None:
    runs = simulate("A/A", RUNS)
    reverted = sum(r.detected_at is not None for r in runs)
    assert len(runs) == RUNS
    assert reverted <= RUNS // 100, f"{reverted} of {RUNS} healthy canaries reverted"


def test_a_a_at_the_budget_with_the_default_policy() -> None:
    # Both versions at exactly max_error_rate (2%): the absolute check's worst null case.
    runs = simulate("A/A at the budget", RUNS)
    reverted = sum(r.detected_at is not None for r in runs)
    assert reverted <= RUNS // 100, f"{reverted} of {RUNS} canaries at the budget reverted"


def test_a_b_bad_canaries_are_rolled_back_quickly() -> None:
    runs = simulate("A/B", RUNS)
    hits = [r.detected_at for r in runs if r.detected_at is not None]
    assert all(r.canary_rps >= AB_MIN_CANARY_RPS for r in runs)
    assert all(r.p_canary == pytest.approx(5 * r.p_stable) for r in runs)
    assert min(r.p_canary for r in runs) >= 0.02
    assert len(hits) >= RUNS * 99 // 100, f"only {len(hits)} of {RUNS} bad canaries reverted"
    assert statistics.median(hits) <= 30  # within one window
    assert max(hits) < DURATION


def test_simulation_is_deterministic() -> None:
    assert simulate("A/B", 50) == simulate("A/B", 50)
    assert simulate("A/B", 50) != simulate("A/B", 50, seed=1)


@pytest.mark.parametrize("lam", [0.3, 4.0, 25.0, 400.0])
def test_poisson_sampler_has_the_right_mean_and_variance(lam: float) -> None:
    rng = random.Random(1)
    xs = [poisson(rng, lam) for _ in range(20_000)]
    se = (lam / len(xs)) ** 0.5
    assert abs(statistics.fmean(xs) - lam) < 5 * se
    assert statistics.pvariance(xs) == pytest.approx(lam, rel=0.05)
