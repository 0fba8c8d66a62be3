"""Upstream side: pooled keep-alive connections to configured endpoints.

Rules:
- Only endpoints from the config are ever dialled; a request never names one.
- One exchange at a time per connection (no upstream pipelining). A connection
  goes back to its pool only when both the request and the response ended
  cleanly with keep-alive; anything else closes it.
- An endpoint that refuses connections is skipped for `COOLDOWN` seconds.
- Pools survive config reloads for endpoints that did not change.
- Parser callbacks are forwarded to the attached exchange; flow control
  (pause/resume_writing) is passed through to the client connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..config import Config, Endpoint
from .outbox import abort, send

if TYPE_CHECKING:
    from ..forward import Exchange
    from ..mirror import ShadowExchange

COOLDOWN = 5.0  # seconds an endpoint that refused is skipped
MAX_IDLE = 512  # idle connections kept per endpoint
MAX_HEAD = 64 * 1024  # an upstream response head larger than this is a protocol error


class UpstreamConnection:
    """An asyncio Protocol by its methods, not by its base class (as ClientConnection)."""

    __slots__ = (
        "pool", "transport", "parser", "exchange", "closed", "idle_since",
        "head_buf", "want_head", "stale_parser",
    )  # fmt: skip

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | ShadowExchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.head_buf = b""  # raw bytes of a response head still being received
        self.want_head = True
        self.stale_parser = False  # a HEAD response leaves the parser expecting a body

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # an idle connection must not speak: drop it
            self.close()
            return
        if ex.tunnel:  # only a primary exchange tunnels
            send(cast("Exchange", ex).client.transport, data)
            return
        if self.want_head:
            if not self.head_buf:
                end = data.find(b"\r\n\r\n")
                if end != -1 and ex.whole_response(data, end):
                    return
            self.head_buf = self.head_buf + data if self.head_buf else data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as up:
            ex.upgraded(data[up.args[0] :])
        except HttpParserError:
            ex.upstream_failed("protocol", "malformed upstream response")
            return
        if self.want_head and len(self.head_buf) > MAX_HEAD:
            ex.upstream_failed("protocol", "upstream response head too large")
            return
        if ex.resp_pending is not None and self.exchange is ex:
            ex.flush_response_head()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.upstream_lost(silent=self.want_head and not self.head_buf)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_paused(True)

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_paused(False)

    # -- parser callbacks ---------------------------------------------------------

    # No per-header callbacks: the head is taken whole from the raw bytes (see
    # headers.py), which saves a Python call per header line.

    def on_headers_complete(self) -> None:
        buf = self.head_buf
        end = buf.find(b"\r\n\r\n")
        if end == -1:  # bare-LF framing: not supported from upstreams
            raise HttpParserError("response head without CRLF line endings")
        p = self.parser
        status = p.get_status_code()
        if status >= 200 or status == 101:
            self.want_head = False
            self.head_buf = b""
        else:
            self.head_buf = buf[end + 4 :]  # an interim response: the next head follows
        self.exchange.response_head(status, buf[: end + 2], p.should_keep_alive())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.exchange.response_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.response_complete()

    # -- helpers ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        send(self.transport, data)  # type: ignore[arg-type]

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                abort(self.transport)

    def reset_parser(self) -> None:
        self.parser = HttpResponseParser(self)
        self.stale_parser = False


class Pool:
    """Idle connections to one endpoint, and how to dial a new one."""

    __slots__ = ("endpoint", "idle", "down_until", "retired")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.idle: list[UpstreamConnection] = []
        self.down_until = 0.0
        self.retired = False

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def give(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        if conn.closed or self.retired or len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        if conn.stale_parser:
            conn.reset_parser()
        conn.want_head = True
        conn.head_buf = b""
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        _, conn = await asyncio.wait_for(
            # a Protocol by its methods, not by its base class (see the class)
            loop.create_connection(lambda: UpstreamConnection(self), ep.host, ep.port),  # type: ignore[type-var]
            timeout,
        )
        return conn

    def refused(self) -> None:
        self.down_until = time.monotonic() + COOLDOWN

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

    __slots__ = ("name", "pools", "next")

    def __init__(self, name: str, pools: list[Pool]) -> None:
        self.name = name
        self.pools = pools
        self.next = 0

    def pick(self, exclude: Pool | None = None) -> Pool | None:
        pools = self.pools
        n = len(pools)
        if n == 1:
            p = pools[0]
            if p is exclude or (p.down_until and p.down_until > time.monotonic()):
                return None
            return p
        now = time.monotonic()
        for _ in range(n):
            p = pools[self.next % n]
            self.next += 1
            if p is not exclude and p.down_until <= now:
                return p
        return None


class Upstreams:
    """All pools of one config; built anew on reload, reusing unchanged endpoints."""

    def __init__(self, config: Config, previous: Upstreams | None = None) -> None:
        old = previous.by_endpoint if previous else {}
        self.by_endpoint: dict[str, Pool] = {}
        self.versions: dict[str, VersionPools] = {}
        for name, version in config.versions.items():
            pools = []
            for ep in version.endpoints:
                pool = self.by_endpoint.get(ep.key) or old.get(ep.key) or Pool(ep)
                self.by_endpoint[ep.key] = pool
                pools.append(pool)
            self.versions[name] = VersionPools(name, pools)
        for key, pool in old.items():
            if key not in self.by_endpoint:
                pool.retire()

    def sweep(self, idle_timeout: float) -> None:
        before = time.monotonic() - idle_timeout
        for pool in self.by_endpoint.values():
            pool.sweep(before)

    def close(self) -> None:
        for pool in self.by_endpoint.values():
            pool.retire()
