"""The guard's cumulative tests (proxy/sequential.py): validity under the null hypothesis
however often they are looked at, and power where the window cannot judge.

Every simulation is seeded, so each assertion is about fixed numbers: the bounds are
chosen with room (a 3-sigma margin over the guaranteed rate), not tuned to the seed.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from proxy.sequential import Promotion, Rate, Relative


def poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method: fine for the small means a tick has here."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def margin(alpha: float, runs: int) -> float:
    """The guaranteed rate plus three standard errors of a rate measured over `runs`."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_rate_at_its_null_crosses_at_most_alpha_of_the_time_looked_at_every_tick():
    rng, alpha, runs, crossed = random.Random(7), 0.05, 400, 0
    for _ in range(runs):
        test = Rate(0.02, alpha)
        for _tick in range(300):
            n = poisson(rng, 3.0)
            test.update(binomial(rng, n, 0.02), n)
            if test.crossed:  # looked at after every tick
                crossed += 1
                break
    assert crossed / runs <= margin(alpha, runs), crossed


def test_relative_with_equal_rates_crosses_at_most_alpha_of_the_time_at_any_weight():
    rng, alpha, runs, crossed = random.Random(11), 0.05, 300, 0
    for run in range(runs):
        test = Relative(alpha)
        share = (0.01, 0.1, 0.5)[run % 3]  # the canary's weight
        for _tick in range(300):
            nc, ns = poisson(rng, 20 * share), poisson(rng, 20 * (1 - share))
            test.update(binomial(rng, nc, 0.05), nc, binomial(rng, ns, 0.05), ns)
            if test.crossed:
                crossed += 1
                break
    assert crossed / runs <= margin(alpha, runs), crossed


def test_a_better_canary_makes_relative_cross_even_less():
    rng, alpha, runs, crossed = random.Random(3), 0.05, 200, 0
    for _ in range(runs):
        test = Relative(alpha)
        for _tick in range(200):
            nc, ns = poisson(rng, 2.0), poisson(rng, 18.0)
            test.update(binomial(rng, nc, 0.01), nc, binomial(rng, ns, 0.03), ns)
            crossed += test.crossed
            if test.crossed:
                break
    assert crossed / runs <= alpha, crossed


def test_half_failing_canary_at_half_a_request_a_second_crosses_within_five_minutes():
    """Where a 30 s window with min_requests 50 never judges at all."""
    # the default level split between the default tests (error rate, relative)
    rng, alpha, runs, caught, times = random.Random(5), 1e-3 / 2, 200, 0, []
    for _ in range(runs):
        test = Rate(0.02, alpha)
        for second in range(1, 301):
            n = poisson(rng, 0.5)
            test.update(binomial(rng, n, 0.5), n)
            if test.crossed:
                caught += 1
                times.append(second)
                break
    assert caught / runs >= 0.95, caught
    times.sort()
    print(f"caught {caught}/{runs}, median {times[len(times) // 2]} s")


def test_relative_catches_a_subtle_regression_the_window_misses():
    """0.5% -> 2.5% errors with 5 canary requests a second beside 45 stable ones."""
    rng, alpha, runs, caught = random.Random(9), 1e-3 / 2, 100, 0
    for _ in range(runs):
        test = Relative(alpha)
        for _second in range(600):
            nc, ns = poisson(rng, 5.0), poisson(rng, 45.0)
            test.update(binomial(rng, nc, 0.025), nc, binomial(rng, ns, 0.005), ns)
            if test.crossed:
                caught += 1
                break
    assert caught / runs >= 0.9, caught


def test_zero_budget_is_refuted_by_one_error_and_never_promotes():
    test = Rate(0.0, 1e-3)
    test.update(0, 1000)
    assert not test.crossed
    test.update(1, 1)
    assert test.crossed and test.doc()["log_e_value"] == 700  # JSON has no infinity
    json.dumps(test.doc(), allow_nan=False)
    promotion = Promotion(0.0, 0.05)
    promotion.update(0, 10_000)
    assert not promotion.crossed and promotion.needed() is None


def test_promotion_needs_evidence_and_says_how_much_more():
    promotion = Promotion(0.02, 0.05)
    assert not promotion.crossed
    first = promotion.needed()
    assert first is not None and 100 < first < 1000
    served = 0
    while not promotion.crossed and served < 5000:
        promotion.update(0, 10)
        served += 10
    assert promotion.crossed
    # the first estimate (made with no data at all) is the right order of magnitude
    assert first / 3 <= served <= first * 3, (first, served)
    assert promotion.needed() == 0


