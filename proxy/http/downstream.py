"""Client side: one asyncio Protocol per client connection, parsed with httptools.

Rules:
- Requests are answered in order. While one exchange is in flight, pipelined
  requests queue behind it and reading from the client pauses.
- A malformed request gets 400 and the connection closes; nothing of it
  reaches an upstream. Oversized headers get 431.
- The request target never chooses a destination: absolute-form targets are
  reduced to their path.
- The snapshot is read once per request, at the end of its headers.
- Reading is paused for several independent reasons (a bit each): upstream
  back-pressure, queued pipelined requests, buffering while connecting.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from ..forward import Exchange, error_response
from ..headers import HeaderError, RequestHead, header_block, scan_request, upstream_request
from ..routing import RequestView, decide
from .outbox import close, send

if TYPE_CHECKING:
    from ..runtime import Snapshot
    from ..server import Server

PAUSE_PIPELINE = 1  # other bits: 2 upstream back-pressure, 4 connect buffer

# One whole bodiless request in strict RFC 9112 grammar: origin-form target,
# token header names, visible-ASCII/obs-text values. Anything else goes to httptools.
_FAST_REQUEST = re.compile(
    rb"([A-Z]{1,20}) (/[!-~]*) HTTP/1\.([01])"
    rb"((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*)*)\r\n\r\n"
)


class _Reject(Exception):
    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause


class ClientConnection:
    """An asyncio Protocol by its methods. It does not derive from asyncio.Protocol:
    the loop only calls the methods, and a class with no Python base compiles to a
    native class (see proxy/native.py)."""

    __slots__ = (
        "server", "recorder", "transport", "parser", "peer", "peer_bytes", "url",
        "headers", "header_bytes", "current", "queue", "paused", "tunnel", "closed",
        "idle_since", "reject", "last", "loop", "in_message", "eof",
    )  # fmt: skip

    def __init__(self, server: Server) -> None:
        self.server = server
        self.recorder = server.runtime.recorder
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.peer = ""
        self.peer_bytes = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused = 0
        self.tunnel: Exchange | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self.reject: _Reject | None = None
        self.last: Exchange | None = None  # the exchange whose request is being read
        self.in_message = False  # httptools holds part of a request
        self.eof = False  # the client half-closed its side

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if (
            self.current is None
            and not self.in_message
            and data[-4:] == b"\r\n\r\n"
            and len(data) <= self.server.max_header_bytes
            and self.fast_request(data)
        ):
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as up:
            self.upgrade_bytes(data[up.args[0] :])
        except HttpParserError as exc:
            self.bad_request(self.reject or _Reject(400, _parse_cause(exc)))

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.client_lost()  # a tunnel ends when either side ends it
            return None
        # A half-closed client may still be waiting for its answer.
        self.eof = True
        return True if self.current is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.current is not None:
            self.current.client_lost()
        if self.tunnel is not None:
            self.tunnel.client_lost()
        for ex in self.queue:
            ex.done = True
        self.queue.clear()

    def pause_writing(self) -> None:
        ex = self.tunnel or self.current
        if ex is not None and ex.conn is not None and ex.conn.transport is not None:
            ex.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.tunnel or self.current
        if ex is not None and ex.conn is not None and ex.conn.transport is not None:
            ex.conn.transport.resume_reading()

    # -- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers = []
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.server.max_header_bytes:
            self.reject = _Reject(431, "request line and headers exceed max_header_bytes")
            raise self.reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.server.max_header_bytes:
            self.reject = _Reject(431, "request headers exceed max_header_bytes")
            raise self.reject

    def on_headers_complete(self) -> None:
        try:
            ex = self.new_exchange()
        except _Reject as r:
            self.reject = r
            raise
        except HeaderError as e:
            self.reject = _Reject(400, str(e))
            raise
        self.last = ex
        if self.current is None:
            self.current = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause_reading(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.last
        if ex is not None:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        ex = self.last
        self.last = None
        if ex is not None:
            ex.request_complete()

    # -- exchanges --------------------------------------------------------------------

    def fast_request(self, data: bytes) -> bool:
        """Serve a lone, bodiless, plainly formed request without httptools.

        Returns False, having changed nothing, when the request needs the full parser.
        """
        m = _FAST_REQUEST.fullmatch(data)
        if m is None:
            return False
        method, target, minor, block = m.groups()
        if method == b"CONNECT":
            return False  # refused by the full path, with 405
        snap = self.server.runtime.snapshot
        try:
            head = scan_request(block + b"\r\n", snap.table.scanner, snap.table.wanted)
        except HeaderError:
            return False
        if head.special or head.content_length is not None or head.host is None:
            return False
        ex = self.exchange_for(snap, method, target, head, minor == b"1", minor == b"1", False)
        self.last = None
        self.current = ex
        ex.start()
        ex.request_complete()
        return True

    def new_exchange(self) -> Exchange:
        p = self.parser
        method = p.get_method()
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported")
        http11 = p.get_http_version() == "1.1"
        target = self.url
        if target[:1] != b"/":
            target = _origin_form(target)
        snap = self.server.runtime.snapshot
        head = scan_request(header_block(self.headers), snap.table.scanner, snap.table.wanted)
        if http11 and head.host is None:
            raise _Reject(400, "missing Host header")
        if head.chunked and head.content_length is not None:
            raise _Reject(400, "both Content-Length and Transfer-Encoding")
        upgrade = head.upgrade is not None and p.should_upgrade()
        return self.exchange_for(snap, method, target, head, http11, p.should_keep_alive(), upgrade)

    def exchange_for(
        self,
        snap: Snapshot,
        method: bytes,
        target: bytes,
        head: RequestHead,
        http11: bool,
        keep_alive: bool,
        upgrade: bool,
    ) -> Exchange:
        decision = snap.table.quick(head.routing)
        if decision is None:
            path, _, query = target.partition(b"?")
            view = RequestView(
                method.decode("latin-1"),
                path.decode("latin-1"),
                query.decode("latin-1"),
                head.routing,
                self.peer,
            )
            decision = decide(view, snap.table)
        head_bytes = upstream_request(method, target, head, self.peer_bytes, upgrade)
        keep_alive = keep_alive and not self.server.draining
        return Exchange(
            self, snap, decision, method, target, head_bytes, head, keep_alive, http11, upgrade
        )

    def exchange_done(self, ex: Exchange) -> None:
        if ex is not self.current or self.tunnel is not None:
            return
        self.current = None
        if ex.close_client or self.closed or self.server.draining or self.eof:
            self.close()
            return
        self.idle_since = time.monotonic()
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue and self.reject is None:
                self.resume_reading(PAUSE_PIPELINE)
            nxt.start()
        elif self.reject is not None:
            self.bad_request(self.reject)

    def upgrade_bytes(self, rest: bytes) -> None:
        ex = self.current
        if ex is None or not ex.upgrade:
            self.bad_request(_Reject(400, "unexpected protocol upgrade"))
            return
        if rest:
            ex.tunnel_from_client(rest)
        # Until the upstream answers 101, park client bytes on the exchange.
        self.tunnel = ex

    def start_tunnel(self, ex: Exchange) -> None:
        self.tunnel = ex

    def bad_request(self, reject: _Reject) -> None:
        """Answer a request that cannot be parsed or forwarded, then close."""
        ex, self.last = self.last, None
        if ex is not None and not ex.req_done:
            if ex is self.current:
                ex.fail(reject.status, None, reject.cause)  # aborts the upstream side
                return
            if self.queue and self.queue[-1] is ex:
                self.queue.pop()  # never forward a request that did not parse whole
            ex.done = True
        if self.current is not None:
            self.reject = reject  # answer once the exchange in flight is over
            self.pause_reading(PAUSE_PIPELINE)
            return
        self.queue.clear()
        self.recorder.rejected(reject.status)
        expose = self.server.runtime.snapshot.config.expose_version
        send(self.transport, error_response(reject.status, None, reject.cause, expose))
        self.close()

    # -- flow control and lifecycle --------------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        was = self.paused
        self.paused &= ~reason
        if was and not self.paused and not self.closed:
            self.transport.resume_reading()

    def closing(self) -> bool:
        return self.closed or self.server.draining

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            close(self.transport)

    def idle(self) -> bool:
        return self.current is None and self.tunnel is None and not self.queue


def _origin_form(target: bytes) -> bytes:
    """Reduce an absolute-form target to its path; the named host is ignored."""
    low = target[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            return b"/" + (rest[query:] if query != -1 else b"")
        return rest[slash:]
    if target == b"*":
        return target
    raise _Reject(400, "invalid request target")


def _parse_cause(exc: Exception) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return f"malformed request: {text}"[:200]
