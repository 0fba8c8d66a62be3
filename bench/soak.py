"""Fault soak: the proxy under reloads, upstream crashes, kills and broken state files.

    python -m bench.soak                          # every scenario, full size (make soak)
    python -m bench.soak --quick                  # small sizes, a few seconds a scenario
    python -m bench.soak --only reloads,connections --reloads 200

Scenarios (SCENARIOS, in order), each with a bound it must keep:

- reloads: config reloads under keep-alive load, by every method — an atomic
  file rewrite, SIGHUP, POST /reload, and Kubernetes ConfigMap symlink swaps
  (`turnout.yaml -> ..data/turnout.yaml`, `..data -> ..2026_NN`, `..data`
  replaced atomically) — some of them invalid. Bound: no request fails, every
  invalid config is rejected with the old one kept in force, and the
  generation count ends equal to the number of valid reloads.
- canary: the canary's upstream is killed (SIGKILL) under load on both
  versions and started again on the same port about a second later. Bound: no
  request of a stable user fails, and the canary serves again (bounded wait).
  The canary's errors and how many seconds they lasted are reported.
- kill9: POST /rollback, SIGKILL the proxy, start it again: still latched,
  and every user (canary users included) is served by stable.
- corrupt: garbage in the state file at start: the proxy starts latched, and
  /status says that the state file is the reason.
- readonly: the state file cannot be written when POST /rollback arrives: the
  latch holds in memory (traffic goes to stable) and /status shows an error.
- connections: thousands of concurrent keep-alive connections, a few requests
  each: no errors; the proxy's peak RSS (VmRSS) is reported.

Each scenario prints one line, `soak: <scenario>: N=..., failures=..., time=...s, ...`,
ready to paste into the README, and a `FAIL` line per broken bound; the exit
status is 1 when any bound broke, 2 when the harness itself could not run.

Rules: everything listens on and talks to 127.0.0.1 only. Every loop is bounded
in count and in time, and conditions are awaited by bounded polling; no bound is
a timing. Every process started here (proxies, bench/upstream.py) is stopped by
its own PID, never by name. The proxy runs from this checkout (`python -m
proxy`, cwd = the repository). tests/test_soak.py runs the quick sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

if not __package__:  # run as a script: python bench/soak.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import BenchError, Processes, tail  # noqa: E402
from tests.support import (  # noqa: E402
    KEY_HEADER,
    VERSION_HEADER,
    FaultyUpstream,
    ProxyProcess,
    free_ports,
)

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
UPSTREAM_PY = REPO / "bench" / "upstream.py"


@dataclass(frozen=True)
class Sizes:
    reloads: int  # config reloads in `reloads`, split between the two file layouts
    reload_clients: int  # concurrent keep-alive clients during the reloads
    canary_warmup: float  # seconds of load before the canary is killed
    canary_down: float  # seconds the canary stays dead
    kills: int  # SIGKILL-and-restart cycles in `kill9`
    connections: int  # concurrent keep-alive connections in `connections`
    per_connection: int  # requests on each of them


FULL = Sizes(
    reloads=100, reload_clients=4, canary_warmup=2.0, canary_down=1.0,
    kills=3, connections=5000, per_connection=3,
)  # fmt: skip
QUICK = Sizes(
    reloads=10, reload_clients=3, canary_warmup=0.5, canary_down=1.0,
    kills=1, connections=300, per_connection=3,
)  # fmt: skip

STEP_TIMEOUT = 6.0  # a reload must show in /status within this (the watcher's poll is 2 s)
START_TIMEOUT = 20.0  # a proxy must answer /readyz within this


# ---------------------------------------------------------------------------- outcome


@dataclass
class Outcome:
    """One scenario's figures; `problems` lists every bound it broke."""

    scenario: str
    n: int = 0
    failures: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    harness_error: bool = False  # the scenario could not run at all (not a broken bound)
    logs: list[Path] = field(default_factory=list)  # logs worth reading when it failed

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        figures = "".join(f", {k}={v}" for k, v in self.extra.items())
        return (
            f"soak: {self.scenario}: N={self.n}, failures={self.failures}, "
            f"time={self.seconds:.1f}s{figures}"
        )

    def report(self) -> str:
        lines = [self.line()]
        lines += [f"soak: {self.scenario}: FAIL: {p}" for p in self.problems]
        if self.problems:
            lines += [f"soak: {self.scenario}: log {log}:\n{tail(log, 25)}" for log in self.logs]
        return "\n".join(lines)


class Context:
    """What a scenario gets: a folder of its own, the sizes, a registry of children."""

    def __init__(self, workdir: Path, sizes: Sizes) -> None:
        self.workdir = workdir
        self.sizes = sizes
        self.procs = Processes(workdir)
        self.proxies: list[ProxyProcess] = []

    def proxy(self, name: str) -> ProxyProcess:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        p = ProxyProcess(folder)
        self.proxies.append(p)
        return p

    async def close(self) -> None:
        for p in reversed(self.proxies):
            with contextlib.suppress(Exception):
                await p.stop()
        await asyncio.to_thread(self.procs.stop_all, 3.0)


