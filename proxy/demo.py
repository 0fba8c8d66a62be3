"""`turnout demo`: a release played on this machine, narrated as it happens.

One process, one uvloop event loop, 127.0.0.1 only:

- two `DemoUpstream`s (aiohttp), blue on :9001 and green on :9002, answering any
  method and path with JSON naming themselves; `fault_rate` makes one answer 500
  with that probability (the hook for fault injection into green);
- the proxy (`proxy.server.Server`) on :8080 with its admin API on :9901, running
  a copy of config/demo.yaml written to a temporary folder;
- `Load`: USERS simulated users with stable ids (`X-User-Id: user-N`), RATE
  requests/s in total, and one live line a second with each version's share;
- a script: `PHASES`, a list of `Phase`s, each an async function given a share of
  the run. The default script raises the weight 10 → 30 → 50 by rewriting the
  config file (the file watcher hot-applies it; no API call, no restart) and
  checks that no user went from green back to blue. A guarded release (steps,
  a fault injected into green, the rollback) is more phases in that list.

Rules:
- Ports come from TURNOUT_DEMO_PORTS="PROXY,ADMIN,BLUE,GREEN" (default
  8080,9901,9001,9002). A busy port is one line on stderr and exit status 1.
- Ctrl-C (SIGINT) or SIGTERM, at any point: cancel the script and the load,
  drain the proxy, stop the upstreams, print "stopped", exit 0.
- Exit 1 also when the demo saw the proxy misbehave (a change not applied, a user
  flipped back); that is printed above.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import yaml
from aiohttp import web

from . import config as config_module
from .routing import bucket

if TYPE_CHECKING:
    from .server import Server

HOST = "127.0.0.1"
USERS = 40
RATE = 200.0  # requests per second, all users together
DEFAULT_DURATION = 12.0  # the hot-reload phases; the guarded release then runs on events
APPLY_TIMEOUT = 5.0  # a config change not in force by then is reported as a failure
PORTS_ENV = "TURNOUT_DEMO_PORTS"
TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
# config/demo.yaml, for installs without the source tree (e.g. the container image).
BUILTIN_CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin": {"listen": "127.0.0.1:9901"},
    "state_file": "turnout-state.json",
    "stable": "blue",
    "canary": "green",
    "versions": {
        "blue": {"endpoints": ["http://127.0.0.1:9001"]},
        "green": {"endpoints": ["http://127.0.0.1:9002"], "release": "demo-2"},
    },
    "routing": {
        "weight": 10,
        "sticky": {"key": "header:X-User-Id", "group": "demo-app", "anonymous": "random"},
        "rules": [{"name": "qa", "match": {"header": {"X-Canary": "always"}}, "to": "canary"}],
    },
    "limits": {"drain_timeout": "2s"},
    "expose_version": True,
}


class DemoError(Exception):
    """A one-line reason the demo cannot run (exit status 1)."""


class Ports(NamedTuple):
    proxy: int = 8080
    admin: int = 9901
    blue: int = 9001
    green: int = 9002


def ports_from_env(environ: Mapping[str, str] = os.environ) -> Ports:
    text = environ.get(PORTS_ENV, "").strip()
    if not text:
        return Ports()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts):
        raise DemoError(f"{PORTS_ENV} must be four ports PROXY,ADMIN,BLUE,GREEN, got {text!r}")
    return Ports(*map(int, parts))


def busy_ports(ports: Ports) -> list[str]:
    """'NAME PORT' for each port another process listens on (TIME_WAIT does not count)."""
    busy = []
    for name, port in ports._asdict().items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(f"{name} {port}")
    return busy


# ----------------------------------------------------------------------- upstreams


class DemoUpstream:
    """A stand-in service version: JSON naming itself, or a 500 at `fault_rate`."""

    def __init__(self, name: str, port: int, fault_rate: float = 0.0) -> None:
        self.name = name
        self.port = port
        self.fault_rate = fault_rate  # 0.0 .. 1.0: the share of requests answered with 500
        self.quirk = False  # a behaviour change in the body, for the dark launch to catch
        self.served = 0
        self.faults = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.served += 1
        if self.fault_rate and random.random() < self.fault_rate:
            self.faults += 1
            fault = {"version": self.name, "error": "injected fault"}
            return web.json_response(fault, status=500)
        body: dict[str, Any] = {"version": self.name, "path": request.path_qs}
        body["cart"] = {"items": 3, "total": 42.0 if not self.quirk else 41.5}
        return web.json_response(body)

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


# ---------------------------------------------------------------------------- load


@dataclass
class Tally:
    by_version: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0  # 5xx answers and failed exchanges


class Load:
    """USERS users with stable ids, RATE requests/s in total, and what they saw."""

    def __init__(self, url: str, stable: str, canary: str) -> None:
        self.url = url
        self.stable, self.canary = stable, canary
        self.window = Tally()  # since the last live line
        self.total = Tally()
        self.latest: dict[str, str] = {}  # user -> the version of their latest answer
        self.moved_on: set[str] = set()  # users who went stable -> canary
        self.flipped_back: set[str] = set()  # canary -> stable: stickiness broken
        self.tasks: list[asyncio.Task] = []

    def start(self, session: aiohttp.ClientSession) -> None:
        period = USERS / RATE
        self.tasks = [
            asyncio.create_task(self.user(session, f"user-{n}", period, n * period / USERS))
            for n in range(1, USERS + 1)
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def user(self, session: aiohttp.ClientSession, user: str, period: float, offset: float):
        loop = asyncio.get_running_loop()
        headers = {"X-User-Id": user}
        next_at = loop.time() + offset
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + period, loop.time())  # late: do not burst to catch up
            try:
                async with session.get(self.url + "/hello", headers=headers) as resp:
                    await resp.read()
                    self.record(user, resp.headers.get("X-Turnout-Version"), resp.status)
            except (TimeoutError, aiohttp.ClientError):
                self.record(user, None, 0)

    def record(self, user: str, version: str | None, status: int) -> None:
        error = status == 0 or status >= 500
        for tally in (self.window, self.total):
            tally.requests += 1
            tally.errors += error
            if version is not None:
                tally.by_version[version] = tally.by_version.get(version, 0) + 1
        if version is None:
            return
        before = self.latest.get(user)
        self.latest[user] = version
        if before == self.stable and version == self.canary:
            self.moved_on.add(user)
        elif before == self.canary and version == self.stable:
            self.flipped_back.add(user)

    def forget_moves(self) -> None:
        """Start counting moves afresh (a rollback or a new release moves users on purpose)."""
        self.moved_on.clear()
        self.flipped_back.clear()

    def take_window(self) -> Tally:
        window, self.window = self.window, Tally()
        return window

    def on(self, version: str) -> int:
        return sum(v == version for v in self.latest.values())


# ---------------------------------------------------------------------------- text


def _fancy() -> bool:
    try:
        "█░→✓✗▸—".encode(sys.stdout.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


FANCY = _fancy()
FULL, EMPTY, ARROW, OK, BAD, MARK = (
    ("█", "░", "→", "✓", "✗", "▸") if FANCY else ("#", ".", "->", "ok", "FAIL", ">")
)


def say(text: str = "") -> None:
    print(text, flush=True)


def bar(share: float, width: int = 16) -> str:
    filled = round(share * width)
    return FULL * filled + EMPTY * (width - filled)


def share_line(second: int, weight: Any, window: Tally, names: tuple[str, ...]) -> str:
    """`  12s  weight 10%  blue  91% ███…░  green   9% ██░…  (req/s 100, errors 0)`."""
    answered = sum(window.by_version.values())
    parts = [f"{second:>4}s  weight {f'{weight}%':<4}"]
    for name in names:
        share = window.by_version.get(name, 0) / answered if answered else 0.0
        parts.append(f"{name} {100 * share:>3.0f}% {bar(share)}")
    parts.append(f"(req/s {window.requests}, errors {window.errors})")
    return "  ".join(parts)


# ---------------------------------------------------------------------------- demo


class Demo:
    """Everything the script acts on: upstreams, config file, proxy, load, findings."""

    def __init__(self, ports: Ports, duration: float) -> None:
        self.ports = ports
        self.duration = duration
        self.cfg = load_template()
        self.stable, self.canary = self.cfg["stable"], self.cfg["canary"]
        self.upstreams = {
            self.stable: DemoUpstream(self.stable, ports.blue),
            self.canary: DemoUpstream(self.canary, ports.green),
        }
        self.folder = tempfile.mkdtemp(prefix="turnout-demo-")
        self.config_path = os.path.join(self.folder, "turnout.yaml")
        self.server: Server | None = None
        self.session: aiohttp.ClientSession | None = None
        self.load = Load(f"http://{HOST}:{ports.proxy}", self.stable, self.canary)
        self.ticker: asyncio.Task | None = None
        self.t0 = 0.0
        self.changes: list[tuple[int, int, float]] = []  # (from, to, ms to apply)
        self.problems: list[str] = []
        self.bearer: str | None = None  # once the config has admin tokens
        self.rollout_seen: tuple | None = None  # the last rollout state narrated
        self.evidence_seen: tuple | None = None  # the last step whose evidence was narrated

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        if busy := busy_ports(self.ports):
            raise DemoError(
                f"port {', '.join(busy)} already in use on {HOST} — stop what "
                f"listens there, or pick ports with {PORTS_ENV}=PROXY,ADMIN,BLUE,GREEN"
            )
        from .server import Server  # the forwarding stack loads only when the demo runs

        self.write_config()
        try:
            cfg = config_module.load(self.config_path)
        except config_module.ConfigError as err:
            raise DemoError(f"the demo config is invalid:\n{err}") from None
        for upstream in self.upstreams.values():
            await upstream.start()
        self.server = Server(cfg)
        await self.server.start()
        timeout = aiohttp.ClientTimeout(total=5)
        connector = aiohttp.TCPConnector(limit=USERS + 8)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def stop(self) -> None:
        """Undo whatever `start` and the script got to; safe to call at any point."""
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)
        await self.load.stop()
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await self.server.drain()
        for upstream in self.upstreams.values():
            await upstream.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- what phases use -------------------------------------------------------------

    def elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    def event(self, text: str) -> None:
        say(f"  {MARK} {self.elapsed():5.1f}s  {text}")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.event(f"{BAD} {text}")

    def write_config(self) -> None:
        """Replace the config file whole (write, then rename), as an editor or a ConfigMap does."""
        head = "# Written by `turnout demo` from config/demo.yaml; the demo rewrites it.\n"
        tmp = self.config_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(head + yaml.safe_dump(self.cfg, sort_keys=False))
        os.replace(tmp, self.config_path)

    async def status(self) -> dict | None:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {self.bearer}"} if self.bearer else {}
        url = f"http://{HOST}:{self.ports.admin}/status"
        try:
            async with self.session.get(url, headers=headers) as resp:
                return await resp.json() if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def set_weight(self, weight: int) -> None:
        """Edit routing.weight in the file, then watch /status until it is in force."""
        loop = asyncio.get_running_loop()
        before = await self.status()
        generation = before["config"]["generation"] if before else 0
        old = self.cfg["routing"]["weight"]
        self.cfg["routing"]["weight"] = weight
        self.event(f"config file rewritten: routing.weight {old} {ARROW} {weight}")
        written = loop.time()
        self.write_config()
        while loop.time() - written < APPLY_TIMEOUT:
            doc = await self.status()
            if doc and doc["config"]["generation"] > generation:
                ms = 1000 * (loop.time() - written)
                self.changes.append((old, weight, ms))
                effective = doc["weight"]["effective"]
                self.event(
                    f"applied: generation {doc['config']['generation']} in force after "
                    f"{ms:.0f} ms (file watcher, no restart), weight now {effective}%"
                )
                if effective != weight:
                    self.problem(f"/status shows weight {effective}%, expected {weight}%")
                return
            await asyncio.sleep(0.01)
        self.problem(f"weight {weight}% not in force {APPLY_TIMEOUT:.0f} s after the write")

    def expected_on_canary(self) -> int:
        """How many of the users hash into the canary at the configured weight."""
        routing = self.cfg["routing"]
        group = routing.get("sticky", {}).get("group") or self.canary
        users = (f"user-{n}" for n in range(1, USERS + 1))
        return sum(bucket(group, user) <= routing["weight"] for user in users)

    def check_stickiness(self) -> None:
        """Users on the canary are those whose bucket is <= the weight; none went back."""
        if not self.load.latest:
            self.problem("no response carried X-Turnout-Version: cannot tell who got what")
            return
        on, expected = self.load.on(self.canary), self.expected_on_canary()
        back, weight = len(self.load.flipped_back), self.cfg["routing"]["weight"]
        back_text = f"{back} went from {self.canary} back to {self.stable}"
        if back or on != expected:
            self.problem(
                f"{on} of {USERS} users on {self.canary}, but {expected} have a bucket "
                f"<= {weight}; {back_text}"
            )
        else:
            self.event(
                f"{OK} {on} of {USERS} users on {self.canary}: exactly those with a bucket "
                f"<= {weight}; {back_text}"
            )

    # -- the live lines --------------------------------------------------------------

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        names = (self.stable, self.canary)
        second = 0
        while True:
            second += 1
            await asyncio.sleep(max(0.0, self.t0 + second - loop.time()))
            window = self.load.take_window()
            doc = await self.status()
            weight = doc["weight"]["effective"] if doc else "?"
            say(share_line(second, weight, window, names))


# -------------------------------------------------------------------------- script

PhaseRun = Callable[[Demo, float], Awaitable[None]]


@dataclass(frozen=True)
class Phase:
    title: str
    share: float  # of the run's duration; the phase's run gets that many seconds
    run: PhaseRun  # acts, then may wait; the script waits out the rest of the phase


CHECK_AFTER = 1.0  # by then every user has asked again (one request per USERS / RATE s)


def raise_weight(weight: int) -> PhaseRun:
    async def run(demo: Demo, seconds: float) -> None:
        end = demo.elapsed() + seconds
        await demo.set_weight(weight)
        await asyncio.sleep(max(end - 0.3 - demo.elapsed(), CHECK_AFTER))
        demo.check_stickiness()

    return run


async def check_at_start(demo: Demo, seconds: float) -> None:
    await asyncio.sleep(max(seconds - 0.3, CHECK_AFTER))
    demo.check_stickiness()


PHASES: list[Phase] = [
    Phase("hold at the configured weight", 0.3, check_at_start),
    Phase("step up: weight 30%, by editing the config file", 0.35, raise_weight(30)),
    Phase("step up: weight 50%, by editing the config file", 0.35, raise_weight(50)),
]


async def play(demo: Demo, phases: list[Phase]) -> None:
    loop = asyncio.get_running_loop()
    assert demo.session is not None
    demo.t0 = loop.time()
    demo.load.start(demo.session)
    demo.ticker = asyncio.create_task(demo.tick())
    end = demo.t0
    for n, phase in enumerate(phases, 1):
        say(f"  -- phase {n}/{len(phases)}: {phase.title}")
        if not phase.share:  # runs until what it waits for has happened
            await phase.run(demo, 0.0)
            end = loop.time()
            continue
        end += phase.share * demo.duration
        await phase.run(demo, end - loop.time())
        await asyncio.sleep(max(0.0, end - loop.time()))
    await asyncio.sleep(max(0.0, end + 0.25 - loop.time()))  # the last live line
    await demo.load.stop()
    demo.ticker.cancel()


# ---------------------------------------------------------------------- top level


def load_template() -> dict[str, Any]:
    if TEMPLATE.is_file():
        with open(TEMPLATE, encoding="utf-8") as f:
            return yaml.safe_load(f)
    return yaml.safe_load(yaml.safe_dump(BUILTIN_CONFIG))  # a deep copy


def localise(cfg: dict[str, Any], ports: Ports) -> None:
    cfg["listen"] = f"{HOST}:{ports.proxy}"
    cfg.setdefault("admin", {})["listen"] = f"{HOST}:{ports.admin}"
    cfg["state_file"] = "turnout-state.json"  # next to the copy, in the temp folder
    cfg["versions"][cfg["stable"]]["endpoints"] = [f"http://{HOST}:{ports.blue}"]
    cfg["versions"][cfg["canary"]]["endpoints"] = [f"http://{HOST}:{ports.green}"]


def header(demo: Demo) -> None:
    p, s, c = demo.ports, demo.stable, demo.canary
    proxy, admin = f"http://{HOST}:{p.proxy}", f"http://{HOST}:{p.admin}"
    weight = demo.cfg["routing"]["weight"]
    say(f"""\
