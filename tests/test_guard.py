"""Unit tests for proxy.guard: the sliding window, the exact tails and the verdict."""

from __future__ import annotations

import json
import math
import time
import tracemalloc

import pytest

from proxy.guard import (
    BREACH,
    HEALTHY,
    INCONCLUSIVE,
    LATENCY_BUCKETS,
    UPPER_MS,
    Policy,
    Stats,
    Window,
    binomial_sf,
    clopper_pearson_lower,
    evaluate,
    hypergeometric_sf,
    latency_bucket,
    quantile_ms,
    verdict,
)

pytestmark = pytest.mark.unit

# --- Window ---------------------------------------------------------------------------


def test_window_counts_errors_not_4xx() -> None:
    w = Window(30)
    w.record(100.0, 200, 0.01, False)
    w.record(100.1, 404, 0.01, False)
    w.record(100.2, 503, 0.01, False)
    w.record(100.3, 0, 0.01, True)  # reset before a status line: a proxy-made failure
    s = w.stats(100.5)
    assert (s.requests, s.errors) == (4, 2)


def test_window_slides_bucket_by_bucket() -> None:
    w = Window(30)
    w.record_counts(100.2, 10, 1)
    w.record_counts(110.7, 20, 2)
    assert (w.stats(129.99).requests, w.stats(129.99).errors) == (30, 3)
    assert (w.stats(130.0).requests, w.stats(130.0).errors) == (20, 2)  # second 100 left
    assert w.stats(140.5).requests == 0
    w.record_counts(141.0, 5, 0)
    assert w.stats(141.0).requests == 5


def test_window_jump_beyond_its_length_clears_everything() -> None:
    w = Window(10)
    for t in range(10):
        w.record(1000.0 + t, 500, 0.2, False)
    assert w.stats(1009.0).errors == 10
    s = w.stats(5000.0)
    assert (s.requests, s.errors, s.p99_ms, s.latency) == (0, 0, None, ())


def test_window_drops_outcomes_older_than_itself() -> None:
    w = Window(30)
    w.record_counts(200.0, 1, 0)
    w.record_counts(165.0, 7, 7)  # 35 s in the past: outside the window
    w.record_counts(185.0, 3, 0)  # late but inside the window
    assert (w.stats(200.0).requests, w.stats(200.0).errors) == (4, 0)


def test_window_counts_shadow_outcomes_in_totals_and_apart() -> None:
    w = Window(30)
    for _ in range(8):
        w.record(10.0, 200, 0.005, False)
    w.record(10.0, 502, 0.005, False, shadow=True)
    w.record(10.0, 200, 0.005, False, shadow=True)
    w.record_counts(11.0, 5, 1, shadow=True)
    s = w.stats(11.0)
    assert (s.requests, s.errors) == (15, 2)
    assert (s.shadow_requests, s.shadow_errors) == (7, 2)
    assert w.stats(41.0).shadow_requests == 0  # shadow counts expire too


def test_latency_buckets_cover_point_one_ms_to_a_minute() -> None:
    assert latency_bucket(0.0) == latency_bucket(-1.0) == latency_bucket(float("nan")) == 0
    assert UPPER_MS[latency_bucket(0.001)] == 1.0  # an edge belongs to the bucket below it
    assert UPPER_MS[latency_bucket(0.0010001)] == 1.5
    assert UPPER_MS[latency_bucket(0.8)] == 800.0
    assert UPPER_MS[-1] == 60_000.0
    assert latency_bucket(61.0) == latency_bucket(float("inf")) == LATENCY_BUCKETS - 1
    assert {100.0, 150.0, 200.0, 250.0, 300.0, 500.0, 800.0, 1000.0, 2000.0} <= set(UPPER_MS)


def test_p99_from_the_histogram() -> None:
    w = Window(30)
    for i in range(1000):
        w.record(50.0, 200, 0.001 * (i + 1), False)  # 1 ms .. 1000 ms, uniform
    p99 = w.stats(50.0).p99_ms
    assert p99 is not None
    assert 800 < p99 <= 1000  # inside the bucket that holds the true p99 (990 ms)


def test_p99_picks_the_slow_tail_only_beyond_one_percent() -> None:
    counts = [0] * LATENCY_BUCKETS
    counts[latency_bucket(0.001)], counts[latency_bucket(0.5)] = 990, 10  # 1 ms, 500 ms
    assert quantile_ms(tuple(counts), 0.99) == pytest.approx(1.0)
    w = Window(30)
    for i in range(1000):
        w.record(5.0, 200, 0.5 if i < 20 else 0.001, False)
    p99 = w.stats(5.0).p99_ms
    assert p99 is not None and 400 < p99 <= 500  # the 500 ms bucket: (400, 500]


