"""Client side: one asyncio Protocol per client connection.

Rules:
- Requests are read by the connection's reading half (proxy.http.reading:
  the strict framing, the limits on heads, the reduction of targets).
- Requests are answered in order. While one exchange is in flight, pipelined
  requests queue behind it and reading from the client pauses.
- A refused request is answered (after the exchange in flight, if any) and
  the connection closes, lingering so the answer is not lost to a reset.
- Reading is paused for several independent reasons (a bit each): upstream
  back-pressure, queued pipelined requests, buffering while connecting.
- Timeouts (checked by the server's sweep, see `overdue`): a head must arrive
  whole within `client_header_timeout`, a body must progress within
  `client_body_timeout`, a client must read within `send_timeout`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from ..answers import error_response
from ..forward import Exchange, MirrorTap
from ..framing import FramingError
from ..headers import HeaderError
from ..shared import Shared
from .outbox import abort, close, linger, send
from .reading import BODY_CHUNKED, BODY_LENGTH, HEAD, STOPPED, Reject, RequestReader

if TYPE_CHECKING:
    from ..config import Limits

_monotonic: Final = time.monotonic  # bound once: a static, not a lookup per call

PAUSE_PIPELINE: Final = 1  # other bits: proxy.forward's PAUSE_UPSTREAM and PAUSE_CONNECT
LINGER: Final = 2.0  # seconds a closed connection's late bytes are read and dropped
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4


# What takes a cleartext connection over when it opens with the HTTP/2 preface (h2c
# prior knowledge, with `http2.cleartext`): given the transport and the bytes read.
PriorKnowledge = Callable[[asyncio.Transport, bytes], None]


class Served(Protocol):
    """What the server's sweep and drain need of any client connection, whatever it
    speaks (this module's HTTP/1.1 one, proxy.http.h2's HTTP/2 one)."""

    transport: asyncio.Transport
    idle_since: float
    head_since: float

    def idle(self) -> bool: ...

    def close(self) -> None: ...

    def wind_down(self) -> None:
        """The drain began: close now if idle, else once what is in flight is over."""
        ...

    def overdue(self, now: float, limits: Limits) -> None: ...

    def exchanges(self) -> list[Exchange]:
        """The exchanges in progress (a tunnel counts while it is open)."""
        ...


class ClientState(RequestReader):
    """What a client connection holds (the exchange in flight, the pipelined queue, the
    reasons reading is paused, its tunnel), its timeouts, and how it closes: the
    lifecycle half of ClientConnection, which adds the Protocol and the exchanges."""

    __slots__ = (
        "registry", "transport", "current", "queue", "paused", "tunnel", "closed",
        "idle_since", "reject", "eof", "progress", "seen", "seen_at", "write_paused",
        "prior_knowledge",
    )  # fmt: skip

    def __init__(
        self,
        shared: Shared,
        tap: MirrorTap | None,
        registry: set[Served],
        secure: bool,
        prior_knowledge: PriorKnowledge | None = None,
    ) -> None:
        super().__init__(shared, tap, secure)
        self.registry = registry
        self.prior_knowledge = prior_knowledge
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.current: Exchange | None = None
        # Pipelined requests waiting their turn: a list, made only when one waits
        # (an empty deque costs more than half a kilobyte on every connection).
        self.queue: list[Exchange] | None = None
        self.paused = 0
        self.tunnel: Exchange | None = None
        self.closed = False
        self.idle_since = _monotonic()
        self.reject: Reject | None = None
        self.eof = False  # the client half-closed its side
        self.progress = 0  # reads so far
        self.seen = 0  # `progress` at the last sweep that saw it change
        self.seen_at = 0.0
        self.write_paused = 0.0  # monotonic time the client stopped reading; 0: it reads

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
                self.stop(Reject(408, "request head not received within client_header_timeout"))
                return
        elif phase in (BODY_LENGTH, BODY_CHUNKED):
            if self.paused:
                self.seen_at = now  # the proxy holds the client back: not its delay
            elif now - self.seen_at > limits.client_body_timeout:
                self.stop(Reject(408, "request body stalled past client_body_timeout"))
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
        if self.eof or transport.is_closing() or not transport.can_write_eof():
            close(transport)
            return
        self.paused = 0
        linger(transport, LINGER)

    def idle(self) -> bool:
        return self.current is None and self.tunnel is None and not self.queue

    def wind_down(self) -> None:
        if self.idle():
            self.close()  # a clean close: a request already on its way meets no reset
        # else: exchange_done closes the connection, as the process is draining

    def exchanges(self) -> list[Exchange]:
        ex = self.tunnel or self.current
        if ex is not None and (self.tunnel is not None or not ex.over()):
            return [ex]
        return []


class ClientConnection(ClientState):
    """An asyncio Protocol by its methods. It does not derive from asyncio.Protocol:
    the loop only calls the methods, and a class with no Python base compiles to a
    native class (see proxy/native.py). It is the `ClientSide` its exchanges talk to.

    Made with what it shares with every connection of its listener: the
    process's state, the mirror tap, the set of open connections it joins, and
    whether the listener is TLS (its transport then is the TLS one, made after
    the handshake: proxy.http.handshake).
    """

    __slots__ = ()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
        if len(self.registry) >= self.shared.snapshot.config.limits.max_connections:
            self.closed = True
            self.phase = STOPPED
            self.refused(503, "too many connections")
            send(transport, error_response(503, None, "too many connections", False))  # type: ignore[arg-type]
            close(transport)
            return
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if self.progress == 1 and data[:3] == b"PRI" and self.h2c(data):
            self.hand_over(data)
            return
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self.phase == STOPPED:
            return  # a refused request: nothing after it is read
        try:
            self.consume(data)
        except Reject as r:
            self.stop(r)
        except FramingError as fe:
            self.stop(Reject(fe.status, fe.cause))
        except HeaderError as he:
            self.stop(Reject(400, str(he)))

    def eof_received(self) -> bool | None:
        if self.phase == STOPPED and self.current is None:
            return None  # nothing more to answer: the transport closes itself
        if self.tunnel is not None:
            self.tunnel.client_lost()  # a tunnel ends when either side ends it
            return None
        if self.phase in (BODY_LENGTH, BODY_CHUNKED):
            self.stop(Reject(400, "the client closed the connection mid-request"))
            return None
        # A half-closed client may still be waiting for its answer. Not over TLS: a
        # TLS transport closes on the client's close_notify whatever this returns.
        self.eof = True
        return True if self.current is not None and self.scheme == b"http" else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.registry.discard(self)
        if self.current is not None:
            self.current.client_lost()
        if self.tunnel is not None:
            self.tunnel.client_lost()
        queue, self.queue = self.queue, None
        for ex in queue or ():
            ex.cancel()

    def pause_writing(self) -> None:
        self.write_paused = _monotonic()
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = 0.0
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_paused(False)

    def h2c(self, data: bytes) -> bool:
        """`data` (a first read, which begins "PRI") begins the HTTP/2 preface, and HTTP/2
        in cleartext is taken (`http2.cleartext`, read as the bytes come)."""
        if not (data.startswith(H2_PREFACE) or H2_PREFACE.startswith(data)):
            return False  # a request whose method begins with PRI: HTTP/1.1
        return self.prior_knowledge is not None and self.shared.snapshot.config.http2.cleartext

    def hand_over(self, data: bytes) -> None:
        """The client speaks HTTP/2 (its first bytes begin the preface): leave the
        transport to the HTTP/2 connection, which reads `data` again."""
        assert self.prior_knowledge is not None
        self.closed = True
        self.phase = STOPPED
        self.registry.discard(self)
        self.prior_knowledge(self.transport, data)

    # -- ClientSide: what its exchanges call ------------------------------------------------

    def send(self, data: bytes) -> None:
        send(self.transport, data)

    def cut_off(self) -> None:
        abort(self.transport)

    def end_tunnel(self) -> None:
        close(self.transport)

    def peer_address(self) -> str:
        return self.peer

    def secure(self) -> bool:
        return self.scheme == b"https"

    def tunnel_bytes(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)

    # -- exchanges --------------------------------------------------------------------

    def admit(self, ex: Exchange) -> None:
        if self.current is None:
            self.current = ex
            ex.start()
            return
        if self.queue is None:
            self.queue = []
        self.queue.append(ex)
        self.pause_reading(PAUSE_PIPELINE)

    def exchange_done(self, ex: Exchange, now: float) -> None:
        if ex is not self.current or self.tunnel is not None:
            return
        self.current = None
        if ex.close_client or self.closed or self.shared.draining or self.eof:
            self.close()
            return
        self.idle_since = now
        if self.queue:
            nxt = self.queue.pop(0)
            self.current = nxt
            if not self.queue and self.reject is None:
                self.resume_reading(PAUSE_PIPELINE)
            nxt.start()
        elif self.reject is not None:
            self.bad_request(self.reject)

    def upgrade_bytes(self, rest: bytes) -> None:
        ex = self.current
        if ex is None or not ex.upgrade:
            self.stop(Reject(400, "unexpected protocol upgrade"))
            return
        if rest:
            ex.tunnel_from_client(rest)
        # Until the upstream answers 101, park client bytes on the exchange.
        self.tunnel = ex

    def start_tunnel(self, ex: Exchange) -> None:
        self.tunnel = ex

    def bad_request(self, reject: Reject) -> None:
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
        self.queue = None
        self.refused(reject.status, reject.cause)
        expose = self.shared.snapshot.expose_version
        answer = error_response(reject.status, None, reject.cause, expose, reject.head_only)
        send(self.transport, answer)
        self.close()