Turnout demo: a canary release on this machine (127.0.0.1 only). Ctrl-C stops it.

  {s:<6} stable  demo upstream   http://{HOST}:{p.blue}
  {c:<6} canary  demo upstream   http://{HOST}:{p.green}
  proxy                          {proxy}/   (curl -i -H 'X-User-Id: alice' {proxy}/)
  admin                          {admin}/status   {admin}/metrics
  config                         {demo.config_path}
  load                           {USERS} users (X-User-Id: user-1..user-{USERS}), \
~{RATE:.0f} requests/s

Each user's id hashes to a bucket 1..100; the user gets {c} when the bucket is <= the
weight (now {weight}%). So a user keeps their version, and raising the weight only moves
users from {s} to {c}. Every second: the weight in force and the share of the last
second's responses per version (by their X-Turnout-Version header).
""")


def summary(demo: Demo) -> None:
    total, load = demo.load.total, demo.load
    seconds = max(demo.elapsed(), 1e-9)
    answered = sum(total.by_version.values()) or 1
    served = ", ".join(
        f"{name} {n:,} ({100 * n / answered:.0f}%)" for name, n in total.by_version.items()
    )
    steps = f"{demo.cfg['routing'].get('weight', 0)}%, unchanged"
    if demo.changes:
        hops = "".join(f" {ARROW} {to}% ({ms:.0f} ms)" for _, to, ms in demo.changes)
        steps = f"{demo.changes[0][0]}%{hops}, hot-applied by the file watcher"
    moved, back = len(load.moved_on), len(load.flipped_back)
    say(f"""
