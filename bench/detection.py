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

The pieces (`FaultyUpstream`, `drive`, `ProxyProcess`, `measure`) are also
used by tests/test_guard_live.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

if not __package__:  # run as a script: python bench/detection.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
KEY_HEADER = "X-User-Id"
VERSION_HEADER = "X-Turnout-Version"


# ------------------------------------------------------------------------- upstream


class FaultyUpstream:
    """An aiohttp upstream that answers 200, or 500 for `fault_rate` of its requests.

    `fault_rate` can be changed at any time. With `rng=None` the faults are
    spread deterministically (error diffusion: exactly ⌊n·rate⌋ of the first n
    requests fail, evenly), which makes a test reproducible; with an
    `random.Random` each request fails independently with that probability.
    """

    def __init__(self, name: str, fault_rate: float = 0.0, rng: random.Random | None = None):
        self.name = name
        self._fault_rate = fault_rate
        self.rng = rng
        self._debt = 0.0
        self.requests = 0
        self.failed = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def fault_rate(self) -> float:
        return self._fault_rate

    @fault_rate.setter
    def fault_rate(self, rate: float) -> None:
        self._fault_rate = rate
        self._debt = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> FaultyUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0, backlog=512)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _fails(self) -> bool:
        rate = self._fault_rate
        if rate <= 0:
            return False
        if self.rng is not None:
            return self.rng.random() < rate
        self._debt += rate
        if self._debt >= 1.0 - 1e-9:
            self._debt -= 1.0
            return True
        return False

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        if self._fails():
            self.failed += 1
            return web.json_response({"upstream": self.name, "error": "injected"}, status=500)
        return web.json_response({"upstream": self.name, "ok": True})


# ---------------------------------------------------------------------------- load


@dataclass(slots=True)
class Sample:
    sent: float  # time.monotonic() when the request went out
    received: float  # when its response (or failure) came back
    status: int  # 0: the request failed on the client side
    version: str | None  # X-Turnout-Version of the response


