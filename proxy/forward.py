"""One exchange: a client request forwarded to one upstream endpoint and back.

Rules:
- Callback driven: with a pooled connection no coroutine is created; only a
  fresh connect runs as a task (proxy.leg, shared with shadow copies).
- Bodies stream both ways; nothing holds a whole body. Request bytes that
  arrive before the upstream connection is ready are buffered, and the client
  is paused past `CONNECT_BUFFER` bytes.
- Any failure after the request was sent is never retried, except the one
  resend of proxy.leg on a stale pooled connection.
- Proxy-made answers (400/413/502/504) carry a short JSON body naming the
  version and the cause (proxy.answers), and are counted like upstream answers.
- Exactly one `Recorder.finished` per exchange: when its response phase
  reaches an ending (proxy.phases); with the access log on, one record too.
  A gRPC call's outcome is its `grpc-status` (trailers, or a trailers-only
  head; a proxy-made answer's code maps as gRPC's HTTP table says), counted
  too (`Recorder.grpc_finished`); a gRPC call to a version without an HTTP/2
  upstream is never forwarded (502 `protocol`, which its client reads as
  UNAVAILABLE).
- The exchange knows its client only as a `ClientSide` and the mirror only
  as a `MirrorTap`, both declared here and implemented above; it is handed
  both, and the shared state, when it is made.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

from .answers import CHUNKED, NONE, client_framing, error_response, grpc_for_http
from .config import Mirror
from .framing import Framing
from .headers import RequestHead, ResponseHead, grpc_status, relayed_trailers, scan_response
from .leg import UpstreamLeg
from .phases import (
    AWAITING,
    BODY,
    BUFFERED,
    BUFFERING,
    CANCELLED,
    COMPLETE,
    DROPPED,
    ENDED,
    FAILED,
    HEAD_HELD,
    HELD,
    SENT,
    STREAMING,
    SWITCHED,
    TUNNEL,
    request_to,
    response_to,
)
from .routing import Decision
from .shared import Shared, Snapshot

# The data plane's one clock (monotonic seconds): deadlines, durations and idle
# times alike, so one reading at an exchange's end serves all three.
_clock: Final = time.monotonic  # bound once: a static, not a lookup per call

CONNECT_BUFFER: Final = 256 * 1024

# Reasons the client connection is paused (a bit each), as ClientSide takes them.
PAUSE_UPSTREAM: Final = 2  # the upstream's send buffer is full
PAUSE_CONNECT: Final = 4  # buffering while the upstream connection is made


class ClientSide(Protocol):
    """What an exchange needs of the client connection that feeds it."""

    def send(self, data: bytes) -> None:
        """Queue bytes for the client (proxy.http.outbox)."""
        ...

    def cut_off(self) -> None:
        """Abort the connection: a response was cut short."""
        ...

    def end_tunnel(self) -> None:
        """Close the connection after what was queued: the tunnel's other side ended."""
        ...

    def pause_reading(self, reason: int) -> None: ...

    def resume_reading(self, reason: int) -> None: ...

    def closing(self) -> bool:
        """The connection will not carry another request."""
        ...

    def start_tunnel(self, ex: Exchange) -> None: ...

    def exchange_done(self, ex: Exchange, now: float) -> None:
        """`ex` is over, at `now` (time.monotonic() seconds)."""
        ...

    def peer_address(self) -> str: ...

    def secure(self) -> bool:
        """The client came over TLS (cookies the proxy sets are then `Secure`)."""
        ...


class Shadow(Protocol):
    """A copy in flight that compares: fed the primary's answer."""

    def primary_head(self, status: int, block: bytes) -> None: ...

    def primary_body(self, data: bytes) -> None: ...

    def primary_done(self, ok: bool) -> None: ...


class MirrorTap(Protocol):
    """Where copies of requests go (proxy.mirror)."""

    def eligible(self, ex: Forwarding, decision: Decision) -> Mirror | None:
        """The policy to copy `ex` under (its body is not known yet), or None."""
        ...

    def drop(self) -> None:
        """A copy was given up (its body grew past the limit)."""
        ...

    def launch(self, ex: Forwarding, cfg: Mirror, body: list[bytes]) -> Shadow | None:
        """Send the copy now that the request is whole; the copy to feed, if it compares."""
        ...