def test_a_canary_at_its_budget_is_promoted_at_most_alpha_of_the_time():
    rng, alpha, runs, promoted = random.Random(13), 0.05, 300, 0
    for _ in range(runs):
        promotion = Promotion(0.02, alpha)
        for _tick in range(300):
            n = poisson(rng, 5.0)
            promotion.update(binomial(rng, n, 0.02), n)
            if promotion.crossed:
                promoted += 1
                break
    assert promoted / runs <= margin(alpha, runs), promoted


def test_a_canary_over_its_budget_says_it_cannot_get_there():
    promotion = Promotion(0.02, 0.05)
    promotion.update(30, 1000)  # 3%
    assert promotion.needed() is None


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5])
def test_null_rates_outside_the_unit_interval_are_refused(bad: float):
    with pytest.raises(ValueError):
        Rate(bad, 0.01)
    with pytest.raises(ValueError):
        Promotion(bad, 0.01)


def test_the_summary_says_what_a_step_waits_for():
    from proxy.guard import Policy
    from proxy.sequential import Cumulative, Outcomes

    cum = Cumulative(Policy(max_error_rate=0.02))
    assert "needs ~" in cum.words() and "more canary requests" in cum.words()
    for _ in range(40):
        cum.update(Outcomes(10, 0), Outcomes(90, 1))
    assert cum.promotable and "enough evidence" in cum.words()
    assert "canary 0/400 errors (0.0%) vs stable 40/3600 (1.1%)" in cum.words()
    hot = Cumulative(Policy(max_error_rate=0.02))
    hot.update(Outcomes(10, 5), Outcomes(90, 0))
    hot.update(Outcomes(10, 5), Outcomes(90, 0))
    assert hot.breaches() and "breach (error_rate" in hot.words()
    warm = Cumulative(Policy(max_error_rate=0.02))
    warm.update(Outcomes(1000, 30), Outcomes(1000, 30))  # 3%: over, but not yet shown
    assert not warm.breaches() and warm.needed() is None
    assert "too close to its limits" in warm.words()


@pytest.mark.parametrize("p0", [1e-17, 1e-6, 0.02, 0.3, 0.7, 0.9995])
def test_every_process_is_a_supermartingale_under_its_null_exactly(p0: float):
    """The expected factor of one outcome, computed exactly, is at most 1 for every
    alternative and every rate the null allows: Rate for p <= p0, Promotion for p >= p0."""
    rate, promotion = Rate(p0, 0.01), Promotion(p0, 0.01)
    for p in (0.0, p0 / 2, p0):
        for hit, miss in zip(rate.hit, rate.miss, strict=True):
            assert p * math.exp(hit) + (1 - p) * math.exp(miss) <= 1 + 1e-12, (p, hit, miss)
    for p in (p0, (1 + p0) / 2, 1.0):
        for hit, miss in zip(promotion.hit, promotion.miss, strict=True):
            assert p * math.exp(hit) + (1 - p) * math.exp(miss) <= 1 + 1e-12, (p, hit, miss)
    assert all(p1 > p0 for p1 in rate.alternatives) and all(p1 < 1 for p1 in rate.alternatives)
    assert all(0 < p1 < p0 for p1 in promotion.alternatives)


@pytest.mark.parametrize(("nc", "ns"), [(1, 1), (1, 9), (9, 1), (3, 40), (20, 20)])
def test_relative_factor_under_equal_rates_has_expectation_at_most_one(nc: int, ns: int):
    """Given a tick's E errors among nc + ns requests with equal rates, the canary's
    share is hypergeometric; the expected factor of every alternative is <= 1."""
    for errors in range(1, nc + ns + 1):
        expected = [0.0] * len(Relative(0.01).logs)
        for k in range(max(0, errors - ns), min(nc, errors) + 1):
            weight = math.comb(nc, k) * math.comb(ns, errors - k) / math.comb(nc + ns, errors)
            test = Relative(0.01)
            test.update(k, nc, errors - k, ns)
            for j, log in enumerate(test.logs):
                expected[j] += weight * math.exp(log)
        assert max(expected) <= 1 + 1e-9, (errors, expected)
