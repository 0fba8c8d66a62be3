"""HTTP/2 on the listener: every stream is one exchange, as an HTTP/1.1 request is.

Rules:
- The framing is the `h2` library's (python-hyper's sans-IO state machine):
  frames, HPACK, the stream states, flow control's arithmetic, the content
  length of a request body. A connection error it reports ends the
  connection with the GOAWAY it prepared; nothing of a broken stream was
  handed to an exchange before its head was whole and judged. The library
  takes some malformed requests as connection errors where RFC 9113 §8.1.1
  asks for a stream error (a body longer or shorter than its
  `content-length`, a Host that differs from `:authority`): §5.4.1 allows it.
- A request head is judged again here before it becomes an exchange, as the
  HTTP/1.1 grammar would judge it: the method a token, the path visible ASCII
  only (no space could split a request line towards the upstream), header
  names and values as RFC 9113 §8.2.1 says, the decoded list within
  `max_header_bytes` (else 431 on the stream), `:authority` as the Host (a
  differing Host header is a 400). CONNECT and extended CONNECT are refused.
  The head is then written as the block of lines an HTTP/1.1 client would
  have sent, and read by the same code (proxy.http.reading): routing, the
  headers towards the upstream, the limits, the metrics and the access log
  are one code path for both protocols. A body without `content-length` goes
  upstream chunked, one chunk per non-empty DATA frame (an empty one would
  end the body); a body longer or shorter than its `content-length` is
  checked here too, resets the stream, and closes its upstream connection.
- Each stream is a `StreamSide`: the `ClientSide` its exchange talks to. The
  exchange writes an HTTP/1.1 response (its own, well framed: proxy.answers);
  a `PartsReader` (proxy.http.parts) reads it back into a head, data and
  trailers, without the hop-by-hop fields, and the stream sends them as
  HTTP/2 frames.
- Flow control both ways, per stream: request data is acknowledged (the
  client's window reopened) only as its exchange takes it, so an upstream
  that does not read holds back only its own stream; response data waits for
  the client's windows, and past `HOLD` bytes waiting the stream's upstream
  connection stops being read. A client that does not read its socket pauses
  every stream's upstream, and frames are no longer read from it (a flood of
  PINGs or SETTINGS cannot make the answers pile up); past `send_timeout`
  the connection is aborted. A stream whose answer waits on a window the
  client keeps shut, with no progress for `send_timeout`, is reset (CANCEL)
  and its exchange ended.
- Limits: `http2.max_concurrent_streams` (SETTINGS_MAX_CONCURRENT_STREAMS),
  `max_body_bytes` (413 on the stream); a head in HEADERS and CONTINUATION
  frames must arrive within `client_header_timeout` and twice
  `max_header_bytes` (else ENHANCE_YOUR_CALM). Streams the client resets
  before their answer, and streams refused without reaching an upstream, are
  counted: past `RESETS` of them, and more than were answered, the connection
  ends with ENHANCE_YOUR_CALM (the rapid reset attack, CVE-2023-44487).
- Going away (drain, idle timeout): one GOAWAY with NO_ERROR naming the last
  stream that was read; streams opened after it are refused (REFUSED_STREAM:
  the client may retry them elsewhere); streams in flight are answered, and
  the connection closes when the last is over. The GOAWAY is sent as a bare
  frame: the library's `close_connection` would end the streams in flight.
- gRPC (`content-type: application/grpc*`): the exchange's outcome is the
  answer's `grpc-status` (proxy.forward); an answer that is not gRPC (a
  proxy-made error, a plain HTTP upstream) reaches the client as a
  trailers-only gRPC answer whose status gRPC's HTTP table gives (502, 503,
  504: UNAVAILABLE), never as a broken stream.
- Not served: server push (SETTINGS_ENABLE_PUSH is never used), priorities
  (read and ignored), request trailers (dropped), 101 upgrades.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Final

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from ..answers import error_response, grpc_for_http
from ..forward import Exchange, MirrorTap
from ..framing import FramingError
from ..headers import HeaderError
from ..shared import Shared
from .h2wire import H2Wire
from .outbox import abort, linger
from .parts import ANOTHER_HEAD, CHUNKED_BODY, NO_BODY, UNTIL_END, Fields, PartsReader, PartsSink
from .reading import Reject, RequestReader

if TYPE_CHECKING:
    from ..config import Limits

_monotonic: Final = time.monotonic

WINDOW: Final = 256 * 1024  # each stream's receive window (the client's send credit)
CONNECTION_WINDOW: Final = 1024 * 1024  # the connection's receive window
HOLD: Final = 256 * 1024  # response bytes waiting on a stream before its upstream is paused
RESETS: Final = 200  # streams reset by the client before the rapid-reset rule applies
LINGER: Final = 2.0  # as proxy.http.downstream's

# Why a stream's upstream is not read (a bit each), as ClientSide's pause bits are
# why the client is not read.
HELD_WINDOW: Final = 1  # the stream's answer waits for the client's window
HELD_SOCKET: Final = 2  # the client does not read its socket

# Fields a request must not carry in HTTP/2 (RFC 9113 §8.2.2; `te` but `te: trailers`).
_CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
)
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH: Final = re.compile(rb"[\x21-\x7e]+")
_AUTHORITY: Final = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]+")
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_VALUE: Final = re.compile(  # no CTL, no whitespace at either end (RFC 9113 §8.2.1)
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)


class StreamError(Exception):
    """A stream that must be reset with `code`, its request never forwarded."""

    def __init__(self, code: int, cause: str) -> None:
        super().__init__(cause)
        self.code = code


def request_block(headers: Fields, ended: bool, limit: int) -> tuple[bytes, bytes, bytes, int]:
    """(method, path, the head's fields as HTTP/1.1 lines, its content-length or -1)
    of a valid request (see the module's rules); `limit`: `max_header_bytes`.

    The lines are "\\r\\nName: value" each, the block ending "\\r\\n", as
    proxy.headers.scan_request reads them."""
    method = path = authority = b""
    lines: list[bytes] = []
    host: bytes | None = None
    size = 0
    length = -1
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name != b":scheme":
                raise StreamError(ErrorCodes.PROTOCOL_ERROR, "unknown pseudo-header")
            continue
        if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value) or name in _CONNECTION_SPECIFIC:
            if name == b"te" and value == b"trailers":
                continue  # always asked for below
            raise StreamError(ErrorCodes.PROTOCOL_ERROR, "malformed header field")
        if name == b"host":
            host = value
        elif name == b"content-length":
            if not value.isdigit() or length != -1:
                raise StreamError(ErrorCodes.PROTOCOL_ERROR, "malformed content-length")
            length = int(value)
        lines.append(b"\r\n" + name + b": " + value)
    if not _METHOD.fullmatch(method) or not _PATH.fullmatch(path):
        raise StreamError(ErrorCodes.PROTOCOL_ERROR, "malformed :method or :path")
    if size > limit:
        raise Reject(431, "request line and headers exceed max_header_bytes")
    if authority:
        if not _AUTHORITY.fullmatch(authority):
            raise Reject(400, "invalid :authority")
        if host is not None and host != authority:
            raise Reject(400, "Host differs from :authority")
        if host is None:
            lines.insert(0, b"\r\nhost: " + authority)
    elif host is None:
        raise Reject(400, "missing :authority")
    elif not _AUTHORITY.fullmatch(host):
        raise Reject(400, "invalid Host")
    if ended and length > 0:
        raise StreamError(ErrorCodes.PROTOCOL_ERROR, "content-length without a body")
    if not ended and length == -1:
        lines.append(b"\r\ntransfer-encoding: chunked")
    # An HTTP/2 client always takes trailers: the exchange then relays them.
    lines.append(b"\r\nte: trailers\r\n")  # the block ends with CRLF (scan_request)
    return method, path, b"".join(lines), length


def answer_mode(status: int, length: int, chunked: bool, head_only: bool) -> int:
    """How the body after a final answer head is framed (proxy.http.parts' values)."""
    if head_only or status == 204 or status == 304:
        return NO_BODY
    if chunked:
        return CHUNKED_BODY
    return length if length >= 0 else UNTIL_END  # NO_BODY when the length is 0


def _is_grpc(found: Fields) -> bool:
    """`content-type: application/grpc`, `application/grpc+proto`, ... (not gRPC-Web,
    whose trailers travel in the body)."""
    for name, value in found:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/grpc" or kind.startswith(b"application/grpc+")
    return False


GRPC_BODY_KEPT: Final = 4096  # of an answer that is not gRPC: enough for the proxy's cause


def grpc_error(status: int, found: Fields, body: bytes) -> Fields:
    """A trailers-only gRPC answer for an HTTP answer `status` (with `found`'s version);
    its message is the cause of a proxy-made answer (the JSON of proxy.answers)."""
    message = f"turnout: HTTP {status}"
    if body[:1] == b"{":
        try:
            cause = json.loads(body).get("cause")
        except (ValueError, AttributeError):
            cause = None
        if isinstance(cause, str):
            message = f"turnout: {cause}"
    out = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_for_http(status)),
        (b"grpc-message", _percent(message)),
    ]
    out.extend(field for field in found if field[0] == b"x-turnout-version")
    return out


def _percent(text: str) -> bytes:
    """grpc-message's encoding: UTF-8, then every byte outside 0x20-0x7E, and %, as %XX."""
    return b"".join(
        bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode()
    )


class StreamSide(RequestReader, PartsSink):
    """One stream: the `ClientSide` of the exchange it carries (see the module's rules)."""

    __slots__ = (
        "conn", "sid", "ex", "answer", "head_only", "out", "ending", "trailer_fields", "held",
        "over", "withheld", "length", "received", "request_ended", "seen_at", "paused", "grpc",
        "stuck_since", "plain",
    )  # fmt: skip

    def __init__(self, conn: H2Client, sid: int) -> None:
        super().__init__(conn.shared, conn.tap, conn.secure)
        self.multiplexed = True
        self.peer = conn.peer
        self.peer_bytes = conn.peer_bytes
        self.conn = conn
        self.sid = sid
        self.ex: Exchange | None = None
        self.answer = PartsReader(self)  # the exchange's HTTP/1.1 answer, read back
        self.head_only = False  # the request is a HEAD: its answer has no body
        self.out = bytearray()  # response data waiting for the client's window
        self.ending = False  # the answer is whole: end the stream once `out` is sent
        self.trailer_fields: Fields | None = None
        self.held = 0  # HELD_* bits: why this stream's upstream is not read
        self.over = False  # the stream is ended or reset on our side
        self.withheld = 0  # request bytes read but not acknowledged (the exchange paused us)
        self.length = -1  # the request's content-length; -1: none
        self.received = 0
        self.request_ended = False
        self.seen_at = _monotonic()
        self.paused = 0  # why the exchange wants this stream's request held (its pause bits)
        self.grpc = False  # a gRPC call: answers that are not gRPC become a grpc-status
        self.stuck_since = 0.0  # since when `out` waits on a shut window without progress
        # A gRPC call's answer that is not gRPC: its status and fields, until its end
        self.plain: tuple[int, Fields] | None = None

    # -- the request ----------------------------------------------------------------------

    def opened(self, headers: Fields, ended: bool) -> None:
        """A request head: judge it, make its exchange and start it."""
        head_only = (b":method", b"HEAD") in headers
        self.grpc = _is_grpc(headers)
        try:
            limit = self.shared.snapshot.max_header_bytes
            method, path, block, self.length = request_block(headers, ended, limit)
            ex = self.new_exchange(method, path, block, True)
        except StreamError as se:
            self.refused(400, str(se))
            self.conn.charge()
            self.conn.reset(self, se.code)
            return
        except Reject as r:
            self.refuse(r.status, r.cause, head_only)
            return
        except FramingError as fe:
            self.refuse(fe.status, fe.cause, head_only)
            return
        except HeaderError as he:
            self.refuse(400, str(he), head_only)
            return
        self.ex = ex
        self.head_only = ex.head_request
        ex.grpc = self.grpc
        ex.start()
        if ended and self.ex is not None:
            self.request_ended = True
            ex.request_complete()

    def data(self, data: bytes, flow: int) -> None:
        """Request body bytes; `flow`: what they cost the client's window (padding too)."""
        self.seen_at = _monotonic()
        self.received += len(data)
        if self.length != -1 and self.received > self.length:
            self.broken("request body longer than its content-length")
            return
        ex = self.ex
        if data and ex is not None and not ex.over():
            # Never an empty piece: towards a chunked upstream it would be the last chunk.
            ex.request_body(data)
        if self.held_back():
            self.withheld += flow
        else:
            self.conn.acknowledge(self.sid, flow)

    def request_end(self) -> None:
        if self.request_ended:
            return  # END_STREAM on the HEADERS: `opened` completed the request
        self.request_ended = True
        if self.length != -1 and self.received != self.length:
            self.broken("request body shorter than its content-length")
            return
        ex = self.ex
        if ex is not None and not ex.over():
            ex.request_complete()

    def broken(self, cause: str) -> None:
        """A stream whose body does not match its framing: reset it, and end its exchange
        as a client gone (its upstream connection closes, never reused)."""
        self.abandon(ErrorCodes.PROTOCOL_ERROR)

    def abandon(self, code: int) -> None:
        """Give the stream up: reset it with `code`, and end its exchange (if still on) as
        its client's loss."""
        self.conn.reset(self, code)
        ex = self.ex
        if ex is not None:
            ex.client_lost()

    def refuse(self, status: int, cause: str, head_only: bool) -> None:
        """Answer a request that is not forwarded, on its stream (the connection stays)."""
        self.refused(status, cause)
        self.conn.charge()  # cheap for the client: not a completed stream (rapid reset)
        self.head_only = head_only
        expose = self.shared.snapshot.expose_version
        self.send(error_response(status, None, cause, expose, head_only))
        self.conn.stream_over(self)

    def held_back(self) -> bool:
        return self.paused != 0

    # -- ClientSide ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.over:
            self.answer.feed(data)
            # Once for all the parts `data` held: a whole small answer goes out as one
            # HEADERS and one DATA frame carrying END_STREAM.
            self.push()

    def cut_off(self) -> None:
        self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    def end_tunnel(self) -> None:
        self.cut_off()

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        was = self.paused
        self.paused &= ~reason
        if was and not self.paused and self.withheld:
            withheld, self.withheld = self.withheld, 0
            self.conn.acknowledge(self.sid, withheld)

    def closing(self) -> bool:
        return False  # a stream's end is its exchange's; the connection's is GOAWAY's

    def start_tunnel(self, ex: Exchange) -> None:
        self.cut_off()  # never asked for: an HTTP/2 request cannot ask to upgrade

    def exchange_done(self, ex: Exchange, now: float) -> None:
        self.answer.finish()
        self.push()
        if not self.over and not self.ending:
            self.cut_off()  # the exchange ended without a whole answer
        self.conn.stream_over(self)

    def peer_address(self) -> str:
        return self.peer

    def secure(self) -> bool:
        return self.scheme == b"https"

    # -- the answer, as the PartsReader reads it back -----------------------------------

    def head(self, line: bytes, found: Fields, length: int, chunked: bool) -> int:
        status = int(line[9:12])
        if status < 200:
            self.conn.headers(self, [(b":status", b"%d" % status), *found], False)
            return ANOTHER_HEAD
        mode = answer_mode(status, length, chunked, self.head_only)
        if self.grpc and not _is_grpc(found):
            # Not a gRPC answer (a proxy-made error, an upstream speaking plain HTTP): a
            # gRPC client gets a status it understands, as gRPC's HTTP table maps it,
            # once the body (the cause, for a proxy-made one) is read (see push).
            self.plain = (status, found)
            self.ending = mode == NO_BODY  # else `ended` says when its body is read
            return mode
        if mode == NO_BODY:
            self.ending = True
        self.conn.headers(self, [(b":status", b"%d" % status), *found], mode == NO_BODY)
        return mode

    def body(self, data: bytes) -> None:
        if data and not self.over:
            if self.plain is not None and len(self.out) >= GRPC_BODY_KEPT:
                return  # only its beginning is read, for a cause
            self.out += data  # sent by `push`, once the exchange's bytes are read

    def ended(self, trailer_fields: Fields | None) -> None:
        self.trailer_fields = trailer_fields
        self.ending = True

    def push(self) -> None:
        """Send what the client's windows allow; end the stream once all is sent."""
        if self.over:
            return
        if self.plain is not None:  # a gRPC call answered in plain HTTP
            if self.ending:
                status, found = self.plain
                self.conn.headers(self, grpc_error(status, found, bytes(self.out)), True)
            return
        out = self.out
        if out:
            # The last DATA frame carries END_STREAM when no trailers follow.
            sent = self.conn.data(self, out, self.ending and not self.trailer_fields)
            if sent:
                del out[:sent]
            if self.over:
                return
            if sent or not out:
                self.stuck_since = _monotonic() if out else 0.0
            elif not self.stuck_since:
                self.stuck_since = _monotonic()
        if not out and self.ending:
            self.conn.finish(self, self.trailer_fields)
            return
        self.hold(HELD_WINDOW, len(out) > HOLD)

    def hold(self, bit: int, on: bool) -> None:
        """Pause (resume) reading the upstream of this stream's exchange for `bit`."""
        was = self.held
        self.held = was | bit if on else was & ~bit
        ex = self.ex
        if ex is not None and (not was) != (not self.held):
            ex.client_paused(self.held != 0)

    def lost(self) -> None:
        """The client is gone, or reset this stream."""
        self.over = True
        ex = self.ex
        if ex is not None:
            ex.client_lost()

    def overdue(self, now: float, limits: Limits) -> None:
        if self.out and self.stuck_since and now - self.stuck_since > limits.send_timeout:
            # The client keeps its window shut on this answer (it reads the socket, so
            # the connection's send_timeout never sees it): give the stream up.
            self.abandon(ErrorCodes.CANCEL)
            return
        ex = self.ex
        if ex is None or ex.over():
            return
        if not self.request_ended:
            if self.paused:
                self.seen_at = now
            elif now - self.seen_at > limits.client_body_timeout:
                ex.fail(408, None, "request body stalled past client_body_timeout")
                return
        ex.stalled(now, limits.response_timeout, self.held != 0)


class Frames(H2Wire):
    """The sending half of an HTTP/2 connection: what its streams ask of the `h2` state
    machine (heads, data within the windows, ends, resets, acknowledgements), written
    to the transport once per turn of the loop, and the streams still open."""

    __slots__ = ("streams", "completed", "idle_since")

    def __init__(self) -> None:
        super().__init__(client_side=False)
        self.streams: dict[int, StreamSide] = {}
        self.completed = 0  # streams answered whole
        self.idle_since = _monotonic()

    def shut(self) -> None:
        """Close the connection (the subclass's)."""
        raise NotImplementedError

    def going(self) -> bool:
        """GOAWAY was sent or read: close once no stream is left."""
        raise NotImplementedError

    # -- what the streams ask ---------------------------------------------------------

    def headers(self, stream: StreamSide, found: Fields, end: bool) -> None:
        try:
            self.h2.send_headers(stream.sid, found, end_stream=end)
        except (StreamClosedError, ProtocolError):
            stream.lost()  # reset meanwhile, or a head HTTP/2 cannot carry
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
            return
        self.later()
        if end:
            self.ended(stream)

    def data(self, stream: StreamSide, out: bytearray, last: bool) -> int:
        """Send as much of `out` as the windows allow, ending the stream with it when it
        is `last` and all of it goes; how much was sent."""
        sent = self.send_within(stream.sid, out, last)
        if sent < 0:
            stream.lost()
            return 0
        if sent and last and sent == len(out):
            self.ended(stream)
        return sent

    def finish(self, stream: StreamSide, trailer_fields: Fields | None) -> None:
        """End the stream: with its trailers, or an empty DATA frame."""
        try:
            if trailer_fields:
                self.h2.send_headers(stream.sid, trailer_fields, end_stream=True)
            else:
                self.h2.end_stream(stream.sid)
        except (StreamClosedError, ProtocolError):
            stream.lost()
            self.stream_over(stream)
            return
        self.later()
        self.ended(stream)

    def ended(self, stream: StreamSide) -> None:
        """`stream`'s answer went out whole (END_STREAM sent)."""
        stream.over = True
        if stream.ex is not None:
            self.completed += 1  # a proxy-made refusal does not count (see charge)
        if not stream.request_ended:
            # Answered before the request was whole: the rest is not wanted (RFC 9113
            # §8.1: RST_STREAM with NO_ERROR after a complete response).
            self.reset_sid(stream.sid, ErrorCodes.NO_ERROR)
        self.stream_over(stream)

    def reset(self, stream: StreamSide, code: int) -> None:
        if not stream.over:
            stream.over = True
            self.reset_sid(stream.sid, code)
        self.stream_over(stream)

    def stream_over(self, stream: StreamSide) -> None:
        """Forget `stream` once it is over on both counts: its frames (ended or reset)
        and its exchange."""
        ex = stream.ex
        if stream.over and (ex is None or ex.over()) and self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        self.settle()

    def settle(self) -> None:
        if not self.streams:
            self.idle_since = _monotonic()
            if self.going():
                self.shut()


class H2Client(Frames):
    """One HTTP/2 client connection: an asyncio Protocol by its methods (as
    ClientConnection), and a `Served` for the server's sweep and drain."""

    __slots__ = (
        "shared", "tap", "registry", "secure", "going_away", "last_id", "head_since",
        "write_paused", "resets", "peer", "peer_bytes", "greeted",
    )  # fmt: skip

    def __init__(self, shared: Shared, tap: MirrorTap | None, registry: set, secure: bool) -> None:
        super().__init__()
        self.shared = shared
        self.tap = tap
        self.registry = registry
        self.secure = secure
        self.going_away = False
        self.last_id = 0  # after GOAWAY: the last stream served
        self.head_since = 0.0  # a header block is being received since (CONTINUATION frames)
        self.greeted = False  # the client's SETTINGS followed its preface
        self.write_paused = 0.0
        self.resets = 0  # streams the client reset before their answer was over
        self.peer = ""
        self.peer_bytes = b""

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
        self.registry.add(self)
        snap = self.shared.snapshot
        limit = max(snap.max_header_bytes * 2, 65536)
        h2 = self.h2
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: snap.config.http2.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limit,
                SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        h2.decoder.max_header_list_size = limit  # in force before the client's ACK too
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.pump()

    def adopt(self, transport: asyncio.Transport, data: bytes) -> None:
        """Take over a cleartext connection whose first bytes begin the preface."""
        transport.set_protocol(self)  # type: ignore[arg-type]  # a Protocol by its methods
        self.connection_made(transport)
        self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.fail()  # h2 prepared the GOAWAY with the error's code
            return
        if not self.greeted and events:
            # The preface must be followed by SETTINGS (RFC 9113 §3.4); h2 lets it pass.
            if not isinstance(events[0], RemoteSettingsChanged):
                self.fail(ErrorCodes.PROTOCOL_ERROR)
                return
            self.greeted = True
        if self.header_block():
            return
        for event in events:
            try:
                self.event(event)
            except StreamClosedError:
                pass  # the stream was reset meanwhile: its event is moot
            if self.closed:
                return
        self.pump()

    def event(self, event: object) -> None:
        if isinstance(event, RequestReceived):
            sid = event.stream_id
            if self.going_away and sid > self.last_id:
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                return
            stream = StreamSide(self, sid)
            self.streams[sid] = stream
            stream.opened(event.headers, event.stream_ended is not None)
        elif isinstance(event, DataReceived):
            receiving = self.streams.get(event.stream_id)
            if receiving is not None and not receiving.over:
                receiving.data(event.data, event.flow_controlled_length)
            else:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, StreamEnded):
            ending = self.streams.get(event.stream_id)
            if ending is not None and not ending.over:
                ending.request_end()
        elif isinstance(event, StreamReset):
            gone = self.streams.pop(event.stream_id, None)
            if gone is not None and not gone.over:
                gone.lost()
                if self.charge():
                    return
            self.settle()
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            for stream in list(self.streams.values()):
                if stream.out:
                    stream.push()
        elif isinstance(event, ConnectionTerminated):
            if event.error_code != ErrorCodes.NO_ERROR:
                self.fail()  # the client's connection error: nothing more is sent
                return
            # The client's graceful GOAWAY: it opens no more streams, and still reads
            # the answers of its streams in flight. h2 takes any GOAWAY as the end of
            # the connection and would send nothing more: it is put back in its open
            # state, which a graceful GOAWAY leaves the connection in (RFC 9113 §6.8).
            self.h2.state_machine.state = ConnectionState.SERVER_OPEN
            self.going_away = True
            self.last_id = self.h2.highest_inbound_stream_id
            self.settle()

    def header_block(self) -> bool:
        """A head still being received (HEADERS, then CONTINUATION frames): timed like an
        HTTP/1.1 head, and ended past twice `max_header_bytes` (the library would hold
        64 frames of 16 KiB first). True when the connection ended."""
        pending = getattr(self.h2.incoming_buffer, "_headers_buffer", None)
        if not pending:
            self.head_since = 0.0
            return False
        if not self.head_since:
            self.head_since = _monotonic()
        if sum(len(f.data) for f in pending) > 2 * self.shared.snapshot.max_header_bytes:
            self.fail(ErrorCodes.ENHANCE_YOUR_CALM)
            return True
        return False

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.registry.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.lost()

    def pause_writing(self) -> None:
        self.write_paused = _monotonic()
        self.transport.pause_reading()  # no more frames (and their answers) until it reads
        for stream in list(self.streams.values()):
            stream.hold(HELD_SOCKET, True)

    def resume_writing(self) -> None:
        self.write_paused = 0.0
        if not self.closed:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            stream.hold(HELD_SOCKET, False)

    # -- lifecycle ----------------------------------------------------------------------

    def go_away(self) -> None:
        """GOAWAY(NO_ERROR): serve the streams read so far, refuse later ones, close
        when the last is over (see the module's rules)."""
        if self.going_away or self.closed:
            if not self.streams:
                self.shut()
            return
        self.going_away = True
        self.last_id = self.h2.highest_inbound_stream_id
        self.pump()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())
        self.settle()

    def fail(self, code: int = -1) -> None:
        """A connection error: GOAWAY with `code` (or the one h2 prepared), then close;
        the streams in flight end as their client's loss."""
        if code != -1:
            self.h2.close_connection(error_code=code)
        self.pump()
        self.shut()
        self.connection_lost(None)

    def shut(self) -> None:
        if self.closed:
            return
        self.pump()
        self.closed = True
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
        else:
            linger(transport, LINGER)

    def going(self) -> bool:
        return self.going_away

    def charge(self) -> bool:
        """A stream the client reset before its answer, or one refused without reaching an
        upstream: past RESETS of them, and more than were answered, the connection ends
        (ENHANCE_YOUR_CALM). True when it did."""
        self.resets += 1
        if self.resets > RESETS and self.resets > self.completed:
            self.fail(ErrorCodes.ENHANCE_YOUR_CALM)
            return True
        return False

    # -- Served -------------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.streams

    def close(self) -> None:
        self.go_away()

    def wind_down(self) -> None:
        self.go_away()

    def overdue(self, now: float, limits: Limits) -> None:
        if self.closed:
            return
        if self.write_paused and now - self.write_paused > limits.send_timeout:
            self.closed = True
            abort(self.transport)
            return
        if self.head_since and now - self.head_since > limits.client_header_timeout:
            self.fail(ErrorCodes.ENHANCE_YOUR_CALM)  # a head trickled in CONTINUATION frames
            return
        for stream in list(self.streams.values()):
            stream.overdue(now, limits)

    def exchanges(self) -> list[Exchange]:
        found: list[Exchange] = []
        for stream in self.streams.values():
            ex = stream.ex
            if ex is not None and not ex.over():
                found.append(ex)
        return found