# ---------------------------------------------------------------------------- helpers


async def poll(
    probe: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.02
) -> tuple[bool, Any]:
    """Await `probe()` until it is truthy or `timeout` passes: (met, last value).
    A probe that raises counts as not yet (the proxy may be restarting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            last = exc
        else:
            if last:
                return True, last
        if time.monotonic() >= deadline:
            return False, last
        await asyncio.sleep(interval)


async def status(session: aiohttp.ClientSession, proxy: ProxyProcess) -> dict:
    async with session.get(proxy.admin_url + "/status") as r:
        r.raise_for_status()
        return await r.json()


async def post(
    session: aiohttp.ClientSession, proxy: ProxyProcess, path: str, body: dict | None = None
) -> tuple[int, Any]:
    async with session.post(proxy.admin_url + path, json=body or {}) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def users_by_version(
    session: aiohttp.ClientSession, proxy: ProxyProcess, each: int = 8, tries: int = 400
) -> dict[str, list[str]]:
    """Sticky keys the proxy routes to each version now (asked through /explain), so
    a request's intended version is known even when it fails without an answer."""
    found: dict[str, list[str]] = {}
    for i in range(tries):
        key = f"soak-user-{i}"
        async with session.get(proxy.admin_url + "/explain", params={"key": key}) as r:
            version = (await r.json())["version"]
        pool = found.setdefault(version, [])
        if len(pool) < each:
            pool.append(key)
        if len(found) >= 2 and all(len(v) >= each for v in found.values()):
            break
    return found


def routing(weight: int) -> dict[str, Any]:
    return {"weight": weight, "sticky": {"key": f"header:{KEY_HEADER}", "anonymous": "stable"}}


def config(blue: str, green: str, weight: int, state_file: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "state_file": str(state_file),
        "stable": "blue",
        "canary": "green",
        "versions": {
            "blue": {"endpoints": [blue]},
            "green": {"endpoints": [green], "release": "2.0.0"},
        },
        "routing": routing(weight),
    }
    cfg.update(extra)
    return cfg


def proxy_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TURNOUT_TOKEN", None)  # the admin API is used without tokens, from loopback
    return env


async def spawn(proxy: ProxyProcess, session: aiohttp.ClientSession) -> None:
    await proxy.spawn(session, START_TIMEOUT, proxy_env())


async def kill9(proxy: ProxyProcess) -> None:
    """SIGKILL the proxy by its PID and reap it (no drain, no goodbye)."""
    assert proxy.proc is not None
    proxy.signal(signal.SIGKILL)
    await asyncio.to_thread(proxy.proc.wait, 10)


@dataclass(slots=True)
class Hit:
    at: float  # time.monotonic() when the answer (or the failure) came back
    want: str | None  # the version the user is routed to, when known
    status: int  # 0: no HTTP answer
    version: str | None  # X-Turnout-Version of the answer
    error: str | None = None


class KeepAliveLoad:
    """`clients` loops, each on its own keep-alive connection (a connector with that
    many slots), sending GETs with a sticky key from its pool until stopped.

    Bounded: each loop stops at `stop`, at `max_seconds`, or after `max_requests`.
    A short pause between requests leaves the proxy CPU for the admin API and
    the reloads on a small machine.
    """

    def __init__(
        self,
        url: str,
        pools: dict[str | None, list[str]],
        clients: int,
        max_seconds: float,
        max_requests: int = 200_000,
        pause: float = 0.002,
    ) -> None:
        self.url = url
        self.pools = pools
        self.clients = clients
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.pause = pause
        self.hits: list[Hit] = []
        self.stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def finish(self) -> None:
        self.stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.clients, force_close=False)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            wants = list(self.pools)
            await asyncio.gather(
                *(self._client(session, wants[i % len(wants)], i) for i in range(self.clients))
            )

    async def _client(self, session: aiohttp.ClientSession, want: str | None, seed: int) -> None:
        rng = random.Random(seed)
        keys = self.pools[want]
        deadline = time.monotonic() + self.max_seconds
        per_client = self.max_requests // self.clients
        for i in range(per_client):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            headers = {KEY_HEADER: rng.choice(keys)} if keys else {}
            try:
                async with session.get(f"{self.url}/soak/{seed}/{i}", headers=headers) as r:
                    await r.read()
                    hit = Hit(time.monotonic(), want, r.status, r.headers.get(VERSION_HEADER))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                hit = Hit(time.monotonic(), want, 0, None, f"{type(exc).__name__}: {exc}")
            self.hits.append(hit)
            await asyncio.sleep(self.pause)

    def failed(self, want: str | None = None) -> list[Hit]:
        """The requests without a 200, of users routed to `want` (None: of everyone)."""
        return [h for h in self.hits if h.status != 200 and (want is None or h.want == want)]


