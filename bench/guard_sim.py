"""Monte Carlo check of the guard: does it leave healthy canaries alone and catch bad ones?

Each run is `duration` simulated seconds at 1 s ticks. Each tick, the canary
gets Poisson(R*w) requests and stable Poisson(R*(1-w)); errors are drawn by
Poisson thinning (errors ~ Poisson(lam*p) and successes ~ Poisson(lam*(1-p)),
independent, which is exactly Poisson(lam) requests each failing with
probability p). The counts go into two real `proxy.guard.Window`s at
now = t + 0.5 and the real `verdict` is evaluated at the same `now`, every
tick, as the controller does. A run reverts at its first breach.

- A/A: canary and stable share one error rate p ~ U(0, 5%); R log-uniform in
  [1, 1000] req/s; w ~ U(1%, 50%). Requirement: reverts <= 1% of runs.
- A/B: stable p ~ U(0.4%, 2%), canary 5p (so 2%..10%); R and w drawn as in A/A
  but only pairs giving the canary >= AB_MIN_CANARY_RPS req/s are kept.
  Requirement: reverts >= 99% of runs.
- A/A at the budget: both versions at exactly 2% under the default policy
  (max_error_rate 0.02), the absolute check's worst null case. Reverts <= 1%.
- A/B below the range: as A/B with 1 <= R*w < 20 canary req/s, to show where
  the evidence runs out. No requirement.

Pure Python and seeded (`random.Random`); no numpy. `python -m bench.guard_sim`
prints the markdown table that docs/guard.md shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.guard import BREACH, Policy, Window, verdict

# The production policy the simulation checks (docs/guard.md, "Simulation"): the
# absolute budget sits above every shared baseline in the A/A batch (0..5%), so
# "worse than stable" is the relative test's job; everything else is the default.
SIM_POLICY = Policy(max_error_rate=0.10, relative_to_stable=True)
DURATION = 600  # simulated seconds per run: ten minutes, a long rollout step
AB_MIN_CANARY_RPS = 20.0  # below this the A/B canary sends too few errors to decide
Draw = tuple[float, float, float, float]  # rate, weight, p_stable, p_canary
BANDS = ((0.0, 2.0), (2.0, 5.0), (5.0, 20.0), (20.0, 100.0), (100.0, math.inf))  # canary req/s


@dataclass(frozen=True, slots=True)
class Run:
    rate: float  # R, requests per second to both versions
    weight: float  # w, the canary's share
    p_stable: float
    p_canary: float
    detected_at: int | None  # seconds of traffic until the first breach, or None

    @property
    def canary_rps(self) -> float:
        return self.rate * self.weight


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(lam) draw: inversion for small lam, PTRS (Hoermann 1993) otherwise."""
    if lam < 10.0:
        if lam <= 0.0:
            return 0
        limit, k, prod = math.exp(-lam), 0, rng.random()
        while prod > limit:
            k += 1
            prod *= rng.random()
        return k
    return _ptrs(rng, lam)


