"""Anytime-valid sequential tests: the guard's slow speed, over everything since a step began.

Job: keep, for one rollout step, test martingales over the canary's and the
stable's cumulative outcomes, fed once a tick with that tick's counts, and say
whether one of them has crossed its threshold (a breach), and whether there is
enough evidence that the canary is under its limits (reported with the evidence).
docs/guard.md derives the guarantees; in short:

- Each test is a mixture, with equal weights, of likelihood-ratio processes, one
  per alternative in a fixed grid. Under its null hypothesis each process is a
  nonnegative supermartingale with initial value 1, so the mixture is one too,
  and by Ville's inequality the probability that it *ever* reaches 1/alpha is at
  most alpha, however often it is looked at. Looking every second costs nothing.
- `Rate` tests H0: p <= p0 for a share of Bernoulli outcomes (errors among
  requests against `max_error_rate`; slow requests among measured ones against
  1%). `Relative` tests H0: canary rate <= stable rate on where the errors fall:
  given a tick's errors, each is the canary's with probability at most its share
  of the tick's requests under H0 (exactly hypergeometric when the rates are
  equal; Hoeffding's convex ordering bounds it by the binomial the process is
  built on). `Promotion` tests H0: p >= p0, the other way round, so crossing its
  threshold is evidence that the canary is under the budget.
- Requests are taken as independent outcomes, as the window tests take them.

Pure and small: floats in lists, no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any

from .guard import material

# Alternatives, as multiples of the null rate (Rate), of the null odds (Relative), or as
# fractions of the budget (Promotion). A wide grid keeps power for faults small and large:
# the mixture costs log(len(grid)) nats against the best single alternative.
WORSE = (1.5, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0)
ODDS = (2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
BETTER = (0.75, 0.5, 0.25, 0.1, 0.02)


def _log_mean_exp(logs: list[float]) -> float:
    top = max(logs)
    if top == -math.inf or top == math.inf:
        return top
    return top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))


class _Mixture:
    """A mixture of processes kept as the log of each; `log_value` is the log of the mean."""

    __slots__ = ("logs", "alpha")

    def __init__(self, size: int, alpha: float) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.logs = [0.0] * size
        self.alpha = alpha

    @property
    def log_value(self) -> float:
        return _log_mean_exp(self.logs)

    @property
    def threshold(self) -> float:
        """log(1/alpha): Ville's bound for the mixture."""
        return -math.log(self.alpha)

    @property
    def crossed(self) -> bool:
        return self.log_value >= self.threshold

    def dump(self) -> dict[str, Any]:
        """The state, JSON-safe, for a process that takes over (`load`)."""
        return {"logs": [_encode(x) for x in self.logs]}

    def load(self, d: Any) -> None:
        """The inverse of `dump` for a mixture built with the same settings; ValueError,
        changing nothing, when `d` is not one."""
        logs = [_decode(x) for x in d["logs"]]
        if len(logs) != len(self.logs):
            raise ValueError(f"{len(logs)} processes where {len(self.logs)} were expected")
        if any(not math.isfinite(x) and x not in self.extremes() for x in logs):
            raise ValueError("an infinite log this test cannot reach")
        self.logs = logs

    def extremes(self) -> tuple[float, ...]:
        """The infinite logs this test can reach (certain evidence one way)."""
        return ()

    def doc(self) -> dict:
        # JSON has no infinity: a certain refutation (a bad outcome against a null rate
        # of zero) is shown as the largest value kept, e^700.
        value = max(min(self.log_value, _LOG_CAP), -_LOG_CAP)
        return {
            "e_value": float(f"{math.exp(value):.4g}"),
            "log_e_value": round(value, 3),
            "threshold": round(1 / self.alpha, 1),
        }


_LOG_CAP = 700.0


def _encode(x: float) -> float | str:
    """A log for JSON: infinities (certain evidence either way) as strings."""
    return x if math.isfinite(x) else repr(x)


def _decode(x: Any) -> float:
    if isinstance(x, str) and x in ("inf", "-inf"):
        return float(x)
    if isinstance(x, bool) or not isinstance(x, int | float) or math.isnan(x):
        raise ValueError(f"not a log value: {x!r}")
    return float(x)


