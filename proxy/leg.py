"""One request's way to one version: the part a primary exchange and a shadow copy share.

Rules:
- Only endpoints from the config are dialled: an endpoint of the version is
  picked round-robin, skipping those backing off; a pooled connection is
  taken when there is one, else a fresh one is dialled (the only coroutine).
- A refused or timed-out dial, or a failed TLS handshake, is retried once on
  another endpoint of the same version (nothing was sent); a version with no
  endpoint to try fails at once. A TLS failure is a 502 of kind `tls`, its
  cause what OpenSSL said (`tls: certificate verify failed: ...`).
- A request without Host gets the dialled endpoint's (HTTP/1.1 upstreams
  require one, RFC 9112 §3.2).
- A pooled connection that closes before one byte of an answer was probably
  closed by the upstream as it was reused: a request with a safe or idempotent
  method and no body is sent again, once, on a fresh connection.
- A deadline is kept in the shared table the server's expiry loop checks
  (cheaper than a timer per request).
- What differs between a primary and a copy is a few hooks: what to send,
  what to do once attached, whether the request may go again, how a failure
  ends it.
"""

from __future__ import annotations

import asyncio
from typing import Final

from .answers import NO_BODY_STATUS
from .framing import LENGTH, RESPONSE_HEAD, FramingError, response_framing
from .headers import ResponseHead, scan_response
from .http.upstream import Pool, ResponseSink, UpstreamConnection, VersionPools
from .shared import Deadline, Shared
from .tls import TlsFailure

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def with_host(data: bytes, host: str) -> bytes:
    """`data` (a request head first) with a Host line naming `host` after its request line."""
    line_end = data.index(b"\r\n") + 2
    return b"%sHost: %s\r\n%s" % (data[:line_end], host.encode(), data[line_end:])


