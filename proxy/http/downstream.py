"""Client side: one asyncio Protocol per client connection, read with proxy.framing.

Rules:
- Every request head is judged whole, in the strict grammar, before anything of
  it is acted on (proxy.framing): one framing authority, no second parser that
  could read the same bytes differently. Its body is read exactly as its
  framing says; the next request starts right after it.
- Requests are answered in order. While one exchange is in flight, pipelined
  requests queue behind it and reading from the client pauses.
- A malformed request gets 400 (or 405, 413, 431, 501, 505) and the connection
  closes; nothing of it reaches an upstream. Head bytes are counted as they
  arrive: a head past `max_header_bytes` is refused before it is complete.
- The request target never chooses a destination: absolute-form targets are
  reduced to their path.
- The snapshot is read once per request, at the end of its head.
- Reading is paused for several independent reasons (a bit each): upstream
  back-pressure, queued pipelined requests, buffering while connecting.
- Timeouts (checked by the server's sweep, see `overdue`): a head must arrive
  whole within `client_header_timeout`, a body must progress within
  `client_body_timeout`, a client must read within `send_timeout`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from ..answers import error_response
from ..forward import ClientSide, Exchange, MirrorTap
from ..framing import (
    CHUNKED,
    LENGTH,
    NONE,
    REQUEST_HEAD,
    ChunkedReader,
    FramingError,
    bare_lf_end,
    head_fault,
)
from ..headers import HeaderError, RequestHead, scan_request, upstream_request
from ..routing import RequestView, decide
from ..shared import Shared, Snapshot
from .outbox import abort, close, flush, send

if TYPE_CHECKING:
    from ..config import Limits

PAUSE_PIPELINE = 1  # other bits: proxy.forward's PAUSE_UPSTREAM and PAUSE_CONNECT
LINGER = 2.0  # seconds a closed connection's late bytes are read and dropped
MAX_EMPTY_LINES = 8  # blank lines tolerated before a request line (RFC 9112 §2.2)

# What the connection is reading.
HEAD = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
TUNNEL = 3
STOPPED = 4  # a request was refused: nothing more is read


class _Reject(Exception):
    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause
        self.head_only = False  # it answers a HEAD request: no body (RFC 9110 §9.3.2)


class ClientConnection(ClientSide):
    """An asyncio Protocol by its methods. It does not derive from asyncio.Protocol:
    the loop only calls the methods, and a class with no Python base compiles to a
    native class (see proxy/native.py). It is the `ClientSide` its exchanges talk to.

    Made with what it shares with every connection of its listener: the
    process's state, the mirror tap, and the set of open connections it joins.
    """

    __slots__ = (
        "shared", "tap", "registry", "transport", "peer", "peer_bytes", "buf", "phase", "left",
        "chunks", "current", "queue", "paused", "tunnel", "closed", "idle_since", "reject",
        "last", "eof", "head_since", "progress", "seen", "seen_at", "write_paused",
    )  # fmt: skip

    def __init__(
        self, shared: Shared, tap: MirrorTap | None, registry: set[ClientConnection]
    ) -> None:
        self.shared = shared
        self.tap = tap
        self.registry = registry
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = ""
        self.peer_bytes = b""
        self.buf = bytearray()  # a request head still being received, over several reads
        self.phase = HEAD
        self.left = 0  # BODY_LENGTH: body bytes still to come
        self.chunks: ChunkedReader | None = None
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused = 0
        self.tunnel: Exchange | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self.reject: _Reject | None = None
        self.last: Exchange | None = None  # the exchange whose request is being read
        self.eof = False  # the client half-closed its side
        self.head_since = 0.0  # monotonic time the head being received began; 0: none
        self.progress = 0  # reads so far
        self.seen = 0  # `progress` at the last sweep that saw it change
        self.seen_at = 0.0
        self.write_paused = 0.0  # monotonic time the client stopped reading; 0: it reads

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
        if len(self.registry) >= self.shared.snapshot.config.limits.max_connections:
            self.closed = True
            self.phase = STOPPED
            self.shared.recorder.rejected(503)
            send(transport, error_response(503, None, "too many connections", False))  # type: ignore[arg-type]
            close(transport)
            return
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self.phase == STOPPED:
            return  # a refused request: nothing after it is read
        try:
            self.consume(data)
        except _Reject as r:
            self.stop(r)
        except FramingError as fe:
            self.stop(_Reject(fe.status, fe.cause))
        except HeaderError as he:
            self.stop(_Reject(400, str(he)))

    def consume(self, data: bytes) -> None:
        """Read requests from `data`, in order, each exactly as its framing says."""
        while data:
            phase = self.phase
            if phase == HEAD:
                rest = self.read_head(data)
                if rest is None:
                    return
                data = rest
            elif phase == BODY_LENGTH:
                left = self.left
                piece = data if len(data) <= left else data[:left]
                self.left = left - len(piece)
                ex = self.last
                if ex is not None:
                    ex.request_body(piece)
                if self.left:
                    return
                data = data[len(piece) :]
                self.message_done()
            elif phase == BODY_CHUNKED:
                pieces: list[bytes] = []
                rest = self.chunks.feed(data, pieces)  # type: ignore[union-attr]
                ex = self.last
                for piece in pieces:
                    if ex is not None:
                        ex.request_body(piece)
                if rest is None:
                    return
                data = rest
                self.message_done()
            elif phase == TUNNEL:
                if self.tunnel is not None:
                    self.tunnel.tunnel_from_client(data)
                return
            else:
                return

    def read_head(self, data: bytes) -> bytes | None:
        """Gather one request head and start its exchange; the bytes after the head,
        or None when it is not complete yet.

        A head in one read is taken from it as it is; one that spans reads is
        gathered in a bytearray (appending is linear, where joining bytes read by
        read would be quadratic for a head trickled a byte at a time).
        """
        limit = self.shared.snapshot.max_header_bytes
        pending = self.buf
        if pending:
            old = len(pending)
            pending += data
            end = pending.find(b"\r\n\r\n", max(0, old - 3))
            if end == -1 or end + 4 > limit:
                self.unfinished(pending, old, end)
                return None
            buf = bytes(pending)
            self.buf = bytearray()
        else:
            buf = data
            if buf[:1] == b"\r" or buf[:1] == b"\n":
                buf = _skip_empty_lines(buf)
                if not buf:
                    return None
            end = buf.find(b"\r\n\r\n")
            if end == -1 or end + 4 > limit:
                self.unfinished(buf, 0, end)
                self.buf = bytearray(buf)
                return None
        self.head_since = 0.0
        self.begin(buf[: end + 2])
        return buf[end + 4 :]

    def unfinished(self, buf: bytes | bytearray, old: int, end: int) -> None:
        """A head not complete yet: refuse it at once if it can never be good."""
        if end != -1 or len(buf) > self.shared.snapshot.max_header_bytes:
            raise _Reject(431, "request line and headers exceed max_header_bytes")
        if bare_lf_end(buf, old):
            raise _Reject(400, "malformed request: bare LF line ends")
        if not self.head_since:
            self.head_since = time.monotonic()

    def begin(self, head: bytes) -> None:
        """Judge a whole head, make its exchange, and set up the reading of its body."""
        m = REQUEST_HEAD.fullmatch(head)
        if m is None:
            raise _Reject(400, f"malformed request: {head_fault(head)}")
        method, target, major, minor, lines = m.groups()
        if major != b"1" or minor not in (b"0", b"1"):
            raise _Reject(505, "HTTP version not supported")
        http11 = minor == b"1"
        ex = self.new_exchange(method, target, lines + b"\r\n", http11)
        framing = ex.head.framing
        self.last = ex
        if self.current is None:
            self.current = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause_reading(PAUSE_PIPELINE)
        mode = framing.mode
        if mode == LENGTH:
            self.phase = BODY_LENGTH
            self.left = framing.length
        elif mode == CHUNKED:
            self.phase = BODY_CHUNKED
            self.chunks = ChunkedReader(400, ex.snap.max_body_bytes)
        else:
            self.message_done()
            if ex.upgrade:
                self.phase = TUNNEL
                self.upgrade_bytes(b"")

    def message_done(self) -> None:
        self.phase = HEAD
        self.chunks = None
        ex = self.last
        self.last = None
        if ex is not None:
            ex.request_complete()

    def stop(self, reject: _Reject) -> None:
        self.phase = STOPPED
        self.buf = bytearray()
        self.bad_request(reject)

    def eof_received(self) -> bool | None:
        if self.phase == STOPPED and self.current is None:
            return None  # nothing more to answer: the transport closes itself
        if self.tunnel is not None:
            self.tunnel.client_lost()  # a tunnel ends when either side ends it
            return None
        if self.phase in (BODY_LENGTH, BODY_CHUNKED):
            self.stop(_Reject(400, "the client closed the connection mid-request"))
            return None
        # A half-closed client may still be waiting for its answer.
        self.eof = True
        return True if self.current is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.registry.discard(self)
        if self.current is not None:
            self.current.client_lost()
        if self.tunnel is not None:
            self.tunnel.client_lost()
        for ex in self.queue:
            ex.cancel()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = time.monotonic()
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = 0.0
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_paused(False)

    # -- ClientSide: what its exchanges call ------------------------------------------------

    def send(self, data: bytes) -> None:
        send(self.transport, data)

    def cut_off(self) -> None:
        abort(self.transport)

    def end_tunnel(self) -> None:
        close(self.transport)

    def peer_address(self) -> str:
        return self.peer

    # -- exchanges --------------------------------------------------------------------

    def new_exchange(self, method: bytes, target: bytes, block: bytes, http11: bool) -> Exchange:
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported")
        if target[:1] != b"/":
            target = _origin_form(method, target)
        snap = self.shared.snapshot
        head = scan_request(block, snap.table.scanner, snap.table.wanted, http11)
        if http11 and head.host is None:
            raise _Reject(400, "missing Host header")
        framing = head.framing
        keep_alive = framing.keep_alive(http11)
        upgrade = http11 and head.upgrade is not None and b"upgrade" in framing.options
        if upgrade and framing.mode != NONE:
            raise _Reject(400, "an upgrade request with a body")
        return self.exchange_for(snap, method, target, head, http11, keep_alive, upgrade)

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
        keep_alive = keep_alive and not self.shared.draining
        return Exchange(
            self, self.shared, self.tap, snap, decision, method, target, head_bytes, head,
            keep_alive, http11, upgrade,
        )  # fmt: skip

    def exchange_done(self, ex: Exchange) -> None:
        if ex is not self.current or self.tunnel is not None:
            return
        self.current = None
        if ex.close_client or self.closed or self.shared.draining or self.eof:
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
            self.stop(_Reject(400, "unexpected protocol upgrade"))
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
        if ex is not None and not ex.request_whole():
            reject.head_only = ex.head_request  # the rejected request is this one
            if ex is self.current:
                ex.fail(reject.status, None, reject.cause)  # aborts the upstream side
                return
            if self.queue and self.queue[-1] is ex:
                self.queue.pop()  # never forward a request that did not parse whole
            ex.cancel()
        if self.current is not None:
            self.reject = reject  # answer once the exchange in flight is over
            self.pause_reading(PAUSE_PIPELINE)
            return
        self.queue.clear()
        self.shared.recorder.rejected(reject.status)
        expose = self.shared.snapshot.expose_version
        answer = error_response(reject.status, None, reject.cause, expose, reject.head_only)
        send(self.transport, answer)
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

    def overdue(self, now: float, limits: Limits) -> None:
        """Enforce the timeouts; the server's sweep calls this about once a second."""
        if self.closed:
            return
        if self.progress != self.seen:
            self.seen = self.progress
            self.seen_at = now
        if self.write_paused and now - self.write_paused > limits.send_timeout:
            self.closed = True
            abort(self.transport)  # it stopped reading: what it did not take is lost anyway
            return
        phase = self.phase
        if phase == HEAD:
            if self.head_since and now - self.head_since > limits.client_header_timeout:
                self.stop(_Reject(408, "request head not received within client_header_timeout"))
                return
        elif phase in (BODY_LENGTH, BODY_CHUNKED):
            if self.paused:
                self.seen_at = now  # the proxy holds the client back: not its delay
            elif now - self.seen_at > limits.client_body_timeout:
                self.stop(_Reject(408, "request body stalled past client_body_timeout"))
                return
        ex = self.current
        if ex is not None:
            ex.stalled(now, limits.response_timeout, self.write_paused != 0.0)

    def closing(self) -> bool:
        return self.closed or self.shared.draining

    def close(self) -> None:
        """Close once what was queued has gone out, lingering as NGINX does.

        Closing a socket with unread bytes makes the kernel answer with a reset,
        which can destroy an answer (a 400, a 431, the last response before a
        drain) before the client reads it. So our side is half-closed first, and
        what the client still sends is read and dropped until it closes its side,
        for at most LINGER seconds.
        """
        if self.closed:
            return
        self.closed = True
        self.phase = STOPPED
        transport = self.transport
        if self.eof or not transport.can_write_eof():
            close(transport)
            return
        flush()
        transport.write_eof()
        if self.paused:
            self.paused = 0
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, transport.close)

    def idle(self) -> bool:
        return self.current is None and self.tunnel is None and not self.queue


def _skip_empty_lines(buf: bytes) -> bytes:
    """Drop the empty lines a client may send before a request line (RFC 9112 §2.2),
    at most MAX_EMPTY_LINES of them, each a whole CRLF."""
    rest = buf.lstrip(b"\r\n")
    skipped = len(buf) - len(rest)
    if skipped > 2 * MAX_EMPTY_LINES or buf.count(b"\r\n", 0, skipped) * 2 != skipped:
        raise _Reject(400, "malformed request: empty lines before the request line")
    return rest


def _origin_form(method: bytes, target: bytes) -> bytes:
    """Reduce an absolute-form target to its path; the named host is ignored."""
    low = target[:8].lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            return b"/" + (rest[query:] if query != -1 else b"")
        return rest[slash:]
    if target == b"*" and method == b"OPTIONS":
        return target
    raise _Reject(400, "invalid request target")
