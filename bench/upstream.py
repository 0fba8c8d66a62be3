"""A minimal, fast HTTP/1.1 upstream for the benchmark when nginx is absent.

One process, one event loop (uvloop when available), one asyncio.Protocol per
connection, the httptools parser. Every request gets the same small response
with keep-alive; pipelined requests are answered in order. It exists to be
cheaper than the thing being measured, so it does nothing else: no routing, no
logging, no request bodies kept.

    python bench/upstream.py --listen 127.0.0.1:9001 --listen 127.0.0.1:9002 \
        --body-bytes 100
"""

from __future__ import annotations

import argparse
import asyncio
import signal

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


def parse_listen(value: str) -> tuple[str, int, str]:
    """``[NAME=]HOST:PORT`` → (host, port, name)."""
    name, _, addr = value.rpartition("=")
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port), name


async def serve(listens: list[str], body_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in listens:
        host, port, name = parse_listen(spec)
        body = make_body(body_bytes, name)
        keep = make_response(body, name or "upstream", True)
        close = make_response(body, name or "upstream", False)
        server = await loop.create_server(
            lambda k=keep, c=close: UpstreamProtocol(k, c), host, port, backlog=1024
        )
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
    args = parser.parse_args(argv)
    if uvloop is not None:
        uvloop.run(serve(args.listen, args.body_bytes))
    else:  # pragma: no cover
        asyncio.run(serve(args.listen, args.body_bytes))


if __name__ == "__main__":
    main()