class Forwarding(UpstreamLeg):
    """The request side: from the client to the upstream (see Exchange)."""

    # No __slots__: most fields keep their class-level default for the whole
    # exchange, and not assigning them makes construction cheaper.
    req = BUFFERING  # request phase (proxy.phases)
    resp = AWAITING  # response phase
    req_buffered = 0
    req_bytes = 0  # request body bytes read from the client
    resp_bytes = 0  # response body bytes relayed to the client
    status = 0
    close_client = False
    mirror_cfg: Mirror | None = None  # this request is to be copied to the canary
    shadow_body: list[bytes] | None = None  # the request body, teed for the copy
    shadow_bytes = 0
    paused_client = False  # this exchange paused its client's reading (upstream or buffer)
    grpc = False  # a gRPC call (content-type application/grpc*): its outcome is grpc-status
    grpc_code = -1  # the answer's grpc-status (its trailers, or a trailers-only head); -1: none

    def __init__(
        self,
        client: ClientSide,
        shared: Shared,
        tap: MirrorTap | None,
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
        version = decision.version
        pools = snap.upstreams.versions[version]
        super().__init__(shared, pools, method, head.host is None, snap.connect_timeout)
        self.client = client
        self.tap = tap
        self.snap = snap
        self.decision = decision
        self.version = version
        self.target = target
        self.head = head
        self.head_bytes = head_bytes
        self.req_buf: list[bytes] = [head_bytes]
        # A copy in flight that compares: fed our answer. Set here, not as a class
        # default: mypyc sets no class default of an attribute typed as a trait.
        self.shadow: Shadow | None = None
        self.keep_alive = keep_alive
        self.http11 = http11
        self.upgrade = upgrade
        self.t0 = _clock()
        if snap.mirror is not None and tap is not None:
            # Decided now, not at start(): a pipelined request's body is read while
            # it waits its turn, and the copy needs it.
            self.mirror_cfg = tap.eligible(self, decision)
            if self.mirror_cfg is not None:
                self.shadow_body = []

    # -- hooks the subclass fills --------------------------------------------------------

    def fail(self, status: int, kind: str | None, cause: str) -> None:
        raise NotImplementedError

    def arm_timer(self) -> None:
        raise NotImplementedError

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.grpc and not self.pools.h2:
            cause = f"gRPC needs an HTTP/2 upstream: version {self.version} speaks HTTP/1.1"
            self.fail(502, "protocol", cause)  # a gRPC client reads UNAVAILABLE (14)
            return
        if self.grpc and self.mirror_cfg is not None:
            self.copy_grpc()
        length = self.head.content_length
        if length is not None and length > self.snap.max_body_bytes:
            self.fail(413, None, "request body exceeds max_body_bytes")
            return
        if self.head.chunked and not self.head.expect_continue and self.req == BUFFERING:
            # Hold a chunked body until it has parsed whole (or grown past the
            # connect buffer), so a malformed small body never reaches an upstream.
            self.req = request_to(self.req, HELD)
            return
        self.dial(None)

    def copy_grpc(self) -> None:
        """A gRPC call is copied only to a canary that speaks HTTP/2: to another, its
        copy would fail as the call itself would."""
        snap = self.snap
        if not snap.upstreams.versions[snap.canary].h2 and self.tap is not None:
            self.mirror_cfg = None
            self.shadow_body = None
            self.tap.drop()

    def request_whole(self) -> bool:
        return self.req == BUFFERED or self.req == SENT

    def drop_request(self) -> None:
        """The exchange ended: a request not sent whole never will be."""
        if self.req != SENT and self.req != SWITCHED:
            self.req = request_to(self.req, DROPPED)

    # -- the leg's hooks -----------------------------------------------------------------

    def over(self) -> bool:
        return self.resp >= ENDED

    def outgoing(self) -> bytes:
        buf = self.req_buf
        self.req_buf = []
        return buf[0] if len(buf) == 1 else b"".join(buf)

    def attached(self) -> None:
        whole = self.req == BUFFERED
        self.req = request_to(self.req, SENT if whole else STREAMING)
        if self.req_buffered > CONNECT_BUFFER:
            self.client.resume_reading(PAUSE_CONNECT)
        self.req_buffered = 0
        if whole:
            self.arm_timer()

    def rewind(self) -> bool:
        if self.over() or self.status or self.req != SENT or self.req_bytes:
            return False
        if self.head.chunked or self.head.content_length:
            return False
        self.stop_waiting()
        self.req = request_to(self.req, BUFFERED)
        self.req_buf = [self.head_bytes]
        return True

    def leg_failed(self, status: int, kind: str, cause: str) -> None:
        self.fail(status, kind, cause)

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's send buffer filled (or drained): pause (resume) the client."""
        if paused:
            self.paused_client = True
            self.client.pause_reading(PAUSE_UPSTREAM)
        else:
            self.client.resume_reading(PAUSE_UPSTREAM)

    # -- request body (client -> upstream) ----------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.resp >= ENDED or not data:
            return  # an empty piece would end a chunked body towards the upstream
        self.req_bytes += len(data)
        if self.req_bytes > self.snap.max_body_bytes:
            self.fail(413, None, "request body exceeds max_body_bytes")
            return
        if self.shadow_body is not None:
            self.tee(data)
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        conn = self.conn
        if self.req == STREAMING and conn is not None:
            conn.send(data)
            return
        self.req_buf.append(data)
        self.req_buffered += len(data)
        if self.req_buffered > CONNECT_BUFFER:
            if self.req == HELD:
                self.req = request_to(self.req, BUFFERING)
                self.dial(None)
            if self.req != STREAMING:
                self.paused_client = True
                self.client.pause_reading(PAUSE_CONNECT)

    def tee(self, data: bytes) -> None:
        """Keep the body for the copy, up to the mirror's limit; past it, drop the copy."""
        body, cfg = self.shadow_body, self.mirror_cfg
        if body is None or cfg is None:
            return
        self.shadow_bytes += len(data)
        if self.shadow_bytes > cfg.max_body_bytes:
            self.shadow_body = None
            if self.tap is not None:
                self.tap.drop()
        else:
            body.append(data)

    def request_complete(self) -> None:
        ended = self.resp >= ENDED
        body, cfg = self.shadow_body, self.mirror_cfg
        if body is not None and cfg is not None and not ended and self.tap is not None:
            self.shadow_body = None
            self.shadow = self.tap.launch(self, cfg, body)
        if ended:
            return
        if self.head.chunked:
            if self.req == STREAMING and self.conn is not None:
                self.conn.send(b"0\r\n\r\n")
            else:
                self.req_buf.append(b"0\r\n\r\n")
        req = self.req
        if req == STREAMING:
            self.req = request_to(req, SENT)
            self.arm_timer()
        elif req == HELD:
            self.req = request_to(req, BUFFERED)
            self.dial(None)
        else:
            self.req = request_to(req, BUFFERED)


class Responding(Forwarding):
    """The response side: from the upstream to the client (see Exchange)."""

    resp_mode = NONE
    resp_keep_alive = True
    pending = b""  # HEAD_HELD: the client's head, to go out with the first body bytes
    trailers = b""  # the upstream's trailer lines, relayed at the end of a chunked body

    # -- response (upstream -> client) ----------------------------------------------------

    def response_head(self, status: int, head: bytes, keep_alive: bool, framing: Framing) -> None:
        """`head` is the upstream's status line and header lines, each ending CRLF."""
        sle = head.find(b"\r\n")
        status_line = head[:sle]
        if status_line[:8] != b"HTTP/1.1":
            status_line = b"HTTP/1.1" + status_line[8:]
        if status < 200 and status != 101:
            if self.http11 and (status != 100 or self.head.expect_continue):
                self.client.send(status_line + b"\r\n\r\n")
            return
        self.stop_waiting()
        if self.grpc:
            self.grpc_code = grpc_status(head)  # a trailers-only answer's
        upgrading = status == 101 and self.upgrade
        if self.shadow is not None:
            self.shadow.primary_head(status, head[sle:])
        rh = scan_response(head[sle:], upgrading, framing)
        self.pending = self.client_head(status, status_line, rh, keep_alive, upgrading)
        self.resp = response_to(self.resp, HEAD_HELD)

    def client_head(
        self,
        status: int,
        status_line: bytes,
        rh: ResponseHead,
        keep_alive: bool,
        upgrading: bool,
        body: bytes = b"",
    ) -> bytes:
        """The response head for the client, followed by `body` (a whole response's, in
        the same bytes); sets the framing of the body to follow."""
        self.status = status
        self.resp_keep_alive = keep_alive
        close = self.close_client or not self.keep_alive or self.client.closing()
        sized = rh.content_length is not None and not rh.chunked
        mode, lines, close = client_framing(
            status, sized, self.head_request, self.http11, self.upgrade, upgrading, close
        )
        self.close_client = close
        self.resp_mode = mode
        decision = self.decision
        if self.snap.expose_version:
            lines += decision.version_header
        if decision.set_cookie is not None:
            secure = b"; Secure" if self.client.secure() else b""
            lines += (
                b"Set-Cookie: turnout_id=%s; Path=/; HttpOnly; SameSite=Lax; Max-Age=31536000%s\r\n"
                % (decision.set_cookie.encode(), secure)
            )
        return b"".join((status_line, rh.block, lines, b"\r\n", body))

    def whole_response(self, data: bytes, end: int) -> bool:
        """Relay a complete, plainly formed response read in one piece, in one call."""
        if self.upgrade or self.grpc:
            return False
        found = self.sized(data, end)
        if found is None:
            return False
        status, sle, rh = found
        self.stop_waiting()
        if self.shadow is not None:
            self.shadow.primary_head(status, data[sle : end + 2])
            self.shadow.primary_body(data[end + 4 :])
        self.resp_bytes = len(data) - end - 4
        self.client.send(
            self.client_head(status, data[:sle], rh, not rh.close, False, data[end + 4 :])
        )
        self.release()
        return True

    def read_done(self) -> None:
        if self.resp == HEAD_HELD:
            self.resp = BODY
            pending, self.pending = self.pending, b""
            self.client.send(pending)

    def response_body(self, data: bytes) -> None:
        if self.resp >= ENDED:
            return
        if self.shadow is not None:
            self.shadow.primary_body(data)
        self.resp_bytes += len(data)
        if self.resp_mode == CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.resp == HEAD_HELD:
            self.resp = BODY
            data = self.pending + data
            self.pending = b""
        self.client.send(data)

    def response_trailers(self, block: bytes) -> None:
        if self.grpc:
            self.grpc_code = grpc_status(block)
        # Relayed only to a client that said it takes them (TE: trailers), on a
        # chunked response; otherwise dropped, as RFC 9110 §6.5.1 allows.
        if self.resp_mode == CHUNKED and self.head.te_trailers:
            self.trailers = relayed_trailers(block)

    def response_complete(self) -> None:
        if self.resp >= ENDED or self.status == 101:
            return  # 101 completes via upgraded()
        out = self.pending
        self.pending = b""
        if self.resp_mode == CHUNKED:
            out += b"0\r\n%s\r\n" % self.trailers
        if out:
            self.client.send(out)
        self.release()

    def release(self) -> None:
        """The response went out whole: return the upstream connection and finish."""
        conn = self.detach()
        whole = self.req == SENT
        now = _clock()
        if conn is not None:
            if whole and self.resp_keep_alive and not self.upgrade and self.pool is not None:
                self.pool.give(conn, now)
            else:
                conn.close()
        if not whole:
            self.close_client = True
        if self.shadow is not None:
            self.shadow.primary_done(True)
            self.shadow = None
        self.end(COMPLETE, self.status, None, now)

    def end(self, phase: int, status: int, error: str | None, now: float = 0.0) -> None:
        """The exchange is over (Exchange's: it counts, logs and tells the client)."""
        raise NotImplementedError


class Exchange(Responding):
    """One request and its response, between a ClientSide and an upstream connection.

    Its two phases (proxy.phases) say where it is; `status` is the response's
    code once its final head arrived.
    """

    tunnel_buf = b""
    up_seen = 0  # the upstream connection's `progress` at the last change seen
    up_seen_at = 0.0

    def arm_timer(self) -> None:
        """Wait for the response head at most `response_timeout` from now."""
        if not self.upgrade and not self.status:
            self.wait_until(_clock() + self.snap.response_timeout)

    def timed_out(self) -> None:
        self.deadline = 0.0
        if self.resp == AWAITING:
            self.upstream_failed("timeout", "upstream response timeout", 504)

    # -- upgrade tunnel -----------------------------------------------------------------

    def upgraded(self, rest: bytes) -> None:
        """The upstream answered 101: relay the head, then copy bytes both ways."""
        if self.status != 101 or not self.upgrade or self.req != SENT:
            self.upstream_failed("protocol", "unexpected protocol switch")
            return
        self.req = request_to(self.req, SWITCHED)
        pending, self.pending = self.pending, b""
        self.client.send(pending + rest)
        if self.tunnel_buf and self.conn is not None:
            self.conn.send(self.tunnel_buf)
            self.tunnel_buf = b""
        self.client.start_tunnel(self)
        self.end(TUNNEL, 101, None)

    def tunnel_data(self, data: bytes) -> None:
        self.client.send(data)

    def tunnel_from_client(self, data: bytes) -> None:
        if self.resp == TUNNEL and self.conn is not None:
            self.conn.send(data)
        else:
            self.tunnel_buf += data

    # -- flow control and stalls ----------------------------------------------------------

    def client_paused(self, paused: bool) -> None:
        """The client stopped (resumed) reading: so does the upstream side."""
        conn = self.conn
        if conn is not None:
            if paused:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def stalled(self, now: float, timeout: float, client_paused: bool) -> None:
        """An upstream that stops sending mid-response is cut off after `timeout`."""
        conn = self.conn
        if conn is None or not self.status or self.resp >= ENDED:
            return
        if conn.progress != self.up_seen or client_paused:
            self.up_seen = conn.progress
            self.up_seen_at = now
        elif now - self.up_seen_at > timeout:
            self.upstream_failed("timeout", "upstream stalled mid-response", 504)

    # -- failures -----------------------------------------------------------------------

    def upstream_lost(self, silent: bool = False, until_close: bool = False) -> None:
        """The upstream connection closed under this exchange."""
        self.conn = None
        if silent and self.resend():
            return
        if self.resp == TUNNEL:
            self.client.end_tunnel()
            return
        if self.resp >= ENDED:
            return
        if self.status and until_close:
            self.response_complete()  # the upstream's close is the end of its body
            return
        if self.status and self.resp_mode == CHUNKED and not self.head_request:
            self.upstream_failed("reset", "upstream closed mid-response")
            return
        self.upstream_failed("reset", "upstream closed the connection")

    def upstream_failed(self, kind: str, cause: str, status: int = 502) -> None:
        if self.resp >= ENDED:
            return
        self.close_conn()
        self.fail(status, kind, cause)

    def fail(self, status: int, kind: str | None, cause: str) -> None:
        """Answer with a proxy-made error, or cut the client off if bytes already went."""
        if self.resp >= ENDED:
            return
        self.close_conn()
        self.stop_waiting()
        self.close_client = True
        if self.resp == BODY:
            # A response cut short: counted as the failure it is, not as its head's code.
            self.client.cut_off()
        else:
            self.pending = b""
            expose = self.snap.expose_version
            answer = error_response(status, self.version, cause, expose, self.head_request)
            self.resp_bytes = len(answer) - answer.find(b"\r\n\r\n") - 4
            self.client.send(answer)
        self.end(FAILED, status, kind)

    def client_lost(self) -> None:
        """The client went away: abandon the upstream side."""
        if self.resp == TUNNEL:
            self.close_conn()
            return
        if self.resp >= ENDED:
            return
        self.close_conn()
        self.stop_waiting()
        self.end(CANCELLED, 499, None)

    def cancel(self) -> None:
        """Never started (queued behind a request that failed): end without a count."""
        if self.resp < ENDED:
            self.resp = response_to(self.resp, CANCELLED)
            self.drop_request()

    def end(self, phase: int, status: int, error: str | None, now: float = 0.0) -> None:
        """`now`: the clock's reading if the caller has just taken one."""
        self.resp = response_to(self.resp, phase)
        self.drop_request()
        if self.shadow is not None:  # the primary failed: nothing to compare the copy with
            self.shadow.primary_done(False)
            self.shadow = None
        if self.paused_client:
            # what paused the client ends with the exchange (a drain reported later
            # reaches no exchange): the next request must be read
            self.client.resume_reading(PAUSE_UPSTREAM | PAUSE_CONNECT)
        if not now:
            now = _clock()
        shared = self.shared
        shared.recorder.finished(self.decision.label, status, now - self.t0, error)
        if self.grpc:
            code = self.grpc_code if self.grpc_code >= 0 else grpc_for_http(status)
            # Already a failure, or a proxy-made 4xx (a 413, a 431): not the version's.
            made = self.grpc_code < 0 and status != 200
            counted = error is not None or status >= 500 or made
            shared.recorder.grpc_finished(self.version, code, counted)
        log = shared.access
        if log is not None:
            log.record(
                self.t0, now, self.client.peer_address(), self.method, self.target, status,
                self.decision, self.req_bytes, self.resp_bytes, self.pool, error, False,
            )  # fmt: skip
        self.client.exchange_done(self, now)