def tally(items: Any) -> str:
    """`a:3 b:1`: how often each item occurs, for a summary line."""
    return " ".join(f"{k}:{c}" for k, c in sorted(Counter(items).items())) or "-"


def describe(hits: list[Hit], limit: int = 3) -> str:
    shown = [h.error or f"HTTP {h.status} from {h.version}" for h in hits[:limit]]
    return "; ".join(shown) + (" ..." if len(hits) > limit else "")


async def through_proxy(
    session: aiohttp.ClientSession, proxy: ProxyProcess, keys: list[str], rounds: int = 3
) -> Counter[str]:
    """Send each key `rounds` times; count the versions that answered (or the failures)."""
    seen: Counter[str] = Counter()
    for _ in range(rounds):
        for key in keys:
            try:
                async with session.get(proxy.url + "/", headers={KEY_HEADER: key}) as r:
                    await r.read()
                    seen[
                        r.headers.get(VERSION_HEADER, "?") if r.status == 200 else str(r.status)
                    ] += 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                seen[type(exc).__name__] += 1
    return seen


def start_upstream(ctx: Context, name: str, port: int, run: int = 0) -> subprocess.Popen[bytes]:
    """bench/upstream.py as a child process (it can be SIGKILLed, unlike an in-loop app)."""
    argv = [sys.executable, str(UPSTREAM_PY), "--listen", f"{name}={LOOPBACK}:{port}"]
    proc, _ = ctx.procs.start(f"upstream-{name}-{port}-{run}", argv, cwd=REPO)
    return proc


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"upstream on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        if time.monotonic() > deadline:
            raise BenchError(f"upstream did not listen on {LOOPBACK}:{port} within {timeout:g}s")
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def raise_nofile(need: int) -> int:
    """Raise this process's open-file limit towards `need` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# ---------------------------------------------------------------------------- reloads


class ConfigFiles:
    """The config file in one of two layouts, written the way operators do it.

    plain: `turnout.yaml` is a regular file, replaced whole (temp file + rename,
    as editors and config management do; an in-place write could be read half
    done, and a truncated YAML can be a valid, different config).
    configmap: what the kubelet makes of a ConfigMap volume: `turnout.yaml ->
    ..data/turnout.yaml`, `..data -> ..2026_NN/`; an update writes a new
    `..2026_NN/`, swaps `..data` with one rename and removes the old folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = path.parent
        self.seq = 0

    def write_plain(self, text: str) -> None:
        tmp = self.folder / f".{self.path.name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def swap_data(self, text: str) -> None:
        self.seq += 1
        new = self.folder / f"..2026_{self.seq:02d}"
        new.mkdir()
        (new / self.path.name).write_text(text)
        data = self.folder / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.folder / "..data_tmp"
        os.symlink(new.name, tmp)
        os.replace(tmp, data)
        if not self.path.is_symlink():
            # first swap: the plain file becomes the ConfigMap's link, in one rename
            link = self.folder / f".{self.path.name}.link"
            os.symlink(f"..data/{self.path.name}", link)
            os.replace(link, self.path)
        if old is not None:
            shutil.rmtree(self.folder / old)


def reload_plan(n: int) -> list[tuple[str, bool]]:
    """(method, valid) for n reloads: the first half on a plain file, the second half
    on the ConfigMap layout. Every method reloads both valid and invalid configs.

    A valid SIGHUP or POST /reload re-reads the file in force unchanged (they
    always reload, so each is exactly one generation); new content rides on the
    file and symlink methods, which the watcher must notice on its own. So the
    step after an invalid one always writes valid content by the layout's method.
    """
    cycle = [
        ("C", True), ("sighup", True), ("post", True), ("C", False),
        ("C", True), ("sighup", False), ("C", True), ("post", False),
    ]  # fmt: skip
    half = n // 2
    plan = []
    for phase, count in (("file", half), ("symlink", n - half)):
        for i in range(count):
            method, valid = cycle[i % len(cycle)]
            plan.append((phase if method == "C" else method, valid))
    return plan


def invalid_text(proxy: ProxyProcess, cfg: dict[str, Any], kind: int) -> str:
    """One of four broken configs: out of range, a typo, bad YAML, an unknown version."""
    bad = json.loads(json.dumps(cfg))
    if kind == 0:
        bad["routing"]["weight"] = 150
    elif kind == 1:
        bad["routing"]["wieght"] = bad["routing"].pop("weight")
    elif kind == 2:
        return proxy.render(cfg) + "routing: {weight: [10,\n"
    else:
        bad["canary"] = "purple"
    return proxy.render(bad)


