"""HTTP/2 to an upstream: a few multiplexed connections per endpoint instead of a pool
of one-request ones (the way gRPC services are spoken to).

Rules:
- A version with `protocol: h2`, or whose endpoints are h2c://, speaks HTTP/2 to
  its upstreams: over TLS with ALPN `h2` for https://, in cleartext with prior
  knowledge otherwise. The framing is the `h2` library's, as on the listener.
- An endpoint's `H2Pool` keeps its sessions (connections). An exchange takes a
  stream on the first session with room under the upstream's
  SETTINGS_MAX_CONCURRENT_STREAMS that is not going away; when none has room,
  one session is dialled, and every exchange that needs one meanwhile waits for
  that dial rather than making its own.
- The exchange (or a shadow copy) sees an `H2Stream`, an UpstreamConnection:
  it writes its request as HTTP/1.1 bytes (the head, then the body framed by
  Content-Length or chunked), which a PartsReader (proxy.http.parts) reads back
  into HEADERS and DATA frames (`Host` becomes `:authority`; hop-by-hop fields
  are dropped, `te: trailers` kept). The response reaches its ResponseSink as
  an HTTP/1.1 head made of the fields, body pieces, trailers and the end, with
  the framing the fields say (Content-Length, else the end of the stream).
- Flow control both ways, per stream: request data goes out as the upstream's
  windows allow, and past `HOLD` bytes waiting the sink is told the upstream is
  paused (its client stops being read); response data is acknowledged only
  while the sink's client reads.
- Failures: a stream the upstream reset with REFUSED_STREAM before answering,
  or one above the last stream of its GOAWAY, was never processed, and is
  delivered as a silent loss (the leg's one resend applies); any other reset
  is a 502 of kind `reset`. A connection error or a lost connection fails
  every stream on it. A TLS upstream that does not agree to `h2` is a failed
  dial of kind `tls`.
- Sessions without streams are closed by the sweep after `idle_timeout`; a
  retired pool's sessions close once their last stream is over.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Final

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from ..config import Endpoint
from ..framing import PLAIN, FramingError, response_framing
from ..tls import TlsFailure, describe
from .h2wire import H2Wire
from .parts import CHUNKED_BODY, NO_BODY, Fields, PartsReader, PartsSink
from .upstream import TCP, Pool, ResponseSink, UpstreamConnection

WINDOW: Final = 1024 * 1024  # each stream's receive window
# The connection's receive window: room for every stream's window, so that streams held
# back for slow clients (their windows not reopened) never starve the others.
CONNECTION_WINDOW: Final = 128 * 1024 * 1024
STREAMS_BEFORE_SETTINGS: Final = 100  # streams opened before the upstream's SETTINGS came
LAST_STREAM_ID: Final = 2**31 - 1
HOLD: Final = 256 * 1024  # request bytes waiting on a stream before its client is paused

_monotonic: Final = time.monotonic


def _lines(found: Fields) -> bytes:
    """HTTP/2 fields as HTTP/1.1 header lines ("\\r\\nname: value" each, then CRLF)."""
    out = [b"\r\n" + name + b": " + value for name, value in found if name[:1] != b":"]
    out.append(b"\r\n")
    return b"".join(out)


def _status(found: Fields) -> int:
    for name, value in found:
        if name == b":status":
            if len(value) == 3 and value.isdigit():
                return int(value)
            break
    raise FramingError(502, "no valid :status in the upstream's answer")


def _code_name(code: int) -> str:
    """An HTTP/2 error code's name, or its number when it is not one h2 knows."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Stream(UpstreamConnection, PartsSink):
    """One exchange's stream: an UpstreamConnection to the leg and the sink above."""

    __slots__ = (
        "session", "sid", "reader", "out", "ending", "request_done", "response_done",
        "answered", "withheld", "blocked", "told",
    )  # fmt: skip

    def __init__(self, pool: Pool, session: H2Session, sid: int) -> None:
        super().__init__(pool)
        self.session = session
        self.sid = sid
        self.transport = session.transport
        self.reader = PartsReader(self)  # the exchange's HTTP/1.1 request, read back
        self.out = bytearray()  # request data waiting for the upstream's window
        self.ending = False  # the request is whole: END_STREAM once `out` is sent
        self.request_done = False
        self.response_done = False
        self.answered = False  # a final head arrived
        self.withheld = 0  # response bytes read but not acknowledged (the client is slow)
        self.blocked = False  # request data waits past HOLD on the upstream's windows
        self.told = False  # the sink was told the upstream is paused (blocked, or the socket)

    # -- what the leg and the sink call (UpstreamConnection's) ---------------------------

    def bind(self, sink: ResponseSink, head_request: bool) -> None:
        super().bind(sink, head_request)
        self.signal()  # the session's socket may be full already

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.reader.feed(data)

    def signal(self) -> None:
        """Tell the sink whether the upstream takes no more for now: this stream's data
        waits past HOLD, or the session's socket is full (one bit towards the client)."""
        paused = self.blocked or self.session.write_paused
        sink = self.exchange
        if paused != self.told and sink is not None:
            self.told = paused
            sink.upstream_paused(paused)

    def pause_reading(self) -> None:
        self.held = True

    def resume_reading(self) -> None:
        self.held = False
        if self.withheld and not self.closed:
            withheld, self.withheld = self.withheld, 0
            self.session.acknowledge(self.sid, withheld)

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.give_back()
            if not (self.request_done and self.response_done):
                self.session.reset_sid(self.sid, ErrorCodes.CANCEL)
            self.session.forget(self)

    def give_back(self) -> None:
        """What was read but held back (a slow client) counts against the connection's
        window too: acknowledge it when the stream ends, or the window shrinks for good."""
        if self.withheld:
            withheld, self.withheld = self.withheld, 0
            self.session.acknowledge(self.sid, withheld)

    def reusable(self) -> bool:
        return False  # a stream serves one exchange; its session serves the next

    # -- the request, read back from the exchange's bytes (PartsSink) --------------------

    def head(self, line: bytes, found: Fields, length: int, chunked: bool) -> int:
        method, target, _ = line.split(b" ", 2)
        authority = self.pool.endpoint.key.encode()
        rest: Fields = []
        for name, value in found:
            if name == b"host":
                authority = value
            else:
                rest.append((name, value))
        scheme = b"https" if self.pool.endpoint.tls else b"http"
        pseudo = [(b":method", method), (b":scheme", scheme), (b":authority", authority)]
        pseudo.append((b":path", target))
        mode = CHUNKED_BODY if chunked else max(length, NO_BODY)
        self.session.headers(self, pseudo + rest, mode == NO_BODY)
        if mode == NO_BODY:
            self.request_done = True
        return mode

    def body(self, data: bytes) -> None:
        if data:
            self.out += data
            self.push()

    def ended(self, trailer_fields: Fields | None) -> None:
        self.ending = True  # request trailers are not sent (see proxy.http.h2)
        self.push()

    def push(self) -> None:
        if self.closed or self.request_done:
            return
        out = self.out
        if out:
            sent = self.session.data(self, out, self.ending)
            if sent:
                del out[:sent]
        if not out and self.ending and not self.request_done:
            self.request_done = True
            self.session.end(self.sid)
        blocked = len(out) > HOLD
        if blocked != self.blocked:
            self.blocked = blocked
            self.signal()

    # -- the answer, as the session reads it --------------------------------------------

    def answer(self, found: Fields, ended: bool) -> None:
        sink = self.exchange
        if sink is None:
            return
        self.progress += 1
        status = _status(found)
        block = _lines(found)
        head = b"HTTP/1.1 %d \r\n%s" % (status, block[2:])
        if status < 200:
            sink.response_head(status, head, True, PLAIN)
            return
        self.answered = True
        bodiless = self.head_request or status in (204, 304)
        if ended and not bodiless and not any(name == b"content-length" for name, _ in found):
            # A head that ends the stream (gRPC's trailers-only answer) has no body: say
            # so, or the exchange would frame it as one (chunked, an empty DATA frame).
            block = block[:-2] + b"\r\ncontent-length: 0\r\n"
            head = b"HTTP/1.1 %d \r\n%s" % (status, block[2:])
        framing = response_framing(block, status, self.head_request)
        sink.response_head(status, head, True, framing)
        if ended:
            self.finished()
        elif self.exchange is sink:
            sink.read_done()

    def data(self, data: bytes, flow: int) -> None:
        self.progress += 1
        sink = self.exchange
        if sink is not None and data:  # an empty piece would end a chunked body early
            sink.response_body(data)
            if self.exchange is sink:
                sink.read_done()
        if self.held:
            self.withheld += flow
        else:
            self.session.acknowledge(self.sid, flow)

    def trailers(self, found: Fields) -> None:
        sink = self.exchange
        if sink is not None:
            sink.response_trailers(_lines(found)[2:])

    def finished(self) -> None:
        self.response_done = True
        sink = self.exchange
        if sink is not None:
            sink.response_complete()  # the sink closes or gives back this stream

    def refused(self, code: int) -> None:
        """The upstream reset this stream (or, going away, never read it)."""
        sink = self.exchange
        self.exchange = None
        self.closed = True
        self.give_back()
        self.session.forget(self)
        if sink is None:
            return
        if not self.answered and code == ErrorCodes.REFUSED_STREAM:
            sink.upstream_lost(True, False)  # never processed: it may go again
        else:
            sink.upstream_failed("reset", f"upstream reset the stream ({_code_name(code)})")

    def lost(self, kind: str, cause: str) -> None:
        """The session is gone."""
        sink = self.exchange
        self.exchange = None
        self.closed = True
        if sink is None:
            return
        if kind == "reset" and not self.answered and not self.progress:
            sink.upstream_lost(True, False)  # closed before a byte: as a stale connection
        else:
            sink.upstream_failed(kind, cause)  # a protocol error is one, whenever it came