def _ptrs(rng: random.Random, lam: float) -> int:
    """Transformed rejection with squeeze (as in numpy's legacy generator), lam >= 10."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        lhs = math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b)
        if lhs <= -lam + k * loglam - math.lgamma(k + 1):
            return k


def run_once(
    rng: random.Random,
    policy: Policy,
    rate: float,
    weight: float,
    p_stable: float,
    p_canary: float,
    duration: int = DURATION,
) -> int | None:
    """Seconds of traffic until the first breach verdict, or None if the run never reverts."""
    canary, stable = Window(policy.window), Window(policy.window)
    lam_c, lam_s = rate * weight, rate * (1.0 - weight)
    ce, co = lam_c * p_canary, lam_c * (1.0 - p_canary)
    se, so = lam_s * p_stable, lam_s * (1.0 - p_stable)
    for t in range(duration):
        now = t + 0.5
        errors = poisson(rng, ce)
        canary.record_counts(now, errors + poisson(rng, co), errors)
        errors = poisson(rng, se)
        stable.record_counts(now, errors + poisson(rng, so), errors)
        if verdict(canary.stats(now), stable.stats(now), policy).state == BREACH:
            return t + 1
    return None


def _traffic(rng: random.Random, lo_rps: float, hi_rps: float) -> tuple[float, float]:
    """R log-uniform in [1, 1000] req/s and w ~ U(1%, 50%), kept if lo <= R*w < hi."""
    while True:
        rate = math.exp(rng.uniform(0.0, math.log(1000.0)))
        weight = rng.uniform(0.01, 0.50)
        if lo_rps <= rate * weight < hi_rps:
            return rate, weight


def _aa(rng: random.Random) -> Draw:
    rate, weight = _traffic(rng, 0.0, math.inf)
    p = rng.uniform(0.0, 0.05)
    return rate, weight, p, p


def _aa_budget(rng: random.Random) -> Draw:
    rate, weight = _traffic(rng, 0.0, math.inf)
    return rate, weight, 0.02, 0.02


def _ab(rng: random.Random) -> Draw:
    rate, weight = _traffic(rng, AB_MIN_CANARY_RPS, math.inf)
    p = rng.uniform(0.004, 0.02)
    return rate, weight, p, 5.0 * p


def _ab_low(rng: random.Random) -> Draw:
    rate, weight = _traffic(rng, 1.0, AB_MIN_CANARY_RPS)
    p = rng.uniform(0.004, 0.02)
    return rate, weight, p, 5.0 * p


@dataclass(frozen=True, slots=True)
class Scenario:
    draw: Callable[[random.Random], Draw]
    seed: int
    policy: Policy


SCENARIOS: dict[str, Scenario] = {
    "A/A": Scenario(_aa, 20240601, SIM_POLICY),
    "A/B": Scenario(_ab, 20240602, SIM_POLICY),
    "A/A at the budget": Scenario(_aa_budget, 20240603, Policy()),
    "A/B below the range": Scenario(_ab_low, 20240604, SIM_POLICY),
}


def simulate(
    scenario: str,
    runs: int = 1000,
    seed: int | None = None,
    policy: Policy | None = None,
    duration: int = DURATION,
) -> list[Run]:
    """`runs` seeded runs of a named scenario; the same arguments give the same runs."""
    spec = SCENARIOS[scenario]
    rng = random.Random(spec.seed if seed is None else seed)
    policy = spec.policy if policy is None else policy
    out = []
    for _ in range(runs):
        rate, weight, p_s, p_c = spec.draw(rng)
        hit = run_once(rng, policy, rate, weight, p_s, p_c, duration)
        out.append(Run(rate, weight, p_s, p_c, hit))
    return out


def summarize(label: str, runs: list[Run]) -> str:
    """One markdown table row: runs, reverted, rate, median time to detect."""
    hits = [r.detected_at for r in runs if r.detected_at is not None]
    share = f"{100.0 * len(hits) / len(runs):.1f}%" if runs else "-"
    median = f"{statistics.median(hits):.0f} s" if hits else "-"
    return f"| {label} | {len(runs)} | {len(hits)} | {share} | {median} |"


def _band(lo: float, hi: float) -> str:
    return f"≥ {lo:g}" if hi == math.inf else f"{lo:g}–{hi:g}"


def table(results: dict[str, list[Run]]) -> str:
    """The markdown table: one row per batch, then its breakdown by canary traffic."""
    lines = [
        "| batch | runs | reverted | rate | median time to detect |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        lines.append(summarize(f"**{name}**", runs))
        for lo, hi in BANDS:
            part = [r for r in runs if lo <= r.canary_rps < hi]
            if part:
                lines.append(summarize(f"{name}, canary {_band(lo, hi)} req/s", part))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.guard_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=1000, help="runs per batch")
    parser.add_argument("--duration", type=int, default=DURATION, help="seconds per run")
    parser.add_argument("--alpha", type=float, help="override the policies' per-look alpha")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = {}
    for name in args.only or SCENARIOS:
        policy = SCENARIOS[name].policy
        if args.alpha is not None:
            policy = dataclasses.replace(policy, alpha=args.alpha)
        results[name] = simulate(name, args.runs, None, policy, args.duration)
    print(table(results))
    took = time.perf_counter() - started
    alpha = SIM_POLICY.alpha if args.alpha is None else args.alpha
    print(f"\n{args.runs} runs x {args.duration} s, alpha {alpha:g}: {took:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