async def scenario_reloads(ctx: Context) -> Outcome:
    out = Outcome("reloads")
    t0 = time.monotonic()
    blue = await FaultyUpstream("blue").start()
    green = await FaultyUpstream("green").start()
    timeout = aiohttp.ClientTimeout(total=10)
    load: KeepAliveLoad | None = None
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            proxy = ctx.proxy("reloads")
            out.logs.append(proxy.log_path)
            state_dir = proxy.workdir / "state"
            state_dir.mkdir()
            files = ConfigFiles(proxy.config_path)
            weight = 50

            def valid(w: int) -> dict[str, Any]:
                return config(blue.url, green.url, w, state_dir / "turnout-state.json")

            files.write_plain(proxy.render(valid(weight)))
            await spawn(proxy, session)
            doc = await status(session, proxy)
            generation = doc["config"]["generation"]
            keys = [f"k{i}" for i in range(64)]  # many users: both versions at any weight
            load = KeepAliveLoad(proxy.url, {None: keys}, ctx.sizes.reload_clients, 600)
            load.start()
            plan = reload_plan(ctx.sizes.reloads)
            methods: Counter[str] = Counter()
            bad_steps: list[str] = []
            rejected = 0
            for step, (method, ok) in enumerate(plan):
                if time.monotonic() - t0 > 60 + 4 * len(plan):
                    bad_steps.append(f"gave up at step {step}: the scenario ran out of time")
                    break
                methods[method] = methods[method] + 1
                layout = "file" if step < len(plan) // 2 else "symlink"
                before = await status(session, proxy)
                failures_before = before["config"]["reloads"].get("failure", 0)
                if ok and method in ("file", "symlink"):
                    weight = 10 + (weight + 37) % 81  # a new weight, 10..90: new bytes
                text = (
                    proxy.render(valid(weight)) if ok else invalid_text(proxy, valid(weight), step)
                )
                if method in ("file", "symlink") or not ok:
                    # new content by the layout's own method (for SIGHUP/POST: the broken one)
                    (files.write_plain if layout == "file" else files.swap_data)(text)
                if method == "sighup":
                    proxy.signal(signal.SIGHUP)
                elif method == "post":
                    code, body = await post(session, proxy, "/reload")
                    if (code == 200) != ok:
                        bad_steps.append(f"step {step} post: HTTP {code} {str(body)[:200]}")
                where = f"step {step} ({method}, {'valid' if ok else 'invalid'})"
                if ok:
                    generation += 1
                    met, last = await poll(
                        functools.partial(_generation_is, session, proxy, generation),
                        STEP_TIMEOUT,
                    )
                    if not met:
                        bad_steps.append(f"{where}: generation {last}, expected {generation}")
                        generation = await _generation(session, proxy)  # go on from here
                else:
                    met, last = await poll(
                        functools.partial(_rejected_since, session, proxy, failures_before),
                        STEP_TIMEOUT,
                    )
                    rejected += bool(met)
                    if not met:
                        bad_steps.append(f"{where}: no rejection counted within {STEP_TIMEOUT}s")
                after = await status(session, proxy)
                if after["config"]["generation"] != generation:
                    bad_steps.append(
                        f"{where}: generation {after['config']['generation']}, "
                        f"expected {generation}"
                    )
                    generation = after["config"]["generation"]
                if after["weight"]["configured"] != weight:
                    bad_steps.append(
                        f"{where}: weight {after['weight']['configured']} in force, expected "
                        f"{weight} (the {'new' if ok else 'old'} config)"
                    )
                if not ok and not after["config"].get("last_error"):
                    bad_steps.append(f"{where}: /status config.last_error is empty")
            await load.finish()
            final = await status(session, proxy)
            valid_reloads = sum(1 for _, ok in plan if ok)
            generations = final["config"]["generation"] - 1
            successes = final["config"]["reloads"].get("success", 0)
            failed = load.failed()
            out.n = len(plan)
            out.failures = len(failed)
            out.extra = {
                "requests": len(load.hits),
                "generations": f"{generations}/{valid_reloads}",
                "rejected": f"{rejected}/{len(plan) - valid_reloads}",
                "methods": tally(methods.elements()),
                "bad_steps": len(bad_steps),
                "by_version": tally(h.version for h in load.hits if h.version),
            }
            if failed:
                out.problems.append(f"{len(failed)} requests failed: {describe(failed)}")
            if generations != valid_reloads or successes != valid_reloads:
                out.problems.append(
                    f"{generations} new generations and {successes} successful reloads "
                    f"counted for {valid_reloads} valid reloads"
                )
            out.problems += bad_steps[:10]
            if len(bad_steps) > 10:
                out.problems.append(f"... and {len(bad_steps) - 10} more bad steps")
    finally:
        if load is not None:
            with contextlib.suppress(Exception):
                await load.finish()
        await ctx.close()
        await green.stop()
        await blue.stop()
    out.seconds = time.monotonic() - t0
    return out