@dataclass
class Load:
    """A fixed-rate load of random users; the samples of every request it sent."""

    url: str
    rate: float
    rng: random.Random = field(default_factory=random.Random)
    max_in_flight: int = 256
    samples: list[Sample] = field(default_factory=list)
    late: int = 0  # sends that went out more than 50 ms behind their schedule
    skipped: int = 0  # scheduled sends dropped because max_in_flight were outstanding

    async def drive(
        self,
        session: aiohttp.ClientSession,
        duration: float,
        stop: asyncio.Event | None = None,
        rate: float | None = None,
    ) -> None:
        """Send at `rate` (default self.rate) for `duration` s or until `stop` is set."""
        rate = rate or self.rate
        count = max(1, math.ceil(rate * duration))  # the hard bound on requests
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: set[asyncio.Task] = set()
        for i in range(count):
            if stop is not None and stop.is_set():
                break
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                self.late += 1
            if len(tasks) >= self.max_in_flight:
                self.skipped += 1
                continue
            task = loop.create_task(self.one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()

    async def one(self, session: aiohttp.ClientSession) -> None:
        user = f"u{self.rng.getrandbits(48):012x}"
        sent = time.monotonic()
        try:
            async with session.get(self.url + "/", headers={KEY_HEADER: user}) as r:
                await r.read()
                status, version = r.status, r.headers.get(VERSION_HEADER)
        except (aiohttp.ClientError, TimeoutError, OSError):
            status, version = 0, None
        self.samples.append(Sample(sent, time.monotonic(), status, version))


# ---------------------------------------------------------------------------- proxy


class ProxyProcess:
    """`python -m proxy run -c FILE` on free loopback ports, its config in `workdir`.

    Also the base of the test suite's `Proxy` (tests/conftest.py), which adds
    admin helpers: starting, waiting for /readyz and stopping live here only.
    """

    def __init__(self, workdir: Path, config_path: Path | None = None) -> None:
        self.workdir = workdir
        self.port, self.admin_port = free_ports(2)
        self.config_path = config_path or workdir / "turnout.yaml"
        self.log_path = workdir / f"proxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_path(self) -> Path:
        """Where `guard_config` puts the state file (beside the config)."""
        return self.config_path.parent / "turnout-state.json"

    # -- config ---------------------------------------------------------------------

    def render(self, config: dict[str, Any] | str) -> str:
        """The YAML text for `config` with this proxy's listen and admin addresses.

        A dict gets `listen`, `admin.listen` and a short drain timeout filled in
        (unless given); text gets the two addresses prepended (three lines).
        """
        listen, admin = f"{LOOPBACK}:{self.port}", f"{LOOPBACK}:{self.admin_port}"
        if isinstance(config, str):
            return f"listen: {listen}\nadmin:\n  listen: {admin}\n" + config
        cfg = dict(config)
        cfg["listen"] = listen
        cfg["admin"] = {"listen": admin}
        limits = dict(cfg.get("limits") or {})
        limits.setdefault("drain_timeout", "3s")
        cfg["limits"] = limits
        return yaml.safe_dump(cfg, sort_keys=False)

    def write_config(self, config: dict[str, Any] | str, atomic: bool = True) -> str:
        """Write the config file (by default atomically, via rename); returns the text."""
        text = self.render(config)
        if atomic:
            tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.config_path)
        else:
            self.config_path.write_text(text)
        return text

    # -- process --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    async def spawn(
        self,
        session: aiohttp.ClientSession,
        timeout: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start the process (`env`: its whole environment) and wait for /readyz."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config_path)],
                cwd=REPO,
                env=env if env is not None else dict(os.environ, PYTHONUNBUFFERED="1"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(self.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.02)
        raise RuntimeError(f"proxy not ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.proc.poll()

    async def stop(self) -> int | None:
        """SIGTERM, up to 10 s to drain, then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        code = await self.wait(10.0)
        if code is None:
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait, 5)
        return code


# ----------------------------------------------------------------------- measuring


@dataclass
class Result:
    """One run: what the users saw after the fault was switched on."""

    detect_s: float | None  # fault -> receive time of the last green response
    latch_s: float | None  # fault -> latch.at in the state file
    blast_radius: int  # green 5xx responses after the fault
    green_after_fault: int  # all green responses after the fault (the blast radius's base)
    green_after_latch: int  # green responses to requests sent after the latch
    canary_at_fault: int  # green requests in the window when the fault began
    requests: int  # all requests sent
    client_errors: int  # requests with no HTTP answer
    late: int
    skipped: int
    latched: bool  # /status rollback.active at the end
    reason: str | None  # /status rollback.reason
    evidence: dict | None  # /status rollback.evidence

    def line(self) -> str:
        def s(x: float | None) -> str:
            return "  n/a" if x is None else f"{x:5.2f}"

        return (
            f"detect {s(self.detect_s)} s · latch {s(self.latch_s)} s · "
            f"blast radius {self.blast_radius:3d} of {self.green_after_fault:3d} green · "
            f"green after latch {self.green_after_latch} · "
            f"canary at fault {self.canary_at_fault} · requests {self.requests}"
            f"{f' · client errors {self.client_errors}' if self.client_errors else ''}"
            f"{f' · late {self.late}' if self.late else ''}"
        )


async def _status(session: aiohttp.ClientSession, admin_url: str) -> dict:
    async with session.get(admin_url + "/status") as r:
        r.raise_for_status()
        return await r.json()


async def measure(
    session: aiohttp.ClientSession,
    proxy_url: str,
    admin_url: str,
    state_path: Path | str,
    green: FaultyUpstream,
    *,
    rate: float = 200.0,
    warmup: float = 4.0,
    warmup_rate: float | None = None,
    fault_rate: float = 0.5,
    timeout: float = 10.0,
    tail: float = 1.0,
    rng: random.Random | None = None,
) -> Result:
    """Warm up, switch green's fault on, wait for the latch (bounded), keep the load
    `tail` more seconds, and read what the users saw."""
    load = Load(proxy_url, rate, rng or random.Random())
    await load.drive(session, warmup, rate=warmup_rate)
    canary_at_fault = sum(1 for s in load.samples if s.version == "green")
    stop = asyncio.Event()
    driving = asyncio.get_running_loop().create_task(
        load.drive(session, timeout + tail + 1, stop=stop)
    )
    await asyncio.sleep(0.2)  # the steady load is running before the fault starts
    fault_mono, fault_wall = time.monotonic(), time.time()
    green.fault_rate = fault_rate
    doc: dict = {}
    try:
        deadline = fault_mono + timeout
        while time.monotonic() < deadline:
            doc = await _status(session, admin_url)
            if doc["rollback"]["active"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(tail)
    finally:
        stop.set()
        await driving
    green.fault_rate = 0.0
    doc = await _status(session, admin_url)
    latch_at = _latch_at(state_path)
    latch_s = None if latch_at is None else latch_at - fault_wall
    after = [s for s in load.samples if s.received >= fault_mono]
    green_after = [s for s in after if s.version == "green"]
    detect_s = max((s.received for s in green_after), default=fault_mono) - fault_mono
    latch_mono = fault_mono + latch_s if latch_s is not None else math.inf
    return Result(
        detect_s=detect_s if doc["rollback"]["active"] else None,
        latch_s=latch_s,
        blast_radius=sum(1 for s in green_after if s.status >= 500),
        green_after_fault=len(green_after),
        green_after_latch=sum(1 for s in green_after if s.sent > latch_mono),
        canary_at_fault=canary_at_fault,
        requests=len(load.samples),
        client_errors=sum(1 for s in load.samples if s.status == 0),
        late=load.late,
        skipped=load.skipped,
        latched=doc["rollback"]["active"],
        reason=doc["rollback"]["reason"],
        evidence=doc["rollback"]["evidence"],
    )


def _latch_at(path: Path | str) -> float | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    latch = doc.get("latch") or {}
    return latch.get("at") if latch.get("active") else None


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
