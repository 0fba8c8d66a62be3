"""A minimal, fast HTTP/1.1 upstream for the benchmark when nginx is absent.

One process, one event loop (uvloop when available), one asyncio.Protocol per
connection, the httptools parser. Every request gets the same small response
with keep-alive; pipelined requests are answered in order. It exists to be
cheaper than the thing being measured, so it does nothing else: no routing, no
logging, no request bodies kept.

With `--delay SECONDS` every answer leaves that long after its request was
read: a slow canary for the mirror benchmark (`bench.run --slow-canary`). A
pending answer costs one deque entry on its connection and at most one timer
per connection, so thousands of waiting requests are cheap; answers on one
connection still leave in request order.

    python bench/upstream.py --listen 127.0.0.1:9001 --listen 127.0.0.1:9002 \
        --body-bytes 100 [--delay 10]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
from collections import deque
from collections.abc import Callable

import httptools

try:  # the fallback should still run where uvloop is missing
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def make_body(size: int, name: str = "") -> bytes:
    """A printable body of exactly ``size`` bytes (at least 2): ``ok NAME ......``.

    Only letters, spaces and dots, so the same text can sit in an nginx config.
    """
    size = max(size, 2)
    head = f"ok {name} ".encode() if name else b"ok "
    return (head + b"." * size)[:size]


def make_response(body: bytes, name: str, keep_alive: bool) -> bytes:
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"X-Upstream: " + name.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: " + conn + b"\r\n\r\n" + body
    )


class UpstreamProtocol(asyncio.Protocol):
    """Answer each parsed request with a prebuilt response."""

    __slots__ = ("_transport", "_parser", "_keep", "_close")

    def __init__(self, keep: bytes, close: bytes) -> None:
        self._keep = keep
        self._close = close
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply_and_close(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
        except httptools.HttpParserError:
            self._reply_and_close(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    # httptools callback: the whole request (headers and body) has been read
    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._parser.should_keep_alive():
            transport.write(self._keep)
        else:
            transport.write(self._close)
            transport.close()

    def _reply_and_close(self, raw: bytes) -> None:
        if self._transport is not None:
            self._transport.write(raw)
            self._transport.close()


class DelayedProtocol(asyncio.Protocol):
    """Like UpstreamProtocol, but each answer leaves `delay` seconds after its request.

    Due times go into a per-connection FIFO; one timer, set for the oldest, sends
    whatever is due and re-arms for the next. A client that hangs up simply drops
    its queue (no task, no future per request).
    """

    def __init__(self, keep: bytes, close: bytes, delay: float) -> None:
        self._keep = keep
        self._close = close
        self._delay = delay
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._due: deque[tuple[float, bool]] = deque()  # (when, keep_alive)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        self._due.append((self._loop.time() + self._delay, self._parser.should_keep_alive()))
        if self._timer is None:
            self._timer = self._loop.call_at(self._due[0][0], self._send_due)

    def _send_due(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._due and self._due[0][0] <= now:
            _, keep_alive = self._due.popleft()
            transport = self._transport
            if transport is None:
                return
            if keep_alive:
                transport.write(self._keep)
            else:
                transport.write(self._close)
                transport.close()
                self._due.clear()
                return
        if self._due:
            self._timer = self._loop.call_at(self._due[0][0], self._send_due)


def parse_listen(value: str) -> tuple[str, int, str]:
    """``[NAME=]HOST:PORT`` → (host, port, name)."""
    name, _, addr = value.rpartition("=")
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port), name


async def serve(
    listens: list[str], body_bytes: int, delay: float = 0.0, body_name: str | None = None
) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in listens:
        host, port, name = parse_listen(spec)
        body = make_body(body_bytes, name if body_name is None else body_name)
        keep = make_response(body, name or "upstream", True)
        close = make_response(body, name or "upstream", False)
        factory: Callable[[], asyncio.Protocol]
        if delay > 0:
            factory = functools.partial(DelayedProtocol, keep, close, delay)
        else:
            factory = functools.partial(UpstreamProtocol, keep, close)
        server = await loop.create_server(factory, host, port, backlog=1024)
        servers.append(server)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--listen",
        action="append",
        required=True,
        help="[NAME=]HOST:PORT to serve on; repeat for several ports (NAME goes in the body)",
    )
    parser.add_argument("--body-bytes", type=int, default=100, help="response body size")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before each answer (default 0)"
    )
    parser.add_argument(
        "--body-name", help="name to put in every body (default: each listener's own NAME)"
    )
    args = parser.parse_args(argv)
    coro = serve(args.listen, args.body_bytes, args.delay, args.body_name)
    if uvloop is not None:
        uvloop.run(coro)
    else:  # pragma: no cover
        asyncio.run(coro)


if __name__ == "__main__":
    main()