async def _generation(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    return (await status(session, proxy))["config"]["generation"]


async def _generation_is(session: aiohttp.ClientSession, proxy: ProxyProcess, want: int) -> Any:
    got = await _generation(session, proxy)
    return True if got == want else (got if got > want else False)


async def _rejected_since(session: aiohttp.ClientSession, proxy: ProxyProcess, n: int) -> bool:
    doc = await status(session, proxy)
    return doc["config"]["reloads"].get("failure", 0) > n


# ----------------------------------------------------------------------------- canary


async def scenario_canary(ctx: Context) -> Outcome:
    out = Outcome("canary")
    t0 = time.monotonic()
    sizes = ctx.sizes
    blue_port, green_port = free_ports(2)
    load: KeepAliveLoad | None = None
    try:
        blue = start_upstream(ctx, "blue", blue_port)
        green = start_upstream(ctx, "green", green_port)
        await wait_listening(blue_port, blue, 10)
        await wait_listening(green_port, green, 10)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            proxy = ctx.proxy("canary")
            out.logs.append(proxy.log_path)
            cfg = config(
                f"http://{LOOPBACK}:{blue_port}", f"http://{LOOPBACK}:{green_port}", 50,
                proxy.workdir / "turnout-state.json",
            )  # fmt: skip
            proxy.write_config(cfg)
            await spawn(proxy, session)
            pools = await users_by_version(session, proxy)
            if set(pools) != {"blue", "green"}:
                raise BenchError(f"/explain did not give users on both versions: {pools}")
            load = KeepAliveLoad(proxy.url, dict(pools), 6, 120)
            load.start()
            await asyncio.sleep(sizes.canary_warmup)
            killed = time.monotonic()
            green.kill()  # SIGKILL by PID: its connections are reset, nothing is drained
            await asyncio.to_thread(green.wait, 10)
            await asyncio.sleep(sizes.canary_down)
            green = start_upstream(ctx, "green", green_port, run=1)
            await wait_listening(green_port, green, 10)
            restarted = time.monotonic()

            # recovered: green users answered 200 by green for a while after the restart
            async def recovered() -> bool:
                recent = [h for h in load.hits if h.want == "green" and h.at > restarted]
                bad = [h for h in recent if h.status != 200]
                last_bad = bad[-1].at if bad else restarted
                good = [h for h in recent if h.at > last_bad and h.status == 200]
                return len(good) >= 50 and time.monotonic() - last_bad > 0.5

            back, _ = await poll(recovered, 20, 0.05)
            await load.finish()
    finally:
        if load is not None:
            with contextlib.suppress(Exception):
                await load.finish()
        await ctx.close()
    hits = load.hits if load is not None else []
    blue_failed = load.failed("blue") if load is not None else []
    green_failed = load.failed("green") if load is not None else []
    err_times = [h.at for h in green_failed]
    out.n = len(hits)
    out.failures = len(blue_failed)
    out.extra = {
        "stable_requests": sum(1 for h in hits if h.want == "blue"),
        "canary_requests": sum(1 for h in hits if h.want == "green"),
        "canary_errors": len(green_failed),
        "canary_error_s": f"{(max(err_times) - min(err_times)) if err_times else 0:.2f}",
        "down_s": f"{restarted - killed:.2f}",
        "canary_errors_after_restart_s": (
            f"{max(0.0, max(err_times) - restarted):.2f}" if err_times else "0.00"
        ),
        "canary_error_kinds": tally(
            h.error.split(":")[0] if h.error else str(h.status) for h in green_failed
        ),
    }  # fmt: skip
    if blue_failed:
        out.problems.append(f"{len(blue_failed)} stable requests failed: {describe(blue_failed)}")
    if not back:
        out.problems.append("the canary did not serve again within 20 s of its restart")
    wrong = [h for h in hits if h.status == 200 and h.version != h.want]
    if wrong:
        out.problems.append(f"{len(wrong)} answers from the wrong version (sticky users moved)")
    out.seconds = time.monotonic() - t0
    return out


# ------------------------------------------------------------------------------ kill9


async def scenario_kill9(ctx: Context) -> Outcome:
    out = Outcome("kill9")
    t0 = time.monotonic()
    blue = await FaultyUpstream("blue").start()
    green = await FaultyUpstream("green").start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            proxy = ctx.proxy("kill9")
            out.logs.append(proxy.log_path)
            proxy.write_config(
                config(blue.url, green.url, 50, proxy.workdir / "turnout-state.json")
            )
            await spawn(proxy, session)
            pools = await users_by_version(session, proxy, each=10)
            everyone = pools.get("blue", []) + pools.get("green", [])
            reason = "soak: kill -9 with the latch set"
            code, body = await post(session, proxy, "/rollback", {"reason": reason})
            if code != 200:
                out.problems.append(f"POST /rollback: HTTP {code} {str(body)[:200]}")
            served: Counter[str] = Counter()
            for cycle in range(ctx.sizes.kills):
                await kill9(proxy)
                await spawn(proxy, session)
                doc = await status(session, proxy)
                latch = doc["rollback"]
                seen = await through_proxy(session, proxy, everyone)
                served.update(seen)
                out.n += 1
                if not latch["active"]:
                    out.failures += 1
                    out.problems.append(f"restart {cycle + 1}: not latched ({latch})")
                elif latch.get("reason") != reason:
                    out.problems.append(f"restart {cycle + 1}: reason {latch.get('reason')!r}")
                if set(seen) != {"blue"}:
                    out.failures += 1
                    out.problems.append(f"restart {cycle + 1}: answered by {dict(seen)}")
            out.extra = {
                "requests": sum(served.values()),
                "served": tally(served.elements()),
                "canary_users": len(pools.get("green", [])),
            }
    finally:
        await ctx.close()
        await green.stop()
        await blue.stop()
    out.seconds = time.monotonic() - t0
    return out


# ---------------------------------------------------------------------------- corrupt

GARBAGE = {
    "binary": b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n",
    "truncated": b'{"version": 1, "release": "2.0.0", "latch": {"active": fal',
    "empty": b"",
    "wrong-shape": b'{"version": 1, "latch": "yes"}\n',
}


async def scenario_corrupt(ctx: Context) -> Outcome:
    out = Outcome("corrupt")
    t0 = time.monotonic()
    blue = await FaultyUpstream("blue").start()
    green = await FaultyUpstream("green").start()
    reasons = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for kind, garbage in GARBAGE.items():
                out.n += 1
                proxy = ctx.proxy(f"corrupt-{kind}")
                out.logs.append(proxy.log_path)
                state_path = proxy.workdir / "turnout-state.json"
                proxy.write_config(config(blue.url, green.url, 100, state_path))
                state_path.write_bytes(garbage)
                try:
                    await spawn(proxy, session)
                except RuntimeError as exc:
                    out.failures += 1
                    out.problems.append(f"{kind}: the proxy did not start: {str(exc)[:300]}")
                    continue
                latch = (await status(session, proxy))["rollback"]
                reason = latch.get("reason") or ""
                reasons.append(reason.replace(str(state_path), state_path.name))
                seen = await through_proxy(session, proxy, ["a", "b", "c"], rounds=2)
                await proxy.stop()
                problems = []
                if not latch["active"]:
                    problems.append("not latched")
                if "state" not in reason.lower():
                    problems.append(f"the reason does not name the state file: {reason!r}")
                if set(seen) != {"blue"}:  # weight 100: without the latch all would be green
                    problems.append(f"answered by {dict(seen)}")
                if problems:
                    out.failures += 1
                    out.problems.append(f"{kind}: " + "; ".join(problems))
    finally:
        await ctx.close()
        await green.stop()
        await blue.stop()
    out.extra = {
        "kinds": ",".join(GARBAGE),
        "reason": repr(_short(reasons[0] if reasons else "", 90)),
    }
    out.seconds = time.monotonic() - t0
    return out


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- readonly


def make_unwritable(folder: Path, state_path: Path) -> str:
    """Make the state file impossible to replace; the name of the trick used.

    chmod 0555 on the folder is what an operator would see, but root (as in CI
    containers) writes through it. Then the state file itself is replaced by a
    directory of the same name: the atomic save's rename of a temp file over a
    directory fails (EISDIR) for root as for anyone, so the write fails at the
    step that matters while the folder stays as it was.
    """
    folder.chmod(0o555)
    probe = folder / ".soak-probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return "chmod-0555"
    probe.unlink()
    folder.chmod(0o755)
    state_path.unlink(missing_ok=True)
    state_path.mkdir()
    return "state-file-is-a-directory"


def state_error_visible(doc: dict) -> tuple[bool, str]:
    """Whether /status shows that the state is not on disk, and where.

    Tolerant of the shape: a `state` section with `persisted: false` or an error
    string, or else any error-like string elsewhere that names the state file
    (the latch's own reason, which the harness wrote, does not count).
    """
    section = doc.get("state")
    if isinstance(section, dict) and (section.get("persisted") is False or section.get("error")):
        return True, "status.state"
    hits: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if where == "" and k == "rollback":
                    continue
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            low = node.lower()
            if "state" in low and any(w in low for w in ("cannot", "error", "fail", "denied")):
                hits.append(where)

    walk(doc, "")
    return (True, "status." + hits[0]) if hits else (False, "nowhere in /status")


def status_shape(doc: dict) -> str:
    section = doc.get("state")
    if isinstance(section, dict):
        return "state{" + ",".join(section) + "}"
    return "no state section" if section is None else f"state={type(section).__name__}"


async def scenario_readonly(ctx: Context) -> Outcome:
    out = Outcome("readonly")
    t0 = time.monotonic()
    blue = await FaultyUpstream("blue").start()
    green = await FaultyUpstream("green").start()
    folder: Path | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            proxy = ctx.proxy("readonly")
            out.logs.append(proxy.log_path)
            folder = proxy.workdir / "state"
            folder.mkdir()
            state_path = folder / "turnout-state.json"
            proxy.write_config(config(blue.url, green.url, 100, state_path))
            await spawn(proxy, session)
            trick = make_unwritable(folder, state_path)
            code, body = await post(session, proxy, "/rollback", {"reason": "soak: read-only"})
            doc = await status(session, proxy)
            # the error may be reported a moment after the answer: bounded wait for it
            seen_it, found = await poll(lambda: _error_in_status(session, proxy), 3.0, interval=0.1)
            if seen_it:
                doc, where = found
            else:
                where = state_error_visible(doc)[1]
            events = await _events_mentioning_state(session, proxy)
            seen = await through_proxy(session, proxy, ["a", "b", "c", "d"], rounds=3)
            out.n = sum(seen.values())
            out.failures = sum(c for k, c in seen.items() if k != "blue")
            out.extra = {
                "trick": trick,
                "rollback_http": code,
                "latched": doc["rollback"]["active"],
                "error_in": where,
                "events_with_error": events,
                "shape": status_shape(doc),
            }
            if not doc["rollback"]["active"]:
                out.problems.append("the latch is not active in memory after POST /rollback")
            if out.failures:
                out.problems.append(f"not all traffic on stable: {dict(seen)}")
            if not seen_it:
                out.problems.append(
                    "/status shows no state-file error (latch "
                    f"{'held' if doc['rollback']['active'] else 'lost'}; {status_shape(doc)}; "
                    f"POST /rollback answered {code}; /events entries naming it: {events})"
                )
            out.extra["rollback_answer"] = repr(_short(str(_strip_status(body)), 80))
    finally:
        if folder is not None:
            with contextlib.suppress(OSError):
                folder.chmod(0o755)  # so the work folder can be removed
        await ctx.close()
        await green.stop()
        await blue.stop()
    out.seconds = time.monotonic() - t0
    return out


async def _error_in_status(
    session: aiohttp.ClientSession, proxy: ProxyProcess
) -> tuple[dict, str] | None:
    doc = await status(session, proxy)
    visible, where = state_error_visible(doc)
    return (doc, where) if visible else None


async def _events_mentioning_state(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    async with session.get(proxy.admin_url + "/events", params={"limit": "50"}) as r:
        if r.status != 200:
            return 0
        doc = await r.json()
    events = doc.get("events", doc) if isinstance(doc, dict) else doc
    return sum(1 for e in events if "state file" in json.dumps(e))


def _strip_status(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k != "status"}
    return body


# ------------------------------------------------------------------------ connections


async def scenario_connections(ctx: Context) -> Outcome:
    out = Outcome("connections")
    t0 = time.monotonic()
    count, per = ctx.sizes.connections, ctx.sizes.per_connection
    limit = raise_nofile(count + 512)
    if limit < count + 64:
        raise BenchError(f"open-file limit {limit} is too low for {count} connections")
    blue_port, green_port = free_ports(2)
    argv = [
        sys.executable, str(UPSTREAM_PY),
        "--listen", f"blue={LOOPBACK}:{blue_port}", "--listen", f"green={LOOPBACK}:{green_port}",
    ]  # fmt: skip
    up, _ = ctx.procs.start("upstreams", argv, cwd=REPO)
    try:
        await wait_listening(blue_port, up, 10)
        await wait_listening(green_port, up, 10)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            proxy = ctx.proxy("connections")
            out.logs.append(proxy.log_path)
            cfg = config(
                f"http://{LOOPBACK}:{blue_port}", f"http://{LOOPBACK}:{green_port}", 50,
                proxy.workdir / "turnout-state.json",
                limits={"idle_timeout": "120s", "max_connections": max(10000, 2 * count)},
            )  # fmt: skip
            proxy.write_config(cfg)
            await spawn(proxy, session)
            assert proxy.proc is not None
            pid = proxy.proc.pid
            idle_rss = rss_kib(pid) or 0
            result = await _many_connections(proxy.port, pid, count, per)
            out.n = count
            out.failures = result["errors"]
            out.extra = {
                "requests": result["ok"],
                "open_at_once": result["peak_open"],
                "peak_rss_mib": f"{result['peak_rss_kib'] / 1024:.0f}",
                "idle_rss_mib": f"{idle_rss / 1024:.0f}",
                "kib_per_conn": f"{(result['peak_rss_kib'] - idle_rss) / max(1, count):.1f}",
                "by_version": tally(result["versions"].elements()),
            }
            if result["errors"]:
                out.problems.append(f"{result['errors']} errors: {'; '.join(result['samples'])}")
            if result["peak_open"] < count:
                out.problems.append(
                    f"only {result['peak_open']} of {count} connections open at once"
                )
    finally:
        await ctx.close()
    out.seconds = time.monotonic() - t0
    return out


async def _many_connections(port: int, pid: int, count: int, per: int) -> dict[str, Any]:
    """`count` connections opened first (all held open together), then `per`
    requests on each, then all closed; the proxy's RSS is sampled throughout."""
    connecting = asyncio.Semaphore(256)  # a burst of 5,000 SYNs would only test the backlog
    all_open, all_done = asyncio.Event(), asyncio.Event()
    counts = {"open": 0, "settled": 0, "finished": 0, "peak_open": 0, "ok": 0, "errors": 0}
    versions: Counter[str] = Counter()
    samples: list[str] = []
    peak_rss = [rss_kib(pid) or 0]

    def error(text: str) -> None:
        counts["errors"] += 1
        if len(samples) < 5:
            samples.append(text)

    def settle(key: str, event: asyncio.Event) -> None:
        counts[key] += 1
        if counts[key] >= count:
            event.set()

    async def sample_rss() -> None:
        for _ in range(100_000):  # bounded; cancelled when the connections are done
            peak_rss[0] = max(peak_rss[0], rss_kib(pid) or 0)
            await asyncio.sleep(0.1)

    async def one(i: int) -> None:
        writer = None
        try:
            async with connecting:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 15)
            counts["open"] += 1
            counts["peak_open"] = max(counts["peak_open"], counts["open"])
            settle("settled", all_open)
            await asyncio.wait_for(all_open.wait(), 60)
            for j in range(per):
                writer.write(
                    f"GET /c/{i}/{j} HTTP/1.1\r\nHost: soak\r\n{KEY_HEADER}: c{i}\r\n\r\n".encode()
                )
                status_code, version = await asyncio.wait_for(_read_response(reader), 30)
                if status_code == 200:
                    counts["ok"] += 1
                    versions[version or "?"] += 1
                else:
                    error(f"conn {i} request {j}: HTTP {status_code}")
            settle("finished", all_done)
            await asyncio.wait_for(all_done.wait(), 60)  # keep it open until all are done
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            error(f"conn {i}: {type(exc).__name__}: {exc}")
            if not all_open.is_set():
                settle("settled", all_open)
            settle("finished", all_done)
        finally:
            if writer is not None:
                counts["open"] -= 1
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    sampler = asyncio.get_running_loop().create_task(sample_rss())
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 180)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    peak_rss[0] = max(peak_rss[0], rss_kib(pid) or 0)
    return {**counts, "versions": versions, "samples": samples, "peak_rss_kib": peak_rss[0]}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str | None]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ", 2)[1])
    length, version = 0, None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == VERSION_HEADER.lower():
            version = value.strip()
        elif name == "transfer-encoding":
            raise ValueError("chunked answer; the harness expects Content-Length")
    if length:
        await reader.readexactly(length)
    return code, version