summary after {seconds:.0f} s
  requests    {total.requests:,} ({total.requests / seconds:.0f}/s), errors {total.errors}
  served by   {served or "nobody"}
  weight      {steps}
  stickiness  {moved} of {USERS} users moved from {demo.stable} to {demo.canary}; \
{back} flipped from {demo.canary} back to {demo.stable}""")


async def main(duration: float, ports: Ports, phases: list[Phase]) -> int:
    loop = asyncio.get_running_loop()
    demo = Demo(ports, duration)
    localise(demo.cfg, ports)

    async def script() -> None:
        await demo.start()
        header(demo)
        await play(demo, phases)

    task = asyncio.create_task(script())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    interrupted, failure = False, ""
    try:
        await task
    except asyncio.CancelledError:
        interrupted = True
        say()
        say("interrupted: stopping the load, draining the proxy, stopping the upstreams")
    except DemoError as err:
        failure = str(err)
    except OSError as err:  # a port taken between the check and the bind
        failure = f"cannot start: {err}"
    finally:
        await demo.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if failure:
        print(f"turnout demo: {failure}", file=sys.stderr, flush=True)
        return 1
    if demo.t0:
        summary(demo)
    if interrupted:
        say("stopped")
        return 0
    if demo.problems:
        say(f"{BAD} the demo saw the proxy misbehave: " + "; ".join(demo.problems))
        return 1
    return 0
