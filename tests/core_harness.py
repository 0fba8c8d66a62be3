"""In-process harness for the data plane's core: a client connection, its exchanges
and their upstream connections, driven with scripted bytes over fake transports.

No socket, no subprocess, no server: the test plays both peers, in the manner of
h11's ConnectionPair or mitmproxy's Playbook.

- `Harness(yaml_text)` builds what a worker builds (proxy.runtime): the config,
  the routing table, the pools, the snapshot, the shared state and, when the
  config has a `mirror:` section, the mirror tap; the pools dial through a
  `FakeDialer`.
- `h.client()` is a `FakeClient`: a `ClientConnection` on a `FakeTransport`.
  `await client.send(b"...")` feeds it bytes; `client.received` is every byte
  written to it.
- Every dial makes a `FakeUpstream` (an `UpstreamConnection` on a
  `FakeTransport`), listed in `h.dialer.made`; `h.dialer.fail(key, exc)` makes
  the next dial of that endpoint raise. `h.seed(key)` puts a connected one in the
  endpoint's pool, as a connection left idle by an earlier exchange.
- Every step (a callback driven by the test) is followed by `settle()`: a bounded
  number of loop turns, each flushing the write queue (proxy.http.outbox), so
  fresh dials (tasks) run and queued writes reach the fake transports.
- Nothing raised is swallowed: a callback the test drives raises into the test;
  an exception left in a task or reported to the loop's exception handler is
  raised again by the next `settle()`.
- After every step the phases of every exchange in sight are sampled
  (`h.phases(ex)`); a change that no walk through `proxy.phases.REQUEST_NEXT` /
  `RESPONSE_NEXT` explains fails the step.
- A `FakeTransport` behaves as a loop's transport does where the proxy relies on
  it: a transport closed or aborted reports `connection_lost(None)` to its
  protocol on the next turn; reading cannot be paused or resumed once it closes;
  a write after `write_eof()` raises RuntimeError. Given a send buffer
  (`limit(high)`, or `h.dialer.high_water` for every dialled one), a write past it
  calls the protocol's `pause_writing()` at once, and `drain()` resumes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from proxy.config import parse
from proxy.forward import Exchange
from proxy.http import outbox
from proxy.http.downstream import ClientConnection
from proxy.http.pools import Upstreams
from proxy.http.upstream import Pool, UpstreamConnection
from proxy.metrics import Recorder
from proxy.mirror import Mirroring
from proxy.phases import REQUEST_NEXT, RESPONSE_NEXT, RequestPhase, ResponsePhase
from proxy.routing import Table
from proxy.shared import Shared, Snapshot

CLIENT_PEER = ("127.0.0.1", 40000)
TURNS = 8  # loop turns per settle(): a fresh dial and its writes need two or three

Phases = tuple[RequestPhase, ResponsePhase]


def _reach(table: dict) -> dict:
    """Per phase, the phases reachable from it in one or more transitions."""
    out = {}
    for start in table:
        seen: set = set()
        todo = list(table[start])
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(table[p])
        out[start] = seen
    return out


REQUEST_REACH = _reach(REQUEST_NEXT)
RESPONSE_REACH = _reach(RESPONSE_NEXT)


class FakeTransport(asyncio.Transport):
    """Records what the proxy does to one connection: writes, closing, reading."""

    def __init__(self, protocol: Any, peer: tuple[str, int]) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.data = bytearray()  # every byte written, in order
        self.dropped: list[bytes] = []  # writes made after it closed
        self.closing = False
        self.how: str | None = None  # "close" or "abort": how the proxy ended it first
        self.lost = False  # connection_lost was reported to the protocol
        self.reading = True
        self.pauses = 0  # pause_reading() calls that paused it
        self.resumes = 0  # resume_reading() calls that resumed it
        self.eof_written = False
        self.high: int | None = None  # see limit()
        self.buffered = 0
        self.write_paused = False

    def limit(self, high: int) -> None:
        """Model a send buffer: once more than `high` bytes are written and not drained,
        the protocol's pause_writing() is called at once, as a transport calls it from
        write(); `drain()` empties the buffer and calls resume_writing()."""
        self.high = high

    def drain(self) -> None:
        self.buffered = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()

    def write(self, data: bytes) -> None:
        if self.eof_written:  # as asyncio's and uvloop's transports do
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.closing:
            self.dropped.append(bytes(data))
            return
        self.data += data
        if self.high is not None:
            self.buffered += len(data)
            if self.buffered > self.high and not self.write_paused:
                self.write_paused = True
                self.protocol.pause_writing()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._end("close")

    def abort(self) -> None:
        self._end("abort")

    def _end(self, how: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.how = how
        asyncio.get_running_loop().call_soon(self.report_lost)

    def report_lost(self) -> None:
        """Tell the protocol its connection is gone (once)."""
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        if self.reading and not self.closing:
            self.reading = False
            self.pauses += 1

    def resume_reading(self) -> None:
        if not self.reading and not self.closing:
            self.reading = True
            self.resumes += 1

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


class _Peer:
    """What a fake peer does to the proxy's side of its connection."""

    h: Harness
    conn: Any  # the proxy's Protocol: an UpstreamConnection or a ClientConnection
    transport: FakeTransport

    async def pause_writing(self) -> None:
        """The peer stops reading: the proxy's send buffer to it is full."""
        self.conn.pause_writing()
        await self.h.settle()

    async def resume_writing(self) -> None:
        self.conn.resume_writing()
        await self.h.settle()

    async def drain(self) -> None:
        """The peer reads what was buffered for it (see FakeTransport.limit)."""
        self.transport.drain()
        await self.h.settle()