# ------------------------------------------------------------------------------- main

SCENARIOS: dict[str, Callable[[Context], Awaitable[Outcome]]] = {
    "reloads": scenario_reloads,
    "canary": scenario_canary,
    "kill9": scenario_kill9,
    "corrupt": scenario_corrupt,
    "readonly": scenario_readonly,
    "connections": scenario_connections,
}


async def run_scenario(name: str, sizes: Sizes, workdir: Path) -> Outcome:
    """One scenario in its own folder under `workdir`; its children are always stopped."""
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(folder, sizes)
    try:
        return await SCENARIOS[name](ctx)
    finally:
        await ctx.close()


async def main_async(args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    sizes = QUICK if args.quick else FULL
    if args.reloads:
        sizes = Sizes(**{**sizes.__dict__, "reloads": args.reloads})
    if args.connections:
        sizes = Sizes(**{**sizes.__dict__, "connections": args.connections})
    outcomes = []
    for name in args.only:
        try:
            outcome = await run_scenario(name, sizes, workdir)
        except (BenchError, RuntimeError) as exc:  # the harness could not run it
            outcome = Outcome(name, problems=[f"could not run: {exc}"], harness_error=True)
        print(outcome.report(), flush=True)
        outcomes.append(outcome)
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (the test suite's)")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SCENARIOS),
        help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})",
    )
    p.add_argument("--reloads", type=int, default=0, help="reloads in `reloads` (override)")
    p.add_argument("--connections", type=int, default=0, help="connections (override)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="turnout-soak-"))
    try:
        try:
            import uvloop  # a cheaper client loop: 5,000 connections share one core
        except ImportError:  # pragma: no cover
            outcomes = asyncio.run(main_async(args, workdir))
        else:
            outcomes = uvloop.run(main_async(args, workdir))
    except KeyboardInterrupt:
        return 130
    failed = [o for o in outcomes if not o.ok]
    keep = args.keep or bool(failed)
    if keep:
        print(f"soak: work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if any(o.harness_error for o in outcomes):
        return 2
    if failed:
        print(f"soak: {len(failed)} of {len(outcomes)} scenarios broke a bound: "
              + ", ".join(o.scenario for o in failed))  # fmt: skip
        return 1
    print(f"soak: all {len(outcomes)} scenarios within their bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
