"""Functional-test fixtures: real upstream servers and the proxy as a subprocess.

Rules:
- Everything listens on 127.0.0.1 and nothing else is ever contacted.
- Upstreams run in the test's own event loop (aiohttp apps, or raw asyncio
  servers where a test needs byte-level control) and record what reached them:
  connections, bytes and requests, so a test can assert that nothing did.
- The proxy is `python -m proxy run -c FILE` in a subprocess on free ports; it
  is ready when GET /readyz answers 200, and is stopped with SIGTERM (then
  SIGKILL after 10 s) by its own PID at teardown.
- Blocking calls are not allowed in tests: the upstreams share the test's loop.
  Subprocess clients (curl, the CLI) run through asyncio.
- Tests take their helpers from tests/ only: this module, tests/live.py and
  tests/support.py. tests/support.py holds what the benchmarks use too (ports,
  FaultyUpstream, ProxyProcess, Load, measure); bench/ imports it from there,
  never the other way round. A test whose subject is a bench tool imports that
  tool's module and nothing else from bench/: test_guard_compare.py
  (bench/guard_compare.py), test_guard_simulation.py (bench/guard_sim.py),
  test_soak.py (bench/soak.py).
- Every test is marked exactly one of `unit` (in-process: no subprocess, no
  listening socket, no network) and `live` (real loopback sockets and/or
  processes). A module says which with `pytestmark = pytest.mark.unit` (or
  `.live`) after its imports; one whose tests of both kinds share fixtures
  (test_packaging.py) marks each test instead. pytest_collection_modifyitems
  below stops the run when a collected test has neither mark or both, so
  `pytest -m unit` and `pytest -m live` together are always the whole suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .support import LOOPBACK, FaultyUpstream, ProxyProcess, free_ports

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled module older than its source: the old code would run."""
    from proxy import native

    if native.stale() and not os.environ.get("TURNOUT_PURE"):
        pytest.exit(
            f"compiled modules are older than their sources ({', '.join(native.stale())}):"
            " run `make build` first",
            returncode=2,
        )


KINDS = ("unit", "live")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stop the run when a collected test is not marked exactly one of KINDS (before
    `-m` deselects anything, so the check covers every collected test)."""
    wrong = []
    for item in items:
        kinds = sorted({mark.name for mark in item.iter_markers() if mark.name in KINDS})
        if len(kinds) != 1:
            wrong.append(f"  {item.nodeid}: {' and '.join(kinds) or 'neither'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) must be marked exactly one of `unit` and `live`"
            " (module level: pytestmark = pytest.mark.unit or pytest.mark.live;"
            " see tests/conftest.py):\n" + "\n".join(wrong)
        )


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0, read it, release it)."""
    return free_ports(1)[0]