class FakeUpstream(_Peer):
    """One upstream connection of the proxy's, with the test as its server."""

    def __init__(self, harness: Harness, pool: Pool) -> None:
        self.h = harness
        self.pool = pool
        self.conn = UpstreamConnection(pool)
        self.transport = FakeTransport(self.conn, (pool.endpoint.host, pool.endpoint.port))
        self.conn.connection_made(self.transport)

    @property
    def endpoint(self) -> str:
        return self.pool.endpoint.key

    @property
    def received(self) -> bytes:
        """Every byte the proxy sent on this connection."""
        return bytes(self.transport.data)

    async def reply(self, data: bytes) -> None:
        """The upstream sends `data` (one read of the proxy's)."""
        self.conn.data_received(data)
        await self.h.settle()

    async def close(self) -> None:
        """The upstream closes the connection."""
        self.transport.closing = True
        self.transport.lost = True
        self.conn.connection_lost(None)
        await self.h.settle()


class FakeDialer:
    """A `Dialer` (proxy.http.upstream) that connects at once to a FakeUpstream."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.dials: list[str] = []  # the endpoint of every dial, in order
        self.made: list[FakeUpstream] = []  # the connections dialled, in order
        self.failures: dict[str, list[BaseException]] = {}
        self.high_water: int | None = None  # given to every new connection's transport

    def fail(self, endpoint: str, exc: BaseException) -> None:
        """The next dial of `endpoint` ("host:port") raises `exc`."""
        self.failures.setdefault(endpoint, []).append(exc)

    async def dial(self, pool: Pool, timeout: float) -> UpstreamConnection:
        key = pool.endpoint.key
        self.dials.append(key)
        pending = self.failures.get(key)
        if pending:
            raise pending.pop(0)
        up = FakeUpstream(self.h, pool)
        if self.high_water is not None:
            up.transport.limit(self.high_water)
        self.made.append(up)
        return up.conn

    def to(self, endpoint: str) -> list[FakeUpstream]:
        """The connections dialled to `endpoint`, in order."""
        return [up for up in self.made if up.endpoint == endpoint]


class FakeClient(_Peer):
    """One client connection of the proxy's, with the test as the client."""

    def __init__(self, harness: Harness, peer: tuple[str, int]) -> None:
        self.h = harness
        self.conn = ClientConnection(harness.shared, harness.tap, harness.registry, False)
        self.transport = FakeTransport(self.conn, peer)
        self.conn.connection_made(self.transport)

    @property
    def received(self) -> bytes:
        """Every byte the proxy sent to this client."""
        return bytes(self.transport.data)

    @property
    def exchanges(self) -> list[Exchange]:
        """This connection's exchanges seen so far, in the order they were first seen."""
        return [ex for ex in self.h.exchanges if ex.client is self.conn]

    async def send(self, data: bytes) -> None:
        """The client sends `data` (one read of the proxy's)."""
        self.conn.data_received(data)
        await self.h.settle()


