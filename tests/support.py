"""What the tests and the benchmarks (bench/) share: free loopback ports, an upstream
with switchable faults, the proxy as a subprocess, and a load of random users on a clock.

bench/ imports these from here (`from tests.support import ...`). This module imports
neither pytest nor bench/ nor any test module, so the benchmarks run without the
test extras installed. Everything listens on and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
KEY_HEADER = "X-User-Id"
VERSION_HEADER = "X-Turnout-Version"


# --------------------------------------------------------------------------- ports


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1: bind each to port 0, read the
    number, and close them only once all are chosen (so none is picked twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------- certificates


class Authority:
    """A certificate authority made for one test (trustme) and the pairs it issues,
    written as PEM files; `trust()` is a client context that trusts it."""

    def __init__(self, folder: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.folder = folder

    def issue(self, name: str, *hosts: str, **kw: Any) -> tuple[Path, Path]:
        """Write `name`.pem (leaf, then the chain) and `name`.key for `hosts`, each file
        replaced by rename; `kw` goes to trustme (not_before, not_after, ...)."""
        issued = self.ca.issue_cert(*hosts, **kw)
        chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        paths = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        for path, data in zip(paths, (chain, issued.private_key_pem.bytes()), strict=True):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return paths

    def trust(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def ca_file(self, name: str = "ca") -> Path:
        path = self.folder / f"{name}.pem"
        path.write_bytes(self.ca.cert_pem.bytes())
        return path

    def server(self, *hosts: str, clients: Authority | None = None) -> ssl.SSLContext:
        """A server context with a certificate for `hosts`; with `clients`, it demands
        a client certificate that authority issued (mTLS)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*hosts).configure_cert(ctx)
        if clients is not None:
            clients.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


# ------------------------------------------------------------------------- upstream


async def serve_app(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free 127.0.0.1 port (over TLS with `ssl_context`):
    (its runner, to clean up; the port)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, backlog=512, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


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
        self.runner, self.port = await serve_app(app)
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
        """Start the process (`env`: its whole environment) and wait for /readyz.

        The ports were free when chosen, but anything on the machine may bind one
        before the proxy does: then new ones are chosen and it starts again (twice at
        most), so a test fails only for what it tests."""
        for attempt in range(3):
            if await self._spawn(session, timeout, env, last=attempt == 2):
                return

    async def _spawn(
        self,
        session: aiohttp.ClientSession,
        timeout: float,
        env: dict[str, str] | None,
        last: bool,
    ) -> bool:
        """One start; False when a port was taken meanwhile and another try is due."""
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
                if not last and "address already in use" in self.log():
                    self.rebind()
                    return False
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(self.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(0.02)
        raise RuntimeError(f"proxy not ready within {timeout}s:\n{self.log()}")

    def rebind(self) -> None:
        """Move the proxy's listen and admin addresses in its config to new free ports."""
        old = (self.port, self.admin_port)
        self.port, self.admin_port = free_ports(2)
        text = self.config_path.read_text()
        for was, now in zip(old, (self.port, self.admin_port), strict=True):
            text = text.replace(f"{LOOPBACK}:{was}", f"{LOOPBACK}:{now}")
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

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