class SessionFrames(H2Wire):
    """The sending half of an upstream HTTP/2 connection: what its streams ask of the
    `h2` state machine, written to the transport once per turn of the loop."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(client_side=True)

    def forget(self, stream: H2Stream) -> None:
        """`stream` is over here (the session's)."""
        raise NotImplementedError

    # -- frames ---------------------------------------------------------------------------

    def headers(self, stream: H2Stream, found: Fields, end: bool) -> None:
        try:
            self.h2.send_headers(stream.sid, found, end_stream=end)
        except (StreamClosedError, ProtocolError) as exc:
            self.forget(stream)
            # Later: this runs inside the leg's attach, which must finish first.
            cause = f"the request cannot be sent in HTTP/2: {exc}"
            asyncio.get_running_loop().call_soon(stream.lost, "protocol", cause)
            return
        self.later()

    def data(self, stream: H2Stream, out: bytearray, last: bool) -> int:
        sent = self.send_within(stream.sid, out, last)
        if sent < 0:
            return 0
        if sent and last and sent == len(out):
            stream.request_done = True
        return sent

    def end(self, sid: int) -> None:
        try:
            self.h2.end_stream(sid)
        except (StreamClosedError, ProtocolError):
            return
        self.later()


class H2Session(SessionFrames):
    """One HTTP/2 connection to an upstream: an asyncio Protocol by its methods."""

    __slots__ = ("pool", "streams", "going_away", "idle_since", "settled", "write_paused")

    def __init__(self, pool: H2Pool) -> None:
        super().__init__()
        self.pool = pool
        self.streams: dict[int, H2Stream] = {}
        self.going_away = False
        self.idle_since = 0.0
        self.settled = False  # the upstream's first SETTINGS arrived (its stream limit)
        self.write_paused = False  # the socket to the upstream is full

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.idle_since = _monotonic()
        h2 = self.h2
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # the upstream opens none
            },
        )
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.pump()

    def data_received(self, data: bytes) -> None:
        if self.pumping:
            self.pump()  # a GOAWAY read now would make h2 drop frames not yet written
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.pump()  # the GOAWAY h2 prepared
            self.fail("protocol", f"upstream HTTP/2 error: {exc}")
            return
        for event in events:
            try:
                self.event(event)
            except StreamClosedError:
                pass
            except FramingError as fe:  # an answer the exchange cannot relay
                stream = self.streams.get(getattr(event, "stream_id", 0))
                if stream is not None:
                    self.reset_sid(stream.sid, ErrorCodes.PROTOCOL_ERROR)
                    stream.lost("protocol", f"malformed upstream response: {fe.cause}")
                    self.forget(stream)
        self.pump()

    def event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.answer(event.headers, event.stream_ended is not None)
        elif isinstance(event, DataReceived):
            receiving = self.streams.get(event.stream_id)
            if receiving is not None:
                receiving.data(event.data, event.flow_controlled_length)
            else:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, StreamEnded):
            ending = self.streams.get(event.stream_id)
            if ending is not None and not ending.response_done:
                ending.finished()
        elif isinstance(event, TrailersReceived):
            trailing = self.streams.get(event.stream_id)
            if trailing is not None:
                trailing.trailers(event.headers)
        elif isinstance(event, InformationalResponseReceived):
            interim = self.streams.get(event.stream_id)
            if interim is not None:
                interim.answer(event.headers, False)
        elif isinstance(event, StreamReset):
            gone = self.streams.get(event.stream_id)
            if gone is not None:
                gone.refused(event.error_code)
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            if isinstance(event, RemoteSettingsChanged):
                self.settled = True
            for stream in list(self.streams.values()):
                if stream.out:
                    stream.push()
        elif isinstance(event, ConnectionTerminated):
            self.goaway(int(event.error_code or 0), event.last_stream_id or 0)

    def goaway(self, code: int, last: int) -> None:
        """The upstream's GOAWAY: no new streams here; those above `last` were never
        read (they may go again); with NO_ERROR those up to it are still answered."""
        self.going_away = True
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream.refused(ErrorCodes.REFUSED_STREAM)  # never read by the upstream
        if code != ErrorCodes.NO_ERROR:
            self.fail("reset", f"upstream ended the connection ({_code_name(code)})")
            return
        # h2 takes any GOAWAY as the end: put it back in the open state a graceful
        # one leaves the connection in (RFC 9113 §6.8), to read the answers due.
        self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        self.settle()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        cause = "upstream closed the connection"
        if isinstance(exc, ssl.SSLError):
            cause = f"tls: {describe(exc)}"
        for stream in list(self.streams.values()):
            stream.lost("tls" if isinstance(exc, ssl.SSLError) else "reset", cause)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.signal()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.signal()

    # -- streams ------------------------------------------------------------------------

    def room(self) -> bool:
        """A new stream may open here."""
        if self.closed or self.going_away:
            return False
        if self.h2.highest_outbound_stream_id >= LAST_STREAM_ID - 2:
            self.going_away = True  # no stream id left: the next exchange dials anew
            self.settle()
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        if not self.settled:  # h2 says "unlimited" until the upstream's SETTINGS arrive
            limit = min(limit, STREAMS_BEFORE_SETTINGS)
        return len(self.streams) < limit

    def open(self) -> H2Stream:
        sid = self.h2.get_next_available_stream_id()
        stream = H2Stream(self.pool, self, sid)
        self.streams[sid] = stream
        return stream

    def forget(self, stream: H2Stream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        self.settle()

    def settle(self) -> None:
        if not self.streams:
            self.idle_since = _monotonic()
            if self.going_away or self.pool.retired:
                self.close()

    # -- the end ------------------------------------------------------------------------

    def fail(self, kind: str, cause: str) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.close()
        for stream in streams:
            stream.lost(kind, cause)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
            try:
                self.h2.close_connection()
            except ProtocolError:
                pass
            self.pump_anyway()
            self.transport.close()

    def pump_anyway(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)


class H2Dialer:
    """TCP (then TLS with ALPN `h2`, for https://) to one endpoint, within the connect
    timeout; a TLS failure, or an upstream that does not agree to h2, is a TlsFailure."""

    def __init__(self, context: ssl.SSLContext | None, server_name: str | None) -> None:
        self.context = context
        self.server_name = server_name

    async def dial(self, pool: H2Pool, timeout: float) -> H2Session:
        loop = asyncio.get_running_loop()
        ep = pool.endpoint
        context = self.context
        try:
            transport, session = await asyncio.wait_for(
                loop.create_connection(  # type: ignore[type-var]  # a Protocol by its methods
                    lambda: H2Session(pool),
                    ep.host, ep.port, ssl=context,
                    server_hostname=(self.server_name or ep.host) if context else None,
                ),
                timeout,
            )  # fmt: skip
        except ssl.SSLError as e:
            raise TlsFailure(describe(e)) from None
        except (ConnectionResetError, EOFError) as e:
            if context is None:
                raise
            why = "the upstream closed the connection during the handshake"
            raise TlsFailure(f"{why} ({e.__class__.__name__})") from None
        if context is not None:
            tls = transport.get_extra_info("ssl_object")
            if tls is None or tls.selected_alpn_protocol() != "h2":
                transport.close()
                raise TlsFailure("the upstream did not agree to HTTP/2 (ALPN h2)")
        return session  # type: ignore[return-value]


class H2Pool(Pool):
    """The sessions to one endpoint (see the module's rules)."""

    __slots__ = ("sessions", "dialing", "way")

    def __init__(self, endpoint: Endpoint, way: H2Dialer) -> None:
        super().__init__(endpoint, TCP)
        self.way = way
        self.sessions: list[H2Session] = []
        self.dialing: asyncio.Future[H2Session] | None = None

    def take(self) -> UpstreamConnection | None:
        for session in self.sessions:
            if session.room():
                return session.open()
        return None

    def give(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        conn.close()  # the stream is over; its session stays for the next exchange

    async def connect(self, timeout: float) -> UpstreamConnection:
        while True:
            if self.dialing is None:
                self.dialing = asyncio.ensure_future(self.dial_session(timeout))
            session = await asyncio.shield(self.dialing)
            if session.room():
                return session.open()
            taken = self.take()
            if taken is not None:
                return taken
            if session.closed and self.dialing is None:
                raise ConnectionResetError("the upstream closed the new connection")

    async def dial_session(self, timeout: float) -> H2Session:
        try:
            session = await self.way.dial(self, timeout)
        finally:
            self.dialing = None
        if session.closed:
            raise ConnectionResetError("the upstream closed the new connection")
        self.refusals = 0
        self.down_until = 0.0
        self.sessions.append(session)
        return session

    def lost(self, session: H2Session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)

    def sweep(self, idle_before: float) -> None:
        for session in list(self.sessions):
            if session.closed:
                self.sessions.remove(session)
            elif not session.streams and session.idle_since < idle_before:
                session.close()

    def retire(self) -> None:
        self.retired = True
        for session in list(self.sessions):
            if not session.streams:
                session.close()
