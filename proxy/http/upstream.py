"""Upstream side: pooled keep-alive connections to configured endpoints.

Rules:
- Only endpoints from the config are ever dialled; a request never names one.
- One exchange at a time per connection (no upstream pipelining). A connection
  goes back to its pool only when both the request and the response ended
  cleanly with keep-alive; anything else closes it.
- An endpoint that refuses connections is skipped for a short back-off (see
  BACKOFF_FIRST); the next request after it is the probe.
- Pools survive config reloads for endpoints that did not change.
- What a connection reads goes to the `ResponseSink` bound to it for one
  exchange (declared here, implemented by the layers above: a primary exchange
  or a shadow copy); a connection knows nothing else of them. Flow control
  (pause/resume_writing) is reported to the sink.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any, Final, Protocol

from ..config import Endpoint
from ..framing import (
    CHUNKED,
    LENGTH,
    NONE,
    PLAIN,
    RESPONSE_HEAD,
    UNTIL_CLOSE,
    ChunkedReader,
    Framing,
    FramingError,
    bare_lf_end,
    head_fault,
    response_framing,
)
from ..tls import TlsFailure, describe
from .outbox import abort, send

_monotonic: Final = time.monotonic  # bound once: a static, not a lookup per call

# An endpoint that refused is skipped for a back-off that doubles with each refusal
# in a row, from BACKOFF_FIRST to BACKOFF_MAX seconds; the first request after it
# dials again (the probe), and one success ends the back-off. Short on purpose: a
# restart of a second should cost about a second of refusals, not a cool-down of 5.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 0.25
MAX_IDLE: Final = 512  # idle connections kept per endpoint
MAX_HEAD: Final = 64 * 1024  # an upstream response head larger than this is a protocol error


class ResponseSink(Protocol):
    """What an upstream connection delivers one response to, in this order:
    interim heads, then `whole_response` or `response_head`, body pieces and
    `response_complete`; after any read that delivered something, `read_done`.

    An implementer inherits this class explicitly (mypyc compiles it as a trait,
    so the calls are native). The sink may detach from the connection (close it,
    give it back to its pool) inside any call; the connection then stops
    delivering to it.
    """

    def whole_response(self, data: bytes, end: int) -> bool:
        """A response read whole in one piece (`end`: where its head ends). True when
        the sink took it; False, having changed nothing, sends it through the parser."""
        ...

    def response_head(self, status: int, head: bytes, keep_alive: bool, framing: Framing) -> None:
        """A head (interim when `status` < 200 and not 101); `head` ends with CRLF."""
        ...

    def response_body(self, data: bytes) -> None: ...

    def response_complete(self) -> None: ...

    def read_done(self) -> None:
        """The end of one read of the connection: what was held for it may go out."""
        ...

    def upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols; `rest`: the bytes after the 101 head."""
        ...

    def tunnel_data(self, data: bytes) -> None:
        """Bytes from the upstream after a switch of protocols."""
        ...

    def upstream_failed(self, kind: str, cause: str, status: int = 502) -> None: ...

    def response_trailers(self, block: bytes) -> None:
        """A chunked body's trailer lines (each ending CRLF), just before it completes."""
        ...

    def upstream_lost(self, silent: bool = False, until_close: bool = False) -> None:
        """The connection closed under the sink (`silent`: before one byte of a response;
        `until_close`: the response's framing ends with the close)."""
        ...

    def upstream_paused(self, paused: bool) -> None:
        """The connection's send buffer filled (True) or drained (False)."""
        ...


