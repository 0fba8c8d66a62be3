"""TLS on the listener: the handshake in front of each client connection.

Rules:
- The listener's TCP protocol is a `Handshake`. It runs `loop.start_tls` with
  the terminator in force at accept time (proxy.tls). The client's first
  bytes (its ClientHello) may reach the `Handshake` before `start_tls` has
  taken the transport over (uvloop starts reading when `connection_made`
  returns): they are kept, reading pauses, and they are handed to the TLS
  protocol, in order, before it reads anything more. Only a finished handshake
  makes the client connection, on the TLS transport: an HTTP/2 one
  (proxy.http.h2) when ALPN chose `h2`, else a `ClientConnection`. The
  exchange above never knows what it runs on, except that `X-Forwarded-Proto`
  is `https`.
- A handshake must end within the terminator's `timeout`; failures are counted
  by reason (`turnout_tls_handshake_failures_total`) and logged at debug level
  only: a scanner or a broken client must not flood the log.
- Handshakes in progress count against `limits.max_connections` with the
  connections served; beyond it a new one is closed before any TLS is spoken
  (reason `max_connections`).
- Draining: handshakes in progress are aborted, and one that finishes after
  the drain began is closed (a clean TLS close) without reading a request.
- A TLS close waits at most `SHUTDOWN` seconds for the client's close_notify.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..shared import Shared
from ..tls import Terminator, failure_reason
from .downstream import ClientConnection, Served

log = logging.getLogger("turnout.tls")

# Seconds a TLS close waits for the client's close_notify before it drops the
# connection (uvloop's default is 30): as long as a cleartext close lingers, so an
# idle or refused TLS connection frees its place as soon, and a drain ends as soon.
SHUTDOWN = 2.0


class Multiplexed(Protocol):
    """A connection that serves HTTP/2 (proxy.http.h2): an asyncio Protocol by its methods."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...


class Acceptor:
    """What every handshake of one listener shares: the terminator in force (replaced
    on reload with `use`), the handshakes in progress, and how to make the client
    connection a finished handshake serves: an HTTP/2 one when the client chose `h2`
    by ALPN, else an HTTP/1.1 one."""

    def __init__(
        self,
        terminator: Terminator,
        shared: Shared,
        registry: set[Served],
        connection: Callable[[], ClientConnection],
        multiplexed: Callable[[], Multiplexed],
    ) -> None:
        self.terminator = terminator
        self.shared = shared
        self.registry = registry
        self.connection = connection
        self.multiplexed = multiplexed
        self.pending: set[Handshake] = set()

    def use(self, terminator: Terminator) -> None:
        """New handshakes use `terminator`; those in progress finish on theirs."""
        self.terminator = terminator

    def __call__(self) -> Handshake:  # the listener's protocol factory
        return Handshake(self)

    def failed(self, reason: str) -> None:
        failures = self.shared.recorder.tls_failures
        failures[reason] = failures.get(reason, 0) + 1

    def abort_pending(self) -> None:
        for handshake in list(self.pending):
            handshake.abort()


class Handshake(asyncio.Protocol):
    """The protocol of one TCP connection until its TLS handshake is over."""

    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.early: list[bytes] = []  # bytes read before start_tls took the transport over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport
        acc = self.acceptor
        limit = acc.shared.snapshot.config.limits.max_connections
        if acc.shared.draining or len(acc.pending) + len(acc.registry) >= limit:
            if not acc.shared.draining:
                acc.failed("max_connections")
            transport.close()
            return
        acc.pending.add(self)
        self.task = asyncio.get_running_loop().create_task(self.run(acc.terminator))

    def data_received(self, data: bytes) -> None:
        # Before start_tls: the client's first TLS bytes (see the module's rules).
        # After it: never (the TLS protocol hands decrypted data over only once
        # start_tls has returned, and the connection then takes over).
        self.early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # the handshake's task sees the failure

    def abort(self) -> None:
        """The drain: end this handshake now (its task may not have started yet, and a
        task cancelled before it starts runs nothing, so the transport goes here)."""
        self.acceptor.pending.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def run(self, terminator: Terminator) -> None:
        acc = self.acceptor
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        if transport.is_closing():  # gone before the handshake began
            acc.pending.discard(self)
            acc.failed("closed")
            return
        # Runs once start_tls has put its TLS protocol on the transport: before that
        # protocol's connection_made (which starts the handshake on what it holds) and
        # before reading resumes (start_tls pauses it, and resumes it in a callback
        # queued after this one). A TLS protocol takes data before connection_made.
        loop.call_soon(self.hand_over)
        try:
            secured = await loop.start_tls(
                transport, self, terminator.front, server_side=True,
                ssl_handshake_timeout=terminator.timeout, ssl_shutdown_timeout=SHUTDOWN,
            )  # fmt: skip
        except asyncio.CancelledError:  # the drain: nothing was asked yet
            transport.abort()
            return
        except Exception as exc:  # noqa: BLE001 -- every failure is a counted reason
            reason = failure_reason(exc)
            acc.failed(reason)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("TLS handshake failed (%s): %r", reason, exc)
            return
        finally:
            acc.pending.discard(self)
        if secured is None:  # the transport closed as the handshake ended
            return
        if acc.shared.draining:
            secured.close()
            return
        ssl_object = secured.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        conn: Any = acc.multiplexed() if chosen == "h2" else acc.connection()
        secured.set_protocol(conn)  # a Protocol by its methods (see ClientConnection's class)
        conn.connection_made(secured)

    def hand_over(self) -> None:
        """Give the bytes read before start_tls to its TLS protocol (a BufferedProtocol)."""
        early, self.early = b"".join(self.early), []
        transport = self.transport
        if not early or transport is None or transport.is_closing():
            return
        tls: Any = transport.get_protocol()
        if not hasattr(tls, "buffer_updated"):  # a plain Protocol
            tls.data_received(early)
            return
        view = memoryview(early)
        while view:
            buf = tls.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]
