"""End-to-end detection speed: how fast does a failing canary get reverted, for real?

    python -m bench.detection                       # weight 10, 200 req/s, 5 runs
    python -m bench.detection --weight 1 --rate 50 --window 60s --min-requests 10 \
        --warmup 8 --warmup-rate 250 --timeout 30   # the 1 % case

Each run starts two upstreams in this process (blue healthy, green with a
switchable fault rate answering 500), Turnout as a subprocess on free loopback
ports with a guard, and a fixed-rate load of random users (a fresh random
`X-User-Id` per request, the sticky key). After a warm-up that fills the guard
window, green starts failing `--fault-rate` of its requests. Per run it prints:

- **detect s**: from the fault switch-on to the first moment after which no
  response carries `X-Turnout-Version: green` (the receive time of the last
  green response). This is what users see.
- **latch s**: from the fault switch-on to the latch's own timestamp in the
  state file (`latch.at`, written by the proxy when the guard tripped).
- **blast radius**: failed (5xx) user requests served by green after the fault
  switch-on: the users hurt before the switch was thrown.

and then the median over the runs. The load is scheduled on a clock (request i
goes out at t0 + i/rate, or at once when late), bounded in time and count, and
only ever sent to 127.0.0.1.

The pieces (`FaultyUpstream`, `Load`, `ProxyProcess`, `measure`) are in
tests/support.py, shared with the test suite (tests/test_guard_live.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

if not __package__:  # run as a script: python bench/detection.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import KEY_HEADER, FaultyUpstream, ProxyProcess, Result, measure  # noqa: E402


def guard_config(
    blue: str, green: str, weight: int, guard: dict[str, Any], release: str = "2.0.0"
) -> dict[str, Any]:
    """A config: blue stable, green canary at `weight`, sticky on X-User-Id, `guard`."""
    return {
        "state_file": "turnout-state.json",
        "stable": "blue",
        "canary": "green",
        "versions": {
            "blue": {"endpoints": [blue]},
            "green": {"endpoints": [green], "release": release},
        },
        "routing": {"weight": weight, "sticky": {"key": f"header:{KEY_HEADER}"}},
        "guard": guard,
    }


async def one_run(args: argparse.Namespace, index: int) -> Result:
    guard = {
        "window": args.window,
        "min_requests": args.min_requests,
        "max_error_rate": args.max_error_rate,
        "relative_to_stable": True,
        "on_breach": "rollback",
    }
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        blue = await FaultyUpstream("blue").start()
        rng = random.Random(args.seed + index) if args.seed is not None else random.Random()
        green = await FaultyUpstream("green", rng=None if args.deterministic else rng).start()
        with tempfile.TemporaryDirectory(prefix="turnout-detect-") as tmp:
            proxy = ProxyProcess(Path(tmp))
            proxy.write_config(guard_config(blue.url, green.url, args.weight, guard))
            try:
                await proxy.spawn(session)
                return await measure(
                    session, proxy.url, proxy.admin_url, proxy.state_path, green,
                    rate=args.rate, warmup=args.warmup, warmup_rate=args.warmup_rate,
                    fault_rate=args.fault_rate, timeout=args.timeout, rng=rng,
                )  # fmt: skip
            finally:
                await proxy.stop()
                await green.stop()
                await blue.stop()


def summarize(results: list[Result]) -> dict[str, Any]:
    detected = [r.detect_s for r in results if r.detect_s is not None]
    return {
        "runs": len(results),
        "reverted": len(detected),
        "detect_s": [None if r.detect_s is None else round(r.detect_s, 3) for r in results],
        "median_detect_s": round(statistics.median(detected), 3) if detected else None,
        "latch_s": [None if r.latch_s is None else round(r.latch_s, 3) for r in results],
        "blast_radius": [r.blast_radius for r in results],
        "median_blast_radius": statistics.median(r.blast_radius for r in results),
        "green_after_latch": sum(r.green_after_latch for r in results),
    }


async def main_async(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict:
    out(
        f"detection: weight {args.weight}%, {args.rate:g} req/s of random users, green fails "
        f"{args.fault_rate:.0%} after a {args.warmup:g} s warm-up; guard window {args.window}, "
        f"min_requests {args.min_requests}, max_error_rate {args.max_error_rate}, "
        f"relative_to_stable; {args.runs} runs"
    )
    results = []
    for i in range(args.runs):
        r = await one_run(args, i)
        results.append(r)
        out(f"run {i + 1}: {r.line()}")
    summary = summarize(results)
    med = summary["median_detect_s"]
    out(
        f"median detect {'n/a' if med is None else f'{med:.2f}'} s over {len(results)} runs "
        f"({summary['reverted']} reverted) · each run: "
        + ", ".join("n/a" if d is None else f"{d:.2f}" for d in summary["detect_s"])
        + " s"
    )
    out(
        f"BLAST RADIUS (failed user requests served by green between the fault and the latch): "
        f"{summary['blast_radius']} (median {summary['median_blast_radius']:g})"
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--weight", type=int, default=10)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of traffic before the fault")
    p.add_argument("--warmup-rate", type=float, default=None, help="default: --rate")
    p.add_argument("--fault-rate", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=10.0, help="give up on a run after this")
    p.add_argument("--window", default="30s")
    p.add_argument("--min-requests", type=int, default=50)
    p.add_argument("--max-error-rate", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=None, help="seed users and faults (run i: seed+i)")
    p.add_argument("--deterministic", action="store_true", help="spread green's faults evenly")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["reverted"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