class UpstreamConnection:
    """An asyncio Protocol by its methods, not by its base class (as ClientConnection).

    Responses are read with proxy.framing, the same strict rules as requests: a
    head is judged whole before anything of it is relayed, and the body ends
    exactly where the head's framing says. Bytes past that end spoil the
    connection: it is closed, never pooled.
    """

    __slots__ = (
        "pool", "transport", "exchange", "closed", "idle_since", "head_buf", "want_head",
        "mode", "left", "chunks", "spoiled", "progress", "head_request", "tunnel", "held",
    )  # fmt: skip

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: ResponseSink | None = None
        self.closed = False
        self.idle_since = 0.0
        self.head_buf = bytearray()  # a response head still being received, over reads
        self.want_head = True
        self.mode = NONE  # how the body being read ends
        self.left = 0  # LENGTH: body bytes still to come
        self.chunks: ChunkedReader | None = None
        self.spoiled = False  # bytes arrived past a response's end: never reuse
        self.progress = 0  # reads so far; the server's sweep watches it for stalls
        self.head_request = False  # the request in flight is a HEAD: no body follows
        self.tunnel = False  # the upstream switched protocols: bytes pass through as they are
        self.held = False  # reading paused for a client that stopped reading

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # an idle connection must not speak: drop it
            self.close()
            return
        self.progress += 1
        if self.tunnel:
            ex.tunnel_data(data)
            return
        if self.want_head and not self.head_buf:
            end = data.find(b"\r\n\r\n")
            if end != -1 and end < MAX_HEAD and ex.whole_response(data, end):
                return
        try:
            self.read(ex, data)
        except FramingError as exc:
            if self.exchange is ex:
                ex.upstream_failed("protocol", f"malformed upstream response: {exc.cause}")
            return
        if self.exchange is ex:
            ex.read_done()

    def read(self, ex: ResponseSink, data: bytes) -> None:
        """Consume `data` for `ex`: heads, then the body as its framing says."""
        while data:
            if self.want_head:
                rest = self.read_head(ex, data)
                if rest is None:
                    return
                data = rest
            elif self.mode == LENGTH:
                take = self.left
                piece = data if len(data) <= take else data[:take]
                self.left -= len(piece)
                ex.response_body(piece)
                if self.left:
                    return
                self.body_ended(ex, data[len(piece) :])
                return
            elif self.mode == CHUNKED:
                pieces: list[bytes] = []
                chunks = self.chunks
                assert chunks is not None
                rest = chunks.feed(data, pieces)
                for piece in pieces:
                    if self.exchange is not ex:
                        return
                    ex.response_body(piece)
                if rest is not None and self.exchange is ex:
                    if chunks.kept:
                        ex.response_trailers(chunks.kept)
                    self.body_ended(ex, rest)
                return
            else:  # UNTIL_CLOSE
                ex.response_body(data)
                return

    def read_head(self, ex: ResponseSink, data: bytes) -> bytes | None:
        """Gather and judge one response head; the bytes after it, or None when done."""
        pending = self.head_buf
        old = len(pending)
        if old:  # gathered in a bytearray: linear however the head is split
            pending += data
            end = pending.find(b"\r\n\r\n", max(0, old - 3))
        else:
            end = data.find(b"\r\n\r\n")
        if end == -1 or end + 4 > MAX_HEAD:
            if old + len(data) > MAX_HEAD:
                raise FramingError(502, "response head too large")
            if bare_lf_end(pending if old else data, old):
                raise FramingError(502, "bare LF line ends")
            if not old:
                pending += data
            return None
        buf = bytes(pending) if old else data
        pending.clear()
        head = buf[: end + 2]
        m = RESPONSE_HEAD.fullmatch(head)
        if m is None:
            raise FramingError(502, head_fault(head))
        status = int(m.group(2))
        rest = buf[end + 4 :]
        if status < 200 and status != 101:
            ex.response_head(status, head, True, PLAIN)  # interim: the final head follows
            return rest
        if status == 101:
            self.want_head = False
            ex.response_head(status, head, False, PLAIN)
            if self.exchange is ex:
                self.tunnel = True
                ex.upgraded(rest)
            return None
        framing = response_framing(m.group(3) + b"\r\n", status, self.head_request)
        keep_alive = framing.keep_alive(m.group(1) == b"1")
        self.want_head = False
        self.mode = framing.mode
        self.left = framing.length
        if framing.mode == CHUNKED:
            self.chunks = ChunkedReader(502)
        ex.response_head(status, head, keep_alive and framing.mode != UNTIL_CLOSE, framing)
        if self.exchange is not ex:
            return None
        if framing.mode == NONE or (framing.mode == LENGTH and not framing.length):
            self.body_ended(ex, rest)
            return None
        return rest

    def body_ended(self, ex: ResponseSink, rest: bytes) -> None:
        if rest:
            self.spoiled = True  # more than the framing said: the next reader would desync
        ex.response_complete()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            if isinstance(exc, ssl.SSLError):
                # TLS failed after the handshake: e.g. a TLS 1.3 upstream that wants
                # a client certificate says so once the request has gone.
                ex.upstream_failed("tls", f"tls: {describe(exc)}")
                return
            # Whether the close ends the body is the framing's word, nobody else's.
            until_close = not self.want_head and self.mode == UNTIL_CLOSE
            ex.upstream_lost(self.want_head and not self.head_buf, until_close)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_paused(True)

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_paused(False)

    # -- for the sink ---------------------------------------------------------------

    def bind(self, sink: ResponseSink, head_request: bool) -> None:
        """Deliver what this connection reads to `sink`, for one request."""
        self.exchange = sink
        self.head_request = head_request

    def pause_reading(self) -> None:
        """The client stopped reading: stop reading the upstream (TCP pushes back)."""
        if self.transport is not None and not self.closed and not self.held:
            self.held = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.held:
            self.held = False
            self.transport.resume_reading()

    def send(self, data: bytes) -> None:
        send(self.transport, data)  # type: ignore[arg-type]

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                abort(self.transport)

    def reusable(self) -> bool:
        """Ready for the next request: its last response ended exactly at its framing."""
        if self.closed or self.spoiled or self.head_buf:
            return False
        if self.want_head:
            return True
        mode = self.mode
        if mode == LENGTH:
            return self.left == 0
        if mode == CHUNKED:
            return self.chunks is not None and self.chunks.done()
        return mode == NONE

    def reset(self) -> None:
        self.want_head = True
        self.head_buf.clear()
        self.mode = NONE
        self.left = 0
        self.chunks = None