async def eventually(probe: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Call `probe` (plain or async) until it returns something truthy; fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class RssSampler:
    """Sample a process's RSS every `interval` seconds while the block runs."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._task: asyncio.Task | None = None

    @property
    def peak(self) -> int:
        return max(self.samples)

    async def _run(self) -> None:
        while True:
            self.samples.append(rss_bytes(self.pid))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self.samples.append(rss_bytes(self.pid))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.samples.append(rss_bytes(self.pid))


class Metrics:
    """A parsed Prometheus exposition; `get` sums the samples matching the labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def get(self, name: str, **labels: str) -> float:
        total = 0.0
        for sname, slabels, value in self.samples:
            if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
                total += value
        return total


# ----------------------------------------------------------------------- raw client


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """One client TCP connection speaking hand-written HTTP/1.x."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, local_host: str | None = None) -> RawClient:
        local = (local_host, 0) if local_host else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port, local_addr=local), 5
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = 10.0) -> Response:
        return await asyncio.wait_for(self._response(method), timeout)

    async def _response(self, method: str) -> Response:
        line = await self.reader.readuntil(b"\r\n")
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        headers: list[tuple[str, str]] = []
        while True:
            hl = await self.reader.readuntil(b"\r\n")
            if hl == b"\r\n":
                break
            name, _, value = hl.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name.strip(), value.strip()))
        resp = Response(status, reason, version, headers, b"")
        if status < 200 or status in (204, 304) or method == "HEAD":
            return resp
        te = (resp.header("Transfer-Encoding") or "").lower()
        if te.endswith("chunked"):
            resp.body = await self._chunked()
        elif resp.header("Content-Length") is not None:
            resp.body = await self.reader.readexactly(int(resp.header("Content-Length") or 0))
        else:
            resp.body = await self.reader.read(-1)
        return resp

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def request(
    method: str, path: str, host: str = "test.local", headers: list[tuple[str, str]] = (), body=b""
) -> bytes:
    """An HTTP/1.1 request with Content-Length when there is a body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ------------------------------------------------------------------------ upstreams


@dataclass
class Seen:
    """One request as an upstream received it."""

    upstream: str
    method: str
    path: str  # raw path with query, as on the request line
    headers: list[tuple[str, str]]
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


SEEN = web.RequestKey("seen", Seen)


class _Counting(asyncio.Protocol):
    """Wraps an aiohttp request handler to count the connections and bytes that arrive."""

    def __init__(self, owner: Upstream, inner: asyncio.Protocol) -> None:
        self.owner = owner
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner.connections += 1
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.owner.bytes_in += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.closed += 1
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Upstream:
    """Common bookkeeping: where it listens and what reached it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.connections = 0
        self.closed = 0  # connections that have ended (AppUpstream only)
        self.bytes_in = 0
        self.requests: list[Seen] = []

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


class AppUpstream(Upstream):
    """An aiohttp app with the behaviours tests need, chosen by path.

    /ws                 WebSocket echo (text prefixed with the name, binary reversed);
                        the text "bye" makes the upstream close the socket
    /slow?delay=S       waits S seconds, then echoes
    /chunks?n=N&delay=S N chunked pieces S seconds apart; each line "i monotonic-time"
    /download?size=B    B bytes with Content-Length, written 1 MiB at a time
    /upload             counts the streamed request body; answers {"received": n}
    /status/CODE        an empty answer with that status (204, 304, ...)
    anything else       echoes method, path, headers and body as JSON
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.uploads: list[dict[str, Any]] = []
        self.chunk_sent: list[float] = []
        self.runner: web.AppRunner | None = None
        self.server: asyncio.base_events.Server | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self.ws_closed = 0  # WebSocket sessions that have ended

    async def start(self, port: int = 0) -> AppUpstream:
        app = web.Application(middlewares=[self._record], client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        factory = self.runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Counting(self, factory()), LOOPBACK, port, backlog=256
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler):
        seen = Seen(
            self.name,
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
        )
        self.requests.append(seen)
        request[SEEN] = seen
        return await handler(request)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/ws":
            return await self._ws(request)
        if path == "/slow":
            await asyncio.sleep(float(request.query.get("delay", "1")))
        elif path == "/chunks":
            return await self._chunks(request)
        elif path == "/download":
            return await self._download(request)
        elif path == "/upload":
            return await self._upload(request)
        elif path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]))
        return await self._echo(request)

    async def _echo(self, request: web.Request) -> web.Response:
        seen = request[SEEN]
        seen.body = await request.read()
        doc = {
            "upstream": self.name,
            "method": seen.method,
            "path": seen.path,
            "headers": seen.headers,
            "body": seen.body.decode("latin-1"),
        }
        return web.json_response(doc, headers={"X-Upstream": self.name})

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0.2"))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(delay)
            now = time.monotonic()
            self.chunk_sent.append(now)
            await resp.write(f"{i} {now:.6f}\n".encode())
        await resp.write_eof()
        return resp

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        block = b"x" * MiB
        left = size
        while left > 0:
            piece = block if left >= MiB else block[:left]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp

    async def _upload(self, request: web.Request) -> web.Response:
        record: dict[str, Any] = {"received": 0, "complete": False, "error": None}
        self.uploads.append(record)
        try:
            async for data in request.content.iter_any():
                record["received"] += len(data)
            record["complete"] = True
        except Exception as exc:  # the proxy aborted the exchange
            record["error"] = repr(exc)
            raise
        return web.json_response({"received": record["received"]})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "bye":
                    await ws.close(code=4000, message=b"upstream says bye")
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(f"{self.name}:{msg.data}")
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
        finally:
            self.sockets.discard(ws)
            self.ws_closed += 1
        return ws


RawHandler = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream(Upstream):
    """A plain asyncio server whose every connection runs `handler`; heads are recorded."""

    def __init__(self, name: str, handler: RawHandler) -> None:
        super().__init__(name)
        self.handler = handler
        self.heads: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    async def read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request head (through the blank line), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        self.bytes_in += len(head)
        self.heads.append(head)
        first = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        hdrs = []
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if line:
                k, _, v = line.partition(":")
                hdrs.append((k.strip(), v.strip()))
        self.requests.append(Seen(self.name, first[0], first[1], hdrs))
        return head

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task


