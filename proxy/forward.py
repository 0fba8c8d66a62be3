"""One exchange: a client request forwarded to one upstream endpoint and back.

Rules:
- Callback driven: with a pooled connection no coroutine is created; only a
  fresh connect runs as a task.
- Bodies stream both ways; nothing holds a whole body. Request bytes that
  arrive before the upstream connection is ready are buffered, and the client
  is paused past `CONNECT_BUFFER` bytes.
- A refused connect is retried once on another endpoint of the same version
  (nothing was sent); any failure after the request was sent is never retried.
- Proxy-made answers (400/413/502/504) carry a short JSON body naming the
  version and the cause, and are counted like upstream answers.
- Exactly one `Recorder.finished` per exchange.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from .framing import LENGTH as FRAMED_LENGTH
from .framing import RESPONSE_HEAD, Framing, FramingError, response_framing
from .headers import RequestHead, ResponseHead, scan_response
from .http.outbox import abort, close, send
from .http.upstream import Pool, UpstreamConnection

if TYPE_CHECKING:
    from .config import Mirror
    from .http.downstream import ClientConnection
    from .mirror import ShadowExchange
    from .routing import Decision
    from .runtime import Snapshot

CONNECT_BUFFER = 256 * 1024
NO_BODY_STATUS = frozenset({204, 304})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Response body framing towards the client.
LENGTH, CHUNKED, UNTIL_CLOSE, NONE = 0, 1, 2, 3

REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    405: b"Method Not Allowed",
}


# Upstreams send the same few response heads over and over (most often only the
# Date line changes, once a second): what sized_response made of a head seen
# lately is kept, so a repeated head costs one dictionary lookup.
_SIZED: dict[bytes, tuple[int, int, ResponseHead] | None] = {}
SIZED_HEADS_MAX = 256  # distinct heads remembered; then the memory starts afresh


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
    if found is None or len(data) != end + 4 + found[2].content_length:  # type: ignore[operator]
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
    if framing.mode != FRAMED_LENGTH:
        return None
    return status, sle, scan_response(block, False, framing)


def error_response(
    status: int, version: str | None, cause: str, expose: bool, head_only: bool = False
) -> bytes:
    """A proxy-made error: a JSON document, or only its head for an answer to HEAD."""
    body = json.dumps({"error": REASONS[status].decode(), "version": version, "cause": cause})
    data = body.encode() + b"\n"
    extra = b"X-Turnout-Version: %s\r\n" % version.encode() if version and expose else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n%s\r\n%s"
    ) % (status, REASONS[status], len(data), extra, b"" if head_only else data)


class Exchange:
    # No __slots__: most fields keep their class-level default for the whole
    # exchange, and not assigning them makes construction cheaper.
    conn: UpstreamConnection | None = None
    pool: Pool | None = None
    req_buffered = 0
    req_done = False
    req_bytes = 0
    sent = False
    deadline = 0.0  # perf_counter() by which the response head must arrive; 0: none
    resp_pending: bytes | None = None
    resp_mode = NONE
    resp_started = False
    resp_keep_alive = True
    status = 0
    done = False
    tunnel = False
    tunnel_buf = b""
    tried: Pool | None = None
    close_client = False
    held = False  # a chunked request body is being collected before dispatch
    reused = False  # the upstream connection came from the pool
    mirror_cfg: Mirror | None = None  # this request is to be copied to the canary
    shadow_body: list[bytes] | None = None  # the request body, teed for the copy
    shadow_bytes = 0
    shadow: ShadowExchange | None = None  # a copy in flight that compares: fed our answer

    def __init__(
        self,
        client: ClientConnection,
        snap: Snapshot,
        decision: Decision,
        method: bytes,
        target: bytes,
        head_bytes: bytes,
        head: RequestHead,
        keep_alive: bool,
        http11: bool,
        upgrade: bool,
    ) -> None:
        self.client = client
        self.snap = snap
        self.decision = decision
        self.version = decision.version
        self.method = method
        self.target = target
        self.head = head
        self.keep_alive = keep_alive
        self.http11 = http11
        self.upgrade = upgrade
        self.is_head = method == b"HEAD"
        self.head_bytes = head_bytes
        self.req_buf: list[bytes] = [head_bytes]
        self.t0 = time.perf_counter()
        if snap.config.mirror is not None:
            # Decided now, not at start(): a pipelined request's body is read while
            # it waits its turn, and the copy needs it.
            self.mirror_cfg = client.server.mirroring.eligible(self, decision)
            if self.mirror_cfg is not None:
                self.shadow_body = []

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        snap = self.snap
        length = self.head.content_length
        if length is not None and length > snap.config.limits.max_body_bytes:
            self.fail(413, None, "request body exceeds max_body_bytes")
            return
        if self.head.chunked and not self.head.expect_continue and not self.req_done:
            # Hold a chunked body until it has parsed whole (or grown past the
            # connect buffer), so a malformed small body never reaches an upstream.
            self.held = True
            return
        self.dispatch(None)

    def dispatch(self, exclude: Pool | None) -> None:
        pool = self.snap.upstreams.versions[self.version].pick(exclude)
        if pool is None:
            # Refused without a dial (every endpoint is backing off): counted apart
            # from the dials that failed.
            self.fail(502, "unavailable", "no endpoint available")
            return
        self.pool = pool
        conn = pool.take()
        if conn is not None:
            self.reused = True
            self.attach(conn)
        else:
            self.client.loop.create_task(self.connect(pool))

    async def connect(self, pool: Pool) -> None:
        try:
            conn = await pool.connect(self.snap.config.limits.connect_timeout)
        except TimeoutError:
            pool.refused()
            self.connect_failed(pool, 504, "timeout", "upstream connect timeout")
            return
        except OSError as exc:
            pool.refused()
            self.connect_failed(pool, 502, "connect", f"connect failed: {exc.strerror or exc}")
            return
        if self.done:
            pool.give(conn)
            return
        self.attach(conn)

    def connect_failed(self, pool: Pool, status: int, kind: str, cause: str) -> None:
        if self.done:
            return
        if self.tried is None:
            self.tried = pool
            if self.snap.upstreams.versions[self.version].pick(pool) is not None:
                self.dispatch(pool)
                return
        self.fail(status, kind, cause)

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self
        buf = self.req_buf
        if self.head.host is None:
            # An HTTP/1.0 request may lack Host; HTTP/1.1 upstreams require one
            # (RFC 9112 §3.2): name the endpoint being dialled.
            line_end = buf[0].index(b"\r\n") + 2
            host = conn.pool.endpoint.key.encode()
            buf[0] = b"%sHost: %s\r\n%s" % (buf[0][:line_end], host, buf[0][line_end:])
        conn.send(buf[0] if len(buf) == 1 else b"".join(buf))
        self.req_buf = []
        self.sent = True
        if self.req_buffered > CONNECT_BUFFER:
            self.client.resume_reading(4)
        self.req_buffered = 0
        if self.req_done:
            self.arm_timer()

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's send buffer filled (or drained): pause (resume) the client."""
        if paused:
            self.client.pause_reading(2)
        else:
            self.client.resume_reading(2)

    def arm_timer(self) -> None:
        """Wait for the response head at most `response_timeout` from now.

        A deadline in a shared table that the server checks ten times a second
        costs less than a timer per request.
        """
        if not self.upgrade and not self.status:
            self.deadline = time.perf_counter() + self.snap.config.limits.response_timeout
            self.client.server.awaiting[self] = None

    def awaiting_done(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.client.server.awaiting.pop(self, None)

    def timed_out(self) -> None:
        self.deadline = 0.0
        if not self.done and not self.resp_started and self.resp_pending is None:
            self.upstream_failed("timeout", "upstream response timeout", 504)

    # -- request body (client -> upstream) ----------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.done:
            return
        self.req_bytes += len(data)
        if self.req_bytes > self.snap.config.limits.max_body_bytes:
            self.fail(413, None, "request body exceeds max_body_bytes")
            return
        if self.shadow_body is not None:
            self.tee(data)
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.sent:
            self.conn.send(data)  # type: ignore[union-attr]
        else:
            self.req_buf.append(data)
            self.req_buffered += len(data)
            if self.req_buffered > CONNECT_BUFFER:
                if self.held:
                    self.held = False
                    self.dispatch(None)
                if not self.sent:
                    self.client.pause_reading(4)

    def tee(self, data: bytes) -> None:
        """Keep the body for the copy, up to the mirror's limit; past it, drop the copy."""
        self.shadow_bytes += len(data)
        if self.shadow_bytes > self.mirror_cfg.max_body_bytes:  # type: ignore[union-attr]
            self.shadow_body = None
            self.client.server.mirroring.drop()
        else:
            self.shadow_body.append(data)  # type: ignore[union-attr]

    def request_complete(self) -> None:
        self.req_done = True
        if self.shadow_body is not None and not self.done:
            body, self.shadow_body = self.shadow_body, None
            mirroring = self.client.server.mirroring
            self.shadow = mirroring.launch(self, self.mirror_cfg, body)  # type: ignore[arg-type]
        if self.done:
            return
        if self.head.chunked:
            if self.sent:
                self.conn.send(b"0\r\n\r\n")  # type: ignore[union-attr]
            else:
                self.req_buf.append(b"0\r\n\r\n")
        if self.held:
            self.held = False
            self.dispatch(None)
        elif self.sent:
            self.arm_timer()

    # -- response (upstream -> client) ----------------------------------------------------

    def response_head(self, status: int, head: bytes, keep_alive: bool, framing: Framing) -> None:
        """`head` is the upstream's status line and header lines, each ending CRLF."""
        sle = head.find(b"\r\n")
        status_line = head[:sle]
        if status_line[:8] != b"HTTP/1.1":
            status_line = b"HTTP/1.1" + status_line[8:]
        if status < 200 and status != 101:
            if self.http11 and (status != 100 or self.head.expect_continue):
                send(self.client.transport, status_line + b"\r\n\r\n")
            return
        self.awaiting_done()
        upgrading = status == 101 and self.upgrade
        if self.shadow is not None:
            self.shadow.primary_head(status, head[sle:])
        self.resp_pending = self.client_head(
            status,
            status_line,
            scan_response(head[sle:], upgrading, framing),
            keep_alive,
            upgrading,
        )

    def client_head(
        self, status: int, status_line: bytes, rh: ResponseHead, keep_alive: bool, upgrading: bool
    ) -> bytes:
        """The response head for the client; sets the framing of the body to follow."""
        self.status = status
        self.resp_keep_alive = keep_alive
        client_close = self.close_client or not self.keep_alive or self.client.closing()
        if upgrading:
            mode = NONE
            framing = b"Connection: upgrade\r\n"
        elif self.is_head or status in NO_BODY_STATUS:
            mode = NONE
            framing = b""  # a Content-Length from the upstream is relayed as it is
        elif rh.content_length is not None and not rh.chunked:
            mode = LENGTH
            framing = b""  # the upstream's Content-Length line is relayed as it is
        elif self.http11:
            mode = CHUNKED
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            mode = UNTIL_CLOSE
            framing = b""
            client_close = True
        if self.upgrade and not upgrading:
            client_close = True  # a refused upgrade: the client may already be sending frames
        self.close_client = client_close
        if not upgrading:
            if client_close:
                framing += b"Connection: close\r\n"
            elif not self.http11:
                framing += b"Connection: keep-alive\r\n"
        self.resp_mode = mode
        if self.snap.config.expose_version:
            framing += self.decision.version_header
        if self.decision.set_cookie is not None:
            framing += (
                b"Set-Cookie: turnout_id=%s; Path=/; HttpOnly; SameSite=Lax; Max-Age=31536000\r\n"
                % self.decision.set_cookie.encode()
            )
        return b"".join((status_line, rh.block, framing, b"\r\n"))

    def whole_response(self, data: bytes, end: int) -> bool:
        """Relay a complete, plainly formed response read in one piece, in one call.

        `end` is where its head ends. Returns False, having changed nothing, when
        the response needs the full parser.
        """
        if self.is_head or self.upgrade:
            return False
        found = sized_response(data, end)
        if found is None:
            return False
        status, sle, rh = found
        self.awaiting_done()
        if self.shadow is not None:
            self.shadow.primary_head(status, data[sle : end + 2])
            self.shadow.primary_body(data[end + 4 :])
        head = self.client_head(status, data[:sle], rh, not rh.close, False)
        send(self.client.transport, head + data[end + 4 :] if rh.content_length else head)
        self.resp_started = True
        self.release()
        return True

    def flush_response_head(self) -> None:
        pending = self.resp_pending
        if pending is not None:
            self.resp_pending = None
            self.resp_started = True
            send(self.client.transport, pending)

    def response_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.shadow is not None:
            self.shadow.primary_body(data)
        if self.resp_mode == CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        pending = self.resp_pending
        if pending is not None:
            self.resp_pending = None
            self.resp_started = True
            data = pending + data
        send(self.client.transport, data)

    def response_complete(self) -> None:
        if self.done or self.status == 101:
            return  # 101 completes via upgraded()
        out = self.resp_pending or b""
        self.resp_pending = None
        if self.resp_mode == CHUNKED:
            out += b"0\r\n\r\n"
        self.resp_started = True
        if out:
            send(self.client.transport, out)
        self.release()

    def release(self) -> None:
        """The response went out whole: return the upstream connection and finish."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            if self.req_done and self.resp_keep_alive and not self.upgrade:
                self.pool.give(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        if not self.req_done:
            self.close_client = True
        if self.shadow is not None:
            self.shadow.primary_done(True)
            self.shadow = None
        self.finish(self.status, None)

    # -- upgrade tunnel -----------------------------------------------------------------

    def upgraded(self, rest: bytes) -> None:
        """The upstream answered 101: relay the head, then copy bytes both ways."""
        if self.status != 101 or not self.upgrade:
            self.upstream_failed("protocol", "unexpected protocol switch")
            return
        self.tunnel = True
        self.resp_started = True
        pending, self.resp_pending = self.resp_pending, None
        send(self.client.transport, (pending or b"") + rest)
        if self.tunnel_buf:
            self.conn.send(self.tunnel_buf)  # type: ignore[union-attr]
            self.tunnel_buf = b""
        self.client.start_tunnel(self)
        self.finish(101, None)

    def tunnel_from_client(self, data: bytes) -> None:
        if self.tunnel and self.conn is not None:
            self.conn.send(data)
        else:
            self.tunnel_buf += data

    # -- failures -----------------------------------------------------------------------

    def upstream_lost(self, silent: bool = False, until_close: bool = False) -> None:
        """The upstream connection closed under this exchange.

        `silent`: not one byte of a response had arrived on it.
        """
        self.conn = None
        if silent and self.stale_pooled():
            return
        if self.tunnel:
            close(self.client.transport)
            return
        if self.done:
            return
        if self.status and until_close:
            self.response_complete()  # the upstream's close is the end of its body
            return
        if self.status and self.resp_mode == CHUNKED and not self.is_head:
            self.upstream_failed("reset", "upstream closed mid-response")
            return
        self.upstream_failed("reset", "upstream closed the connection")

    def stale_pooled(self) -> bool:
        """Retry on a fresh connection when a pooled one turns out to be closed.

        An upstream may close an idle keep-alive connection just as it is reused;
        the request was then never processed. Only a bodiless request with a safe
        or idempotent method is resent, and only once.
        """
        if not (self.reused and not self.status and self.req_done and not self.req_bytes):
            return False
        if self.method not in IDEMPOTENT or self.head.chunked or self.head.content_length:
            return False
        self.reused = False
        self.awaiting_done()
        self.sent = False
        self.req_buf = [self.head_bytes]
        self.client.loop.create_task(self.connect(self.pool))  # type: ignore[arg-type]
        return True

    def upstream_failed(self, kind: str, cause: str, status: int = 502) -> None:
        if self.done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.fail(status, kind, cause)

    def fail(self, status: int, kind: str | None, cause: str) -> None:
        """Answer with a proxy-made error, or cut the client off if bytes already went."""
        if self.done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.awaiting_done()
        self.close_client = True
        if self.resp_started:
            # A response cut short: counted as the failure it is, not as its head's code.
            abort(self.client.transport)
            self.finish(status, kind)
            return
        self.resp_pending = None
        expose = self.snap.config.expose_version
        answer = error_response(status, self.version, cause, expose, self.is_head)
        send(self.client.transport, answer)
        self.resp_started = True
        self.finish(status, kind)

    def client_lost(self) -> None:
        """The client went away: abandon the upstream side."""
        if self.tunnel:
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.close()
            return
        if self.done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.awaiting_done()
        self.finish(499, None)

    def finish(self, status: int, error: str | None) -> None:
        self.done = True
        if self.shadow is not None:  # the primary failed: nothing to compare the copy with
            self.shadow.primary_done(False)
            self.shadow = None
        rec = self.client.recorder
        rec.finished(self.decision.label, status, time.perf_counter() - self.t0, error)
        self.client.exchange_done(self)
