"""Reading requests from a client's bytes, each exactly as proxy.framing says.

Rules:
- Every request head is judged whole, in the strict grammar, before anything of
  it is acted on (proxy.framing): one framing authority, no second parser that
  could read the same bytes differently. Its body is read exactly as its
  framing says; the next request starts right after it.
- A malformed request raises `Reject` (400, or 405, 413, 431, 501, 505); the
  connection answers it and closes; nothing of it reaches an upstream. Head
  bytes are counted as they arrive: a head past `max_header_bytes` is refused
  before it is complete.
- The request target never chooses a destination: absolute-form targets are
  reduced to their path.
- The snapshot is read once per request, at the end of its head.
- `RequestReader` is the reading half of a client connection: it makes each
  request's Exchange and hands it to `admit`; what to do with it (start it,
  queue it behind another) is the connection's (proxy.http.downstream).
"""

from __future__ import annotations

import time
from typing import Final

from ..accesslog import REFUSED
from ..forward import ClientSide, Exchange, MirrorTap
from ..framing import (
    CHUNKED,
    LENGTH,
    NONE,
    REQUEST_HEAD,
    ChunkedReader,
    bare_lf_end,
    head_fault,
)
from ..headers import RequestHead, scan_request, upstream_request
from ..routing import RequestView, decide
from ..shared import Shared, Snapshot

MAX_EMPTY_LINES: Final = 8  # blank lines tolerated before a request line (RFC 9112 §2.2)

# What the connection is reading.
HEAD: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
TUNNEL: Final = 3
STOPPED: Final = 4  # a request was refused: nothing more is read


class Reject(Exception):
    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause
        self.head_only = False  # it answers a HEAD request: no body (RFC 9110 §9.3.2)


class RequestReader(ClientSide):
    """The reading half of a client connection (see the module's rules)."""

    __slots__ = (
        "shared", "tap", "scheme", "peer", "peer_bytes", "buf", "phase", "left", "chunks",
        "last", "head_since", "multiplexed",
    )  # fmt: skip

    def __init__(self, shared: Shared, tap: MirrorTap | None, secure: bool) -> None:
        self.shared = shared
        self.tap = tap
        self.scheme = b"https" if secure else b"http"  # X-Forwarded-Proto
        self.peer = ""
        self.peer_bytes = b""
        self.buf = bytearray()  # a request head still being received, over several reads
        self.phase = HEAD
        self.left = 0  # BODY_LENGTH: body bytes still to come
        self.chunks: ChunkedReader | None = None
        self.last: Exchange | None = None  # the exchange whose request is being read
        self.head_since = 0.0  # monotonic time the head being received began; 0: none
        # One stream of a multiplexed connection (proxy.http.h2): a drain ends the
        # connection with GOAWAY, not its exchanges' keep-alive.
        self.multiplexed = False

    # -- hooks of the connection -------------------------------------------------------

    def admit(self, ex: Exchange) -> None:
        """A request's head was read: start its exchange, or queue it."""
        raise NotImplementedError

    def upgrade_bytes(self, rest: bytes) -> None:
        """The request asked to switch protocols: `rest` and what follows go to it."""
        raise NotImplementedError

    def tunnel_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def bad_request(self, reject: Reject) -> None:
        """Answer a request that cannot be read or forwarded, then close."""
        raise NotImplementedError

    def refused(self, status: int, cause: str) -> None:
        """Count (and log) a request answered before it was routed."""
        shared = self.shared
        shared.recorder.rejected(status)
        log = shared.access
        if log is not None:
            now = time.monotonic()
            log.record(
                now, now, self.peer, None, None, status, REFUSED, 0, 0, None,
                "refused: " + cause, False,
            )  # fmt: skip

    def stop(self, reject: Reject) -> None:
        """Read nothing more; answer `reject`."""
        self.phase = STOPPED
        self.buf = bytearray()
        self.bad_request(reject)

    # -- reading -------------------------------------------------------------------------

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
                self.tunnel_bytes(data)
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
        self.begin(buf, end + 2)
        return buf[end + 4 :]

    def unfinished(self, buf: bytes | bytearray, old: int, end: int) -> None:
        """A head not complete yet: refuse it at once if it can never be good."""
        if end != -1 or len(buf) > self.shared.snapshot.max_header_bytes:
            raise Reject(431, "request line and headers exceed max_header_bytes")
        if bare_lf_end(buf, old):
            raise Reject(400, "malformed request: bare LF line ends")
        if not self.head_since:
            self.head_since = time.monotonic()

    def begin(self, buf: bytes, end: int) -> None:
        """Judge the whole head `buf[:end]` (its last line's CRLF included, not the
        blank line), make its exchange, and set up the reading of its body."""
        m = REQUEST_HEAD.fullmatch(buf, 0, end)
        if m is None:
            raise Reject(400, f"malformed request: {head_fault(buf[:end])}")
        method, target, major, minor = m.group(1, 2, 3, 4)
        if major != b"1" or minor not in (b"0", b"1"):
            raise Reject(505, "HTTP version not supported")
        http11 = minor == b"1"
        # the header lines as one block, each line ending CRLF, cut from the bytes read
        ex = self.new_exchange(method, target, buf[m.start(5) : end], http11)
        framing = ex.head.framing
        self.last = ex
        self.admit(ex)
        if self.phase == STOPPED:
            # Refused as it started (413 for its length, no endpoint, ...): the
            # connection is closing; nothing after this head is read as a request.
            self.last = None
            return
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

    def new_exchange(self, method: bytes, target: bytes, block: bytes, http11: bool) -> Exchange:
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported")
        if target[:1] != b"/":
            target = _origin_form(method, target)
        snap = self.shared.snapshot
        head = scan_request(block, snap.table.scanner, http11)
        if http11 and head.host is None:
            raise Reject(400, "missing Host header")
        framing = head.framing
        keep_alive = framing.keep_alive(http11)
        upgrade = http11 and head.upgrade is not None and b"upgrade" in framing.options
        if upgrade and framing.mode != NONE:
            raise Reject(400, "an upgrade request with a body")
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
        head_bytes = upstream_request(method, target, head, self.peer_bytes, self.scheme, upgrade)
        keep_alive = keep_alive and (self.multiplexed or not self.shared.draining)
        return Exchange(
            self, self.shared, self.tap, snap, decision, method, target, head_bytes, head,
            keep_alive, http11, upgrade,
        )  # fmt: skip


def _skip_empty_lines(buf: bytes) -> bytes:
    """Drop the empty lines a client may send before a request line (RFC 9112 §2.2),
    at most MAX_EMPTY_LINES of them, each a whole CRLF."""
    rest = buf.lstrip(b"\r\n")
    skipped = len(buf) - len(rest)
    if skipped > 2 * MAX_EMPTY_LINES or buf.count(b"\r\n", 0, skipped) * 2 != skipped:
        raise Reject(400, "malformed request: empty lines before the request line")
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
    raise Reject(400, "invalid request target")