class UpstreamLeg(ResponseSink, Deadline):
    # Class-level defaults: most keep them for the leg's whole life.
    conn: UpstreamConnection | None = None
    pool: Pool | None = None
    tried: Pool | None = None  # the endpoint whose dial failed (one retry elsewhere)
    reused = False  # the connection came from the pool
    deadline = 0.0  # time.monotonic() seconds; 0.0: not waiting

    def __init__(
        self,
        shared: Shared,
        pools: VersionPools,
        method: bytes,
        needs_host: bool,
        dial_timeout: float,
    ) -> None:
        self.shared = shared
        self.pools = pools
        self.method = method
        self.head_request = method == b"HEAD"
        self.needs_host = needs_host
        self.dial_timeout = dial_timeout

    # -- hooks -------------------------------------------------------------------------

    def over(self) -> bool:
        """The exchange ended: a connection dialled for it now goes to the pool."""
        raise NotImplementedError

    def outgoing(self) -> bytes:
        """The request bytes to send on a connection just attached."""
        raise NotImplementedError

    def attached(self) -> None:
        """The request bytes went out on `self.conn`."""

    def rewind(self) -> bool:
        """Make ready to send the request again; False when it must not go again."""
        return False

    def leg_failed(self, status: int, kind: str, cause: str) -> None:
        """No connection could be had: end the exchange with this failure."""
        raise NotImplementedError

    def response_trailers(self, block: bytes) -> None:
        """Trailers are dropped unless the side above relays them (a primary does)."""

    # -- dialling ----------------------------------------------------------------------

    def dial(self, exclude: Pool | None) -> None:
        pool = self.pools.pick(exclude)
        if pool is None:
            # Refused without a dial (every endpoint is backing off): counted apart
            # from the dials that failed.
            self.leg_failed(502, "unavailable", "no endpoint available")
            return
        self.dial_pool(pool)

    def dial_pool(self, pool: Pool) -> None:
        self.pool = pool
        conn = pool.take()
        if conn is not None:
            self.reused = True
            self.attach(conn)
        else:
            asyncio.get_running_loop().create_task(self.connect(pool))

    async def connect(self, pool: Pool) -> None:
        try:
            conn = await pool.connect(self.dial_timeout)
        except TimeoutError:
            pool.refused()
            self.connect_failed(pool, 504, "timeout", "upstream connect timeout")
            return
        except TlsFailure as exc:  # an https:// endpoint whose handshake failed
            pool.refused()
            self.connect_failed(pool, 502, "tls", f"tls: {exc}")
            return
        except OSError as exc:
            pool.refused()
            self.connect_failed(pool, 502, "connect", f"connect failed: {exc.strerror or exc}")
            return
        if self.over():
            pool.give(conn)
            return
        self.attach(conn)

    def connect_failed(self, pool: Pool, status: int, kind: str, cause: str) -> None:
        if self.over():
            return
        if self.tried is None:
            self.tried = pool
            if self.pools.pick(pool) is not None:
                self.dial(pool)
                return
        self.leg_failed(status, kind, cause)

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.bind(self, self.head_request)
        data = self.outgoing()
        if self.needs_host:
            data = with_host(data, conn.pool.endpoint.key)
        conn.send(data)
        self.attached()

    def resend(self) -> bool:
        """Send again on a fresh connection after a pooled one closed unanswered."""
        pool = self.pool
        if not self.reused or pool is None or self.method not in IDEMPOTENT:
            return False
        if not self.rewind():
            return False
        self.reused = False
        asyncio.get_running_loop().create_task(self.connect(pool))
        return True

    def detach(self) -> UpstreamConnection | None:
        """The connection, no longer this leg's (the caller closes or pools it)."""
        conn = self.conn
        self.conn = None
        return conn

    def close_conn(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()

    # -- the response ------------------------------------------------------------------

    def sized(self, data: bytes, end: int) -> tuple[int, int, ResponseHead] | None:
        """A whole response framed by its length, read in one piece (see sized_response)."""
        if self.head_request:
            return None  # its Content-Length describes a body that never comes
        return sized_response(data, end)

    # -- the deadline ------------------------------------------------------------------

    def wait_until(self, deadline: float) -> None:
        self.deadline = deadline
        self.shared.awaiting[self] = None

    def stop_waiting(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.shared.awaiting.pop(self, None)

    def overdue_at(self) -> float:
        return self.deadline


# Upstreams send the same few response heads over and over (most often only the
# Date line changes, once a second): what sized_response made of a head seen
# lately is kept, so a repeated head costs one dictionary lookup.
_SIZED: Final[dict[bytes, tuple[int, int, ResponseHead] | None]] = {}
SIZED_HEADS_MAX: Final = 256  # distinct heads remembered; then the memory starts afresh


def sized_response(data: bytes, end: int) -> tuple[int, int, ResponseHead] | None:
    """A whole response read in one piece, plainly formed and framed by its length:
    (status, where its status line ends, its head); None when the full path must read it.

    `end` is where its head ends (the blank line). Not for an answer to HEAD. The
    result for a head is remembered (see above); a ResponseHead is never changed
    after it is made, so one may serve many responses.
    """
    head = data[: end + 2]
    try:
        found = _SIZED[head]
    except KeyError:
        found = _sized_head(head)
        if len(_SIZED) >= SIZED_HEADS_MAX:
            _SIZED.clear()
        _SIZED[head] = found
    if found is None:
        return None
    length = found[2].content_length
    if length is None or len(data) != end + 4 + length:
        return None
    return found


def _sized_head(head: bytes) -> tuple[int, int, ResponseHead] | None:
    """`head`: a status line and header lines, each ending CRLF.

    The framing authority (proxy.framing) judges it as it judges every head; a
    head it would refuse is left to the full path, which refuses it.
    """
    m = RESPONSE_HEAD.fullmatch(head)
    if m is None or m.group(1) != b"1":
        return None
    status = int(m.group(2))
    if status < 200 or status in NO_BODY_STATUS:
        return None
    sle = head.find(b"\r\n")
    block = head[sle:]
    try:
        framing = response_framing(block, status, False)
    except FramingError:
        return None
    if framing.mode != LENGTH:
        return None
    return status, sle, scan_response(block, False, framing)