def _count(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError(f"not a count: {x!r}")
    return x


class _Share(_Mixture):
    """A mixture over the share of bad outcomes among Bernoulli outcomes: one process per
    alternative rate p1, each multiplied by p1/p0 per bad outcome, (1-p1)/(1-p0) per good."""

    __slots__ = ("p0", "alternatives", "hit", "miss", "bad", "total")

    def __init__(self, p0: float, alpha: float, alternatives: tuple[float, ...]) -> None:
        if not 0 <= p0 < 1:
            raise ValueError(f"p0 must be in [0, 1), got {p0}")
        super().__init__(max(1, len(alternatives)), alpha)
        self.p0 = p0
        self.alternatives = alternatives
        # per alternative: log-LR added by one bad outcome (infinite against p0 = 0) and by
        # one good one (log1p keeps log((1-p1)/(1-p0)) exact for the tiniest rates)
        self.hit = [math.log(p1 / p0) if p0 else math.inf for p1 in alternatives]
        self.miss = [math.log1p(-p1) - math.log1p(-p0) for p1 in alternatives]
        self.bad = 0
        self.total = 0

    def update(self, bad: int, total: int) -> None:
        if total <= 0:
            return
        good = total - bad
        self.bad += bad
        self.total += total
        logs = self.logs
        for j in range(len(self.hit)):
            logs[j] += (bad * self.hit[j] if bad else 0.0) + good * self.miss[j]

    def dump(self) -> dict[str, Any]:
        return super().dump() | {"bad": self.bad, "total": self.total}

    def load(self, d: Any) -> None:
        bad, total = _count(d["bad"]), _count(d["total"])
        if bad > total:
            raise ValueError(f"{bad} bad outcomes among {total}")
        super().load(d)
        self.bad, self.total = bad, total

    def extremes(self) -> tuple[float, ...]:
        # against p0 = 0 one bad outcome is certain: +inf for the test that p <= 0
        return (math.inf,) if self.p0 == 0 else ()

    def doc(self) -> dict:
        return super().doc() | {"bad": self.bad, "total": self.total, "p0": self.p0}


class Rate(_Share):
    """H0: the share `p` of bad outcomes is <= p0 (an e-process against the budget)."""

    __slots__ = ()

    def __init__(self, p0: float, alpha: float) -> None:
        if p0 == 0:
            # Any bad outcome refutes p <= 0 outright: one alternative is enough.
            alternatives: tuple[float, ...] = (0.5,)
        else:
            cap = 1 - (1 - p0) / 20  # always above p0, always below 1
            alternatives = tuple(sorted({min(p0 * m, cap) for m in WORSE}))
        super().__init__(p0, alpha, alternatives)


class Relative(_Mixture):
    """H0: the canary's error rate is <= the stable's, judged on who the errors fell to.

    A tick with `e` errors, `nc` canary and `ns` stable requests: under H0 each error
    is the canary's with probability at most theta0 = nc / (nc + ns). Alternative j
    multiplies those odds by ODDS[j].
    """

    __slots__ = ("canary_errors", "stable_errors", "canary_requests", "stable_requests")

    def __init__(self, alpha: float) -> None:
        super().__init__(len(ODDS), alpha)
        self.canary_errors = self.stable_errors = 0
        self.canary_requests = self.stable_requests = 0

    def update(self, canary_errors: int, canary: int, stable_errors: int, stable: int) -> None:
        self.canary_errors += canary_errors
        self.stable_errors += stable_errors
        self.canary_requests += canary
        self.stable_requests += stable
        if canary <= 0 or stable <= 0 or canary_errors + stable_errors == 0:
            return  # no error, or one side silent: the conditional likelihood ratio is 1
        # theta = odds / (1 + odds): log(theta1/theta0) = log(rho) + log((1+o0)/(1+rho*o0))
        # and log((1-theta1)/(1-theta0)) = log((1+o0)/(1+rho*o0)), with o0 = canary/stable.
        odds0 = canary / stable
        logs = self.logs
        for j, rho in enumerate(ODDS):
            shared = math.log1p(odds0) - math.log1p(rho * odds0)
            logs[j] += canary_errors * (math.log(rho) + shared) + stable_errors * shared

    def dump(self) -> dict[str, Any]:
        counts = (self.canary_errors, self.canary_requests, self.stable_errors)
        return super().dump() | {"counts": [*counts, self.stable_requests]}

    def load(self, d: Any) -> None:
        counts = [_count(x) for x in d["counts"]]
        if len(counts) != 4 or counts[0] > counts[1] or counts[2] > counts[3]:
            raise ValueError(f"counts {counts} are not errors and requests of each version")
        super().load(d)
        self.canary_errors, self.canary_requests, self.stable_errors, self.stable_requests = counts

    def doc(self) -> dict:
        return super().doc() | {
            "canary": [self.canary_errors, self.canary_requests],
            "stable": [self.stable_errors, self.stable_requests],
        }


class Promotion(_Share):
    """H0: the share `p` of bad outcomes is >= p0; crossing is evidence that p < p0."""

    __slots__ = ()

    def __init__(self, p0: float, alpha: float) -> None:
        super().__init__(p0, alpha, tuple(p0 * m for m in BETTER) if p0 > 0 else ())
        if p0 == 0:
            self.logs = [-math.inf]  # nothing is below a budget of zero

    def extremes(self) -> tuple[float, ...]:
        return (-math.inf,) if self.p0 == 0 else ()

    def needed(self) -> int | None:
        """How many more outcomes, at the rate seen so far (none bad before the first
        outcome: the fewest it could take), until the mixture crosses its threshold; None
        when the rate seen is too close to p0, or above it, to get there."""
        if self.crossed:
            return 0
        if self.p0 == 0:
            return None
        seen = self.bad / self.total if self.total else 0.0
        drifts = [seen * h + (1 - seen) * m for h, m in zip(self.hit, self.miss, strict=True)]
        if max(drifts) <= 0:
            return None

        def crosses(n: int) -> bool:
            logs = [x + n * d for x, d in zip(self.logs, drifts, strict=True)]
            return _log_mean_exp(logs) >= self.threshold

        # The log of the mixture is convex in n and starts below the threshold, so it
        # crosses it once: double, then halve.
        high = 1
        while not crosses(high):
            high *= 2
            if high > NEEDED_CAP:
                return None
        low = high // 2  # does not cross (or is 0)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if crosses(mid) else (mid, high)
        return high


NEEDED_CAP = 1 << 40  # beyond this many outcomes, "never" is the honest answer


SLOW_SHARE = 0.01  # p99 > T  <=>  more than 1% of requests are slower than T


class Cumulative:
    """The slow speed for one rollout step: every outcome since the step began.

    Breach tests (each at `sequential_alpha` divided by their number, so together they
    raise a false breach in a step with probability at most `sequential_alpha`): the
    canary's error rate against `max_error_rate`, its slow share against 1% when
    `max_p99_ms` is set, and, with `relative_to_stable`, its errors against stable's
    (a crossing counts only where the rates also differ materially, as in the window's
    relative test). Evidence to advance: the error rate, and the slow share when
    judged, each shown under its limit at `promotion_alpha` divided by their number.
    """

    __slots__ = ("policy", "since", "error_rate", "slow", "relative", "promote", "promote_slow")

    def __init__(self, policy: Any, since: float = 0.0) -> None:
        self.policy = policy
        self.since = since  # wall-clock time the evidence starts from
        judged_slow = policy.max_p99_ms is not None
        tests = 1 + judged_slow + bool(policy.relative_to_stable)
        alpha = policy.sequential_alpha / tests
        self.error_rate = Rate(policy.max_error_rate, alpha)
        self.slow = Rate(SLOW_SHARE, alpha) if judged_slow else None
        self.relative = Relative(alpha) if policy.relative_to_stable else None
        gates = 1 + judged_slow
        self.promote = Promotion(policy.max_error_rate, policy.promotion_alpha / gates)
        self.promote_slow = (
            Promotion(SLOW_SHARE, policy.promotion_alpha / gates) if judged_slow else None
        )

    def update(self, canary: Outcomes, stable: Outcomes) -> None:
        """One tick's outcomes of each version."""
        self.error_rate.update(canary.errors, canary.requests)
        self.promote.update(canary.errors, canary.requests)
        if self.slow is not None and self.promote_slow is not None:
            self.slow.update(canary.slow, canary.measured)
            # evidence of being fast enough counts what may have been slow too
            self.promote_slow.update(canary.maybe_slow, canary.measured)
        if self.relative is not None:
            # live outcomes only: a mirror copy is not a draw from the same population as
            # the stable request it copies (method, body and timeout rules differ)
            self.relative.update(
                canary.live_errors, canary.live_requests, stable.live_errors, stable.live_requests
            )

    def parts(self) -> dict[str, _Mixture]:
        """Every test kept, by a stable name."""
        named: dict[str, _Mixture | None] = {
            "error_rate": self.error_rate, "p99": self.slow, "relative": self.relative,
            "promote": self.promote, "promote_p99": self.promote_slow,
        }  # fmt: skip
        return {name: test for name, test in named.items() if test is not None}

    def dump(self) -> dict[str, Any]:
        """The evidence so far, JSON-safe, for a leader that takes over (`restored`)."""
        return {"since": self.since, "tests": {n: t.dump() for n, t in self.parts().items()}}

    @classmethod
    def restored(cls, policy: Any, d: Any) -> Cumulative:
        """The evidence `dump` gave, under the same policy; ValueError (or KeyError,
        TypeError) when `d` is not such evidence."""
        since = d["since"]
        if isinstance(since, bool) or not isinstance(since, int | float):
            raise ValueError(f"since must be a time, got {since!r}")
        cum = cls(policy, float(since))
        tests = d["tests"]
        if set(tests) != set(cum.parts()):
            raise ValueError(f"tests {sorted(tests)} where {sorted(cum.parts())} were expected")
        for name, test in cum.parts().items():
            test.load(tests[name])
        # the tests saw the same outcomes: their counts agree, or this is not one evidence
        e, p = cum.error_rate, cum.promote
        agree = (e.bad, e.total) == (p.bad, p.total)
        if cum.slow is not None and cum.promote_slow is not None:
            agree = agree and cum.slow.total == cum.promote_slow.total
            agree = agree and cum.slow.bad <= cum.promote_slow.bad
        if not agree:
            raise ValueError("the tests' counts disagree")
        return cum

    def breaches(self) -> tuple[str, ...]:
        """The names of the tests that crossed, in the window verdict's order."""
        found = []
        if self.error_rate.crossed:
            found.append("error_rate")
        if self.slow is not None and self.slow.crossed:
            found.append("p99")
        if self.relative is not None and self.relative.crossed and self.material():
            found.append("relative")
        return tuple(found)

    def material(self) -> bool:
        r = self.relative
        if r is None or not r.canary_requests or not r.stable_requests:
            return False
        rate_c = r.canary_errors / r.canary_requests
        return material(rate_c, r.stable_errors / r.stable_requests, self.policy)

    @property
    def promotable(self) -> bool:
        """Enough evidence that the canary is under its limits to move on."""
        return self.promote.crossed and (self.promote_slow is None or self.promote_slow.crossed)

    def needed(self) -> int | None:
        """About how many more canary requests until `promotable` at the rates seen;
        None when the rates seen are too close to a limit to show it."""
        counts = [self.promote.needed()]
        if self.promote_slow is not None:
            counts.append(self.promote_slow.needed())
        if any(n is None for n in counts):
            return None
        return max(n for n in counts if n is not None)

    def doc(self) -> dict:
        tests: dict[str, Any] = {"error_rate": self.error_rate.doc()}
        if self.slow is not None:
            tests["p99"] = self.slow.doc()
        if self.relative is not None:
            tests["relative"] = self.relative.doc() | {"material": self.material()}
        promote = {"error_rate": self.promote.doc()}
        if self.promote_slow is not None:
            promote["p99"] = self.promote_slow.doc()
        return {
            "test": "mixture_e_process",
            "tests": tests,
            "breaches": list(self.breaches()),
            "promotion": promote | {"ready": self.promotable, "needs": self.needed()},
            "since": self.since,
            "summary": self.words(),
        }

    def words(self) -> str:
        """The evidence since the step began, in one line for people."""
        e = self.error_rate
        text = f"cumulative evidence: canary {e.bad}/{e.total} errors"
        if e.total:
            text += f" ({100 * e.bad / e.total:.1f}%)"
        r = self.relative
        if r is not None and r.stable_requests:
            rate = 100 * r.stable_errors / r.stable_requests
            text += f" vs stable {r.stable_errors}/{r.stable_requests} ({rate:.1f}%)"
        fired = self.breaches()
        if fired:
            tests = {"error_rate": e, "p99": self.slow, "relative": r}
            worst = tests[fired[0]]
            assert worst is not None
            value = math.exp(min(worst.log_value, _LOG_CAP))
            return text + (
                f"; breach ({', '.join(fired)}): e-value {value:.3g} >= {1 / worst.alpha:.3g}"
            )
        if self.promotable:
            return text + "; enough evidence that the canary is under its limits"
        needed = self.needed()
        if needed is None:
            return text + "; the canary is too close to its limits to show it is under them"
        return text + f"; needs ~{needed} more canary requests to show it is under its limits"


class Outcomes:
    """One version's outcomes over one tick: all of them (shadow copies included, as in
    the window), and the live ones (no copies) apart."""

    __slots__ = (
        "requests", "errors", "slow", "maybe_slow", "measured", "live_requests", "live_errors"
    )  # fmt: skip

    def __init__(
        self,
        requests: int = 0,
        errors: int = 0,
        slow: int = 0,
        measured: int = 0,
        live: tuple[int, int] | None = None,
    ) -> None:
        self.requests = requests
        self.errors = errors
        self.slow = slow  # certainly slower than the limit
        self.maybe_slow = slow  # in a latency bucket that reaches above the limit
        self.measured = measured
        self.live_requests, self.live_errors = live if live is not None else (requests, errors)