class Harness:
    """The data plane of one process, with fake peers on every side (see the module)."""

    def __init__(self, yaml_text: str) -> None:
        self.config = parse(yaml_text, "/nonexistent/turnout.yaml")
        self.dialer = FakeDialer(self)
        upstreams = Upstreams(self.config, dialer=self.dialer)
        table = Table(self.config, self.config.routing.weight, False)
        self.recorder = Recorder()
        self.shared = Shared(Snapshot(self.config, table, upstreams, 1, time.time()), self.recorder)
        self.mismatches: list[dict] = []
        self.tap = Mirroring(self.shared, self.mismatches.append) if self.config.mirror else None
        self.registry: set[ClientConnection] = set()
        self.exchanges: list[Exchange] = []  # every exchange seen, in order
        self.history: dict[int, list[Phases]] = {}  # id(exchange) -> its phases as sampled
        self.errors: list[dict] = []
        self.tasks: list[asyncio.Task] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        loop.set_task_factory(self._task)

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kw)
        self.tasks.append(task)
        return task

    # -- peers -----------------------------------------------------------------------------

    def client(self, peer: tuple[str, int] = CLIENT_PEER) -> FakeClient:
        return FakeClient(self, peer)

    def pool(self, endpoint: str) -> Pool:
        return self.shared.snapshot.upstreams.by_endpoint[endpoint]

    def seed(self, endpoint: str) -> FakeUpstream:
        """A connected upstream connection left idle in `endpoint`'s pool (not dialled)."""
        pool = self.pool(endpoint)
        up = FakeUpstream(self, pool)
        pool.give(up.conn)
        assert pool.idle[-1] is up.conn
        return up

    # -- the loop --------------------------------------------------------------------------

    async def settle(self, turns: int = TURNS) -> None:
        """Run the loop `turns` turns, flushing queued writes; raise what went wrong."""
        self.sample()
        for _ in range(turns):
            outbox.flush()
            await asyncio.sleep(0)
            outbox.flush()
            self.raise_errors()
            self.sample()

    def raise_errors(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.tasks.remove(task)
                raise task.exception()  # type: ignore[misc]
        self.tasks = [t for t in self.tasks if not t.done()]
        if self.errors:
            context = self.errors.pop(0)
            exc = context.get("exception")
            if exc is not None:
                raise exc
            raise AssertionError(f"event loop error: {context.get('message')}")

    # -- phases ----------------------------------------------------------------------------

    def in_sight(self) -> list[Exchange]:
        """The exchanges any connection holds now."""
        found: list[Any] = []
        for conn in self.registry:
            found += [conn.current, conn.last, conn.tunnel, *(conn.queue or ())]
        found += [up.conn.exchange for up in self.dialer.made]
        return [ex for ex in found if isinstance(ex, Exchange)]

    def sample(self) -> None:
        for ex in self.in_sight():
            if id(ex) not in self.history:
                self.exchanges.append(ex)
                self.history[id(ex)] = []
        for ex in self.exchanges:
            now = (RequestPhase(ex.req), ResponsePhase(ex.resp))
            seen = self.history[id(ex)]
            before = seen[-1] if seen else (RequestPhase.BUFFERING, ResponsePhase.AWAITING)
            if now == before and seen:
                continue
            if now != before:
                req_ok = now[0] == before[0] or now[0] in REQUEST_REACH[before[0]]
                resp_ok = now[1] == before[1] or now[1] in RESPONSE_REACH[before[1]]
                assert req_ok and resp_ok, f"phases {before} -> {now}: not in the tables"
            seen.append(now)

    def phases(self, ex: Exchange) -> list[Phases]:
        """`ex`'s (request, response) phases, each change as sampled after a step."""
        return self.history[id(ex)]

    # -- what the recorder counted ---------------------------------------------------------

    def requests(self) -> dict[tuple[str, int], int]:
        """Exchanges finished, by (version, status)."""
        return dict(self.recorder.requests)

    def failures(self) -> dict[str, int]:
        return dict(self.recorder.failures)


def body_json(response: bytes) -> Any:
    """The JSON document after a response head."""
    return json.loads(response.split(b"\r\n\r\n", 1)[1])