def answer_then_close(raw: bytes) -> RawHandler:
    """A RawUpstream handler: read one request head, answer `raw`, close."""

    async def handler(up: RawUpstream, reader, writer) -> None:
        await up.read_head(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handler


class Upstreams:
    """Factory for the upstreams of one test; all are stopped at teardown."""

    def __init__(self) -> None:
        self.started: list[Upstream] = []

    async def app(self, name: str, port: int = 0) -> AppUpstream:
        up = await AppUpstream(name).start(port)
        self.started.append(up)
        return up

    async def raw(self, name: str, handler: RawHandler) -> RawUpstream:
        up = await RawUpstream(name, handler).start()
        self.started.append(up)
        return up

    @staticmethod
    def dead_url() -> str:
        """An endpoint URL where nothing listens: connecting is refused."""
        return Upstreams.dead_urls(1)[0]

    @staticmethod
    def dead_urls(n: int) -> list[str]:
        """`n` distinct such URLs (ports chosen together, so no two are the same)."""
        return [f"http://{LOOPBACK}:{port}" for port in free_ports(n)]

    async def stop(self) -> None:
        for up in reversed(self.started):
            await up.stop()


# ---------------------------------------------------------------------------- proxy


def versions_config(blue: list[str] | str, green: list[str] | str, **extra: Any) -> dict:
    """A config dict with stable blue and canary green; `extra` adds top-level keys."""
    as_list = lambda u: [u] if isinstance(u, str) else list(u)  # noqa: E731
    cfg: dict[str, Any] = {
        "stable": "blue",
        "canary": "green",
        "versions": {
            "blue": {"endpoints": as_list(blue)},
            "green": {"endpoints": as_list(green)},
        },
    }
    cfg.update(extra)
    return cfg


class Proxy(ProxyProcess):
    """One `python -m proxy run` subprocess on free ports, with admin helpers.

    Config rendering and the process's life are `tests.support.ProxyProcess`'s.
    """

    def __init__(self, workdir: Path, config_path: Path) -> None:
        super().__init__(workdir, config_path)
        self.session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 10.0, env: dict[str, str] | None = None) -> Proxy:
        """Start the subprocess; `env` adds (or overrides) environment variables for it."""
        full = dict(os.environ, PYTHONUNBUFFERED="1")
        full.pop("TURNOUT_TOKEN", None)
        full.update(env or {})
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self.spawn(self.session, timeout, full)
        return self

    async def stop(self) -> int | None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        return await super().stop()

    # -- admin API ------------------------------------------------------------------

    async def admin_get(self, path: str, **params: Any) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.get(self.admin_url + path, params=params or None) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def status(self) -> dict:
        code, doc = await self.admin_get("/status")
        assert code == 200, doc
        return doc

    async def metrics(self) -> Metrics:
        assert self.session is not None
        async with self.session.get(self.admin_url + "/metrics") as r:
            assert r.status == 200
            return Metrics(await r.text())

    async def explain(self, key: str | None = None, headers: list[str] = (), **params: str) -> dict:
        query: list[tuple[str, str]] = list(params.items())
        if key is not None:
            query.append(("key", key))
        query += [("header", h) for h in headers]
        assert self.session is not None
        async with self.session.get(self.admin_url + "/explain", params=query) as r:
            doc = await r.json()
            assert r.status == 200, doc
            return doc

    async def generation(self) -> int:
        return (await self.status())["config"]["generation"]


class ProxyFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.proxies: list[Proxy] = []

    def new(self, config_path: Path | None = None) -> Proxy:
        """A proxy with ports chosen but not started (write its config, then start)."""
        path = config_path or self.tmp_path / f"turnout-{len(self.proxies)}.yaml"
        p = Proxy(self.tmp_path, path)
        self.proxies.append(p)
        return p

    async def start(
        self, config: dict | str, config_path: Path | None = None, env: dict[str, str] | None = None
    ) -> Proxy:
        p = self.new(config_path)
        p.write_config(config)
        return await p.start(env=env)

    async def stop(self) -> None:
        for p in self.proxies:
            await p.stop()
            if p.proc is not None:
                print(f"--- proxy log ({p.log_path}) ---\n{p.log()}")


# ------------------------------------------------------------------------- fixtures


@pytest.fixture
async def upstreams():
    ups = Upstreams()
    yield ups
    await ups.stop()


@pytest.fixture
async def blue(upstreams: Upstreams) -> AppUpstream:
    return await upstreams.app("blue")


@pytest.fixture
async def green(upstreams: Upstreams) -> AppUpstream:
    return await upstreams.app("green")


@pytest.fixture
async def proxies(upstreams: Upstreams, tmp_path: Path):
    """Starts proxies; depends on `upstreams` so proxies stop before upstreams do."""
    factory = ProxyFactory(tmp_path)
    yield factory
    await factory.stop()


@pytest.fixture
async def proxy(proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream) -> Proxy:
    """A proxy with blue stable, green canary, weight 0, sticky on X-User-Id."""
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 0, "sticky": {"key": "header:X-User-Id"}}
    )
    return await proxies.start(cfg)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
async def pair():
    """Blue (healthy) and green (fault rate switchable) upstreams in the test's loop."""
    blue = await FaultyUpstream("blue").start()
    green = await FaultyUpstream("green").start()
    yield blue, green
    await green.stop()
    await blue.stop()