class Dialer(Protocol):
    """How a pool opens a new connection to its endpoint."""

    async def dial(self, pool: Pool, timeout: float) -> UpstreamConnection:
        """A connected UpstreamConnection of `pool`; TimeoutError or OSError when none."""
        ...


class TcpDialer(Dialer):
    """Plain TCP through the running event loop."""

    async def dial(self, pool: Pool, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        ep = pool.endpoint
        _, conn = await asyncio.wait_for(
            # a Protocol by its methods, not by its base class (see the class)
            loop.create_connection(lambda: UpstreamConnection(pool), ep.host, ep.port),  # type: ignore[type-var]
            timeout,
        )
        return conn


TCP = TcpDialer()


class TlsDialer(Dialer):
    """TCP, then a TLS handshake (start_tls), both within the connect timeout: any
    failure of the second step is a TlsFailure, told apart from a refused dial."""

    def __init__(self, context: ssl.SSLContext, server_name: str | None) -> None:
        self.context = context
        self.server_name = server_name

    async def dial(self, pool: Pool, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await TCP.dial(pool, timeout)
        left = max(deadline - loop.time(), 0.001)
        name = self.server_name or pool.endpoint.host
        raw: Any = conn.transport  # a TCP transport; conn: a Protocol by its methods
        proto: Any = conn
        try:
            secured = await asyncio.wait_for(
                loop.start_tls(
                    raw, proto, self.context, server_hostname=name, ssl_handshake_timeout=left
                ),
                left,
            )
        except TimeoutError:
            conn.close()
            raise
        except ssl.SSLError as e:
            conn.close()
            raise TlsFailure(describe(e)) from None
        except (ConnectionError, EOFError) as e:
            conn.close()
            why = "the upstream closed the connection during the handshake"
            raise TlsFailure(f"{why} ({e.__class__.__name__})") from None
        if secured is None:
            raise TlsFailure("the upstream closed the connection during the handshake")
        conn.connection_made(secured)
        return conn


class Pool:
    """Idle connections to one endpoint, and how to dial a new one."""

    __slots__ = ("endpoint", "idle", "down_until", "retired", "refusals", "dialer")

    def __init__(self, endpoint: Endpoint, dialer: Dialer = TCP) -> None:
        self.endpoint = endpoint
        self.dialer = dialer
        self.idle: list[UpstreamConnection] = []
        self.down_until = 0.0
        self.retired = False
        self.refusals = 0  # refused dials in a row

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def give(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        """Keep `conn` for the next exchange (or close it); `now`: the clock's reading
        if the caller has just taken one."""
        conn.exchange = None
        if not conn.reusable() or self.retired or len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        conn.resume_reading()  # paused for the last client: an idle one must be read
        conn.reset()
        conn.idle_since = now or _monotonic()
        self.idle.append(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        conn = await self.dialer.dial(self, timeout)
        self.refusals = 0
        self.down_until = 0.0
        return conn

    def refused(self) -> None:
        self.refusals += 1
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.refusals - 1, 10))
        self.down_until = _monotonic() + backoff

    def sweep(self, idle_before: float) -> None:
        """Close idle connections unused since `idle_before` (monotonic seconds)."""
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if conn.idle_since < idle_before:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def retire(self) -> None:
        self.retired = True
        for conn in self.idle:
            conn.close()
        self.idle = []


class VersionPools:
    """The endpoints of one version, used round-robin, skipping cooled-down ones."""

    __slots__ = ("name", "pools", "next", "h2")

    def __init__(self, name: str, pools: list[Pool]) -> None:
        self.name = name
        self.pools = pools
        self.next = 0
        self.h2 = False  # every endpoint speaks HTTP/2 (gRPC can be served)

    def pick(self, exclude: Pool | None = None) -> Pool | None:
        pools = self.pools
        n = len(pools)
        if n == 1:
            p = pools[0]
            if p is exclude or (p.down_until and p.down_until > _monotonic()):
                return None
            return p
        now = _monotonic()
        for _ in range(n):
            p = pools[self.next % n]
            self.next += 1
            if p is not exclude and p.down_until <= now:
                return p
        return None
