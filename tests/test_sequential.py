"""The guard's cumulative tests (proxy/sequential.py): validity under the null hypothesis
however often they are looked at, and power where the window cannot judge.

Every simulation is seeded, so each assertion is about fixed numbers: the bounds are
chosen with room (a 3-sigma margin over the guaranteed rate), not tuned to the seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from proxy.guard import Policy
from proxy.sequential import Cumulative, Outcomes, Promotion, Rate, Relative

pytestmark = pytest.mark.unit


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


def crossings(runs: int, ticks: int, make: Callable[[int], Any], feed: Callable) -> list:
    """Run `runs` tests of `ticks` ticks each, looked at after every tick: for each run,
    the tick (1-based) at which it first crossed its threshold, or None."""
    found: list[int | None] = []
    for run in range(runs):
        test = make(run)
        for tick in range(1, ticks + 1):
            feed(test, run)
            if test.crossed:
                found.append(tick)
                break
        else:
            found.append(None)
    return found


def shares(rng: random.Random, mean: float, p: float) -> Callable:
    """Feed a Rate or Promotion one tick: Poisson(mean) outcomes, each bad with p."""

    def feed(test: Any, _run: int) -> None:
        n = poisson(rng, mean)
        test.update(binomial(rng, n, p), n)

    return feed


def errors(rng: random.Random, canary: float, stable: float, pc: float, ps: float) -> Callable:
    """Feed a Relative one tick: Poisson request counts, each an error with pc / ps."""

    def feed(test: Relative, _run: int) -> None:
        nc, ns = poisson(rng, canary), poisson(rng, stable)
        test.update(binomial(rng, nc, pc), nc, binomial(rng, ns, ps), ns)

    return feed


def caught(found: list) -> int:
    return sum(t is not None for t in found)


def test_rate_at_its_null_crosses_at_most_alpha_of_the_time_looked_at_every_tick():
    rng, alpha, runs = random.Random(7), 0.05, 400
    found = crossings(runs, 300, lambda _: Rate(0.02, alpha), shares(rng, 3.0, 0.02))
    assert caught(found) / runs <= margin(alpha, runs), caught(found)


def test_relative_with_equal_rates_crosses_at_most_alpha_of_the_time_at_any_weight():
    rng, alpha, runs = random.Random(11), 0.05, 300
    weights = (0.01, 0.1, 0.5)  # the canary's weight, run by run

    def feed(test: Relative, run: int) -> None:
        share = weights[run % 3]
        errors(rng, 20 * share, 20 * (1 - share), 0.05, 0.05)(test, run)

    found = crossings(runs, 300, lambda _: Relative(alpha), feed)
    assert caught(found) / runs <= margin(alpha, runs), caught(found)


def test_a_better_canary_makes_relative_cross_even_less():
    rng, alpha, runs = random.Random(3), 0.05, 200
    found = crossings(runs, 200, lambda _: Relative(alpha), errors(rng, 2.0, 18.0, 0.01, 0.03))
    assert caught(found) / runs <= alpha, caught(found)


def test_half_failing_canary_at_half_a_request_a_second_crosses_within_five_minutes():
    """Where a 30 s window with min_requests 50 never judges at all."""
    # the default level split between the default tests (error rate, relative)
    rng, alpha, runs = random.Random(5), 1e-3 / 2, 200
    found = crossings(runs, 300, lambda _: Rate(0.02, alpha), shares(rng, 0.5, 0.5))
    assert caught(found) / runs >= 0.95, caught(found)
    times = sorted(t for t in found if t is not None)
    print(f"caught {caught(found)}/{runs}, median {times[len(times) // 2]} s")


def test_relative_catches_a_subtle_regression_the_window_misses():
    """0.5% -> 2.5% errors with 5 canary requests a second beside 45 stable ones."""
    rng, alpha, runs = random.Random(9), 1e-3 / 2, 100
    found = crossings(runs, 600, lambda _: Relative(alpha), errors(rng, 5.0, 45.0, 0.025, 0.005))
    assert caught(found) / runs >= 0.9, caught(found)


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
    rng, alpha, runs = random.Random(13), 0.05, 300
    found = crossings(runs, 300, lambda _: Promotion(0.02, alpha), shares(rng, 5.0, 0.02))
    assert caught(found) / runs <= margin(alpha, runs), caught(found)


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


def test_evidence_survives_json_whole_including_certain_refutations():
    policy = Policy(max_error_rate=0.0, max_p99_ms=100.0)
    cum = Cumulative(policy, since=5.0)
    cum.update(Outcomes(10, 1, slow=1, measured=10), Outcomes(50, 0, measured=50))
    assert cum.error_rate.log_value == math.inf and cum.promote.log_value == -math.inf
    doc = json.loads(json.dumps(cum.dump(), allow_nan=False))
    again = Cumulative.restored(policy, doc)
    assert again.dump() == cum.dump() and again.since == 5.0
    assert again.breaches() == cum.breaches() and again.doc() == cum.doc()
    with pytest.raises(ValueError, match="tests"):
        Cumulative.restored(Policy(max_error_rate=0.0), doc)  # another policy: other tests
    doc["tests"]["error_rate"]["bad"] = -1
    with pytest.raises(ValueError, match="count"):
        Cumulative.restored(policy, doc)