def test_slower_than_counts_only_requests_certainly_slower() -> None:
    w = Window(30)
    for ms in (45, 50, 55, 700, 900):
        w.record(1.0, 200, ms / 1000, False)
    s = w.stats(1.0)
    assert s.slower_than(50) == 3  # 50 is an edge: exact
    assert s.slower_than(40) == 5
    assert s.slower_than(750) == 1  # not an edge: the (600, 800] bucket straddles it, skipped
    assert s.slower_than(60_000) == 0


def test_record_is_cheap_and_allocates_nothing_that_stays() -> None:
    w = Window(30)
    w.record(0.0, 200, 0.01, False)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(20_000):
        w.record(i * 0.001, 500 if i % 7 else 200, 0.003, False, shadow=i % 2 == 0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename") if d.size_diff > 0)
    assert grown < 16_384
    n = 50_000
    started = time.perf_counter()
    for i in range(n):
        w.record(100.0 + i * 0.0005, 200, 0.003, False)
    assert (time.perf_counter() - started) / n < 20e-6  # ~1 µs typical; generous for CI


# --- exact tails ------------------------------------------------------------------------


def test_exact_tails_match_reference_values() -> None:
    # Reference values from scipy.stats (binom.sf, hypergeom.sf, beta.ppf).
    assert binomial_sf(5, 50, 0.02) == pytest.approx(0.003209742026079395, rel=1e-9)
    assert binomial_sf(3, 100, 0.02) == pytest.approx(0.3233143776482212, rel=1e-9)
    assert binomial_sf(40, 200, 0.02) == pytest.approx(9.662865758416177e-28, rel=1e-8)
    assert hypergeometric_sf(15, 11000, 25, 1000) == pytest.approx(2.9578837741808723e-10, 1e-8)
    assert hypergeometric_sf(10, 200, 12, 100) == pytest.approx(0.016520054662092484, rel=1e-9)
    assert clopper_pearson_lower(40, 200, 1e-5) == pytest.approx(0.09773906903167186, rel=1e-9)
    assert binomial_sf(0, 10, 0.5) == 1.0 and binomial_sf(11, 10, 0.5) == 0.0


def test_score_test_would_be_thirty_times_too_eager_at_small_counts() -> None:
    # Why exact tests: the normal/score test at z(1e-4) ~ 3.72 rejects p <= 2% at 5 errors
    # of 50, which happens 0.3% of the time at exactly 2%, not 0.01%.
    assert 0.02 + 3.72 * math.sqrt(0.02 * 0.98 / 50) < 5 / 50
    assert binomial_sf(5, 50, 0.02) > 30 * 1e-4


# --- verdict ----------------------------------------------------------------------------

POLICY = Policy()  # window 30 s, min_requests 50, max_error_rate 2%, relative, alpha 1e-5
STABLE = Stats(requests=2000, errors=20)  # 1%


def test_inconclusive_below_min_requests_even_if_all_fail() -> None:
    v = verdict(Stats(requests=49, errors=49), STABLE, POLICY)
    assert v.state == INCONCLUSIVE and v.reasons == ()
    assert v.evidence["canary"]["requests"] == 49 and v.evidence["tests"] == {}


def test_error_rate_breach_at_20_percent_of_200() -> None:
    v = verdict(Stats(requests=200, errors=40), STABLE, Policy(relative_to_stable=False))
    assert v.state == BREACH and v.reasons == ("error_rate",)
    test = v.evidence["tests"]["error_rate"]
    assert test["statistic"] == 40 and test["p_value"] < 1e-20
    assert test["lower_bound"] == pytest.approx(0.097739, abs=1e-6)  # Clopper-Pearson


def test_no_breach_at_3_percent_of_100_not_confident() -> None:
    v = verdict(Stats(requests=100, errors=3), Stats(requests=1000, errors=30), POLICY)
    assert v.state == HEALTHY and v.reasons == ()
    assert v.evidence["tests"]["error_rate"]["p_value"] == pytest.approx(0.3233, abs=1e-4)


def test_p99_breach_when_the_slow_share_is_confidently_above_one_percent() -> None:
    w, s = Window(30), Window(30)
    for i in range(200):
        w.record(10.0, 200, 2.0 if i % 10 == 0 else 0.05, False)  # 10% take 2 s
        s.record(10.0, 200, 0.05, False)
    v = evaluate(w, s, Policy(max_p99_ms=800), 10.0)
    assert v.state == BREACH and v.reasons == ("p99",)
    test = v.evidence["tests"]["p99"]
    assert test["statistic"] == 20 and test["measured"] == 200 and test["p_value"] < 1e-5
    assert v.evidence["canary"]["p99_ms"] > 800


def test_p99_one_slow_request_in_50_does_not_trip() -> None:
    w = Window(30)
    for i in range(50):
        w.record(10.0, 200, 2.0 if i == 0 else 0.05, False)
    canary = w.stats(10.0)
    assert canary.p99_ms is not None and canary.p99_ms > 800  # a naive p99 check would fire
    v = verdict(canary, canary, Policy(max_p99_ms=800))
    assert v.state == HEALTHY
    assert v.evidence["tests"]["p99"]["p_value"] == pytest.approx(0.39499, abs=1e-5)


def test_p99_all_just_under_the_threshold_is_healthy() -> None:
    w = Window(30)
    for _ in range(500):
        w.record(10.0, 200, 0.045, False)  # 45 ms, just under max_p99_ms=50
    v = evaluate(w, w, Policy(max_p99_ms=50), 10.0)
    assert v.state == HEALTHY and v.evidence["tests"]["p99"]["statistic"] == 0


def test_relative_breach_when_clearly_worse_than_stable_under_the_budget() -> None:
    canary, stable = Stats(requests=1000, errors=15), Stats(requests=10000, errors=10)
    v = verdict(canary, stable, POLICY)  # 1.5% (under 2%) against 0.1%
    assert v.state == BREACH and v.reasons == ("relative",)
    test = v.evidence["tests"]["relative"]
    assert test["test"] == "fisher_exact_one_sided" and test["material"] is True
    assert test["expected"] == pytest.approx(25 * 1000 / 11000, abs=1e-3)
    assert test["p_value"] == pytest.approx(2.9578837741808723e-10, rel=1e-8)


def test_relative_needs_a_material_difference() -> None:
    canary, stable = Stats(requests=100_000, errors=250), Stats(requests=900_000, errors=900)
    v = verdict(canary, stable, POLICY)  # 0.25% vs 0.1%: significant, but only 0.15 points
    assert v.state == HEALTHY
    assert v.evidence["tests"]["relative"]["material"] is False
    five_times = verdict(Stats(requests=100_000, errors=500), stable, POLICY)  # 0.5% vs 0.1%
    assert five_times.state == BREACH and five_times.reasons == ("relative",)


def test_relative_off_ignores_stable() -> None:
    v = verdict(
        Stats(requests=1000, errors=15),
        Stats(requests=10000, errors=10),
        Policy(relative_to_stable=False),
    )
    assert v.state == HEALTHY and "relative" not in v.evidence["tests"]


def test_evidence_is_json_with_counts_rates_tests_and_thresholds() -> None:
    v = verdict(Stats(requests=200, errors=40, shadow_requests=20, shadow_errors=4), STABLE, POLICY)
    doc = json.loads(json.dumps(v.evidence))
    assert doc["canary"] == {
        "requests": 200,
        "errors": 40,
        "error_rate": 0.2,
        "shadow_requests": 20,
        "shadow_errors": 4,
        "p99_ms": None,
    }
    assert doc["stable"]["requests"] == 2000 and doc["stable"]["error_rate"] == 0.01
    assert doc["thresholds"]["max_error_rate"] == 0.02 and doc["thresholds"]["alpha"] == 1e-5
    assert "webhook" not in doc["thresholds"]
    assert set(doc["tests"]) == {"error_rate", "relative"}
    for test in doc["tests"].values():
        assert {"test", "statistic", "p_value", "breach"} <= set(test)
    assert v.reasons == ("error_rate", "relative")


def test_healthy_a_a() -> None:
    w, s = Window(30), Window(30)
    for t in range(30):
        w.record_counts(t + 0.5, 100, 1 if t % 2 else 2)
        s.record_counts(t + 0.5, 900, 13)
    v = evaluate(w, s, POLICY, 29.5)
    assert v.state == HEALTHY and v.reasons == ()
    assert v.evidence["canary"]["requests"] == 3000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_breach": "explode"},
        {"window": 0},
        {"min_requests": 0},
        {"max_error_rate": 1.5},
        {"max_p99_ms": -1},
        {"alpha": 0.7},
        {"relative_min_ratio": 0.5},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)  # type: ignore[arg-type]
