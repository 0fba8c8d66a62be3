"""Trailers of chunked responses (PRODUCT.md §14): relayed to an HTTP/1.1 client that
sent `TE: trailers`, without hop-by-hop fields; dropped for any other client; a
malformed trailer section is the upstream's fault. Raw bytes both ways."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import RawClient, RawUpstream, versions_config

pytestmark = pytest.mark.live

BODY = b"5\r\nhello\r\n6\r\n world\r\n"
TRAILERS = (
    b"X-Checksum: 5eb63bbbe01eeed093cb22bb8f5acdc3\r\n"
    b"grpc-status: 0\r\n"
    b"Connection: close\r\n"  # hop-by-hop: never relayed
    b"X-Turnout-Version: forged\r\n"  # only the proxy says who served
)


def chunked_with(trailers: bytes):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        + BODY
        + b"0\r\n"
        + trailers
        + b"\r\n"
    )

    async def handler(up: RawUpstream, reader, writer) -> None:
        while await up.read_head(reader) is not None:
            writer.write(answer)
            await writer.drain()

    return handler


async def exchange(port: int, request: bytes) -> bytes:
    """Send `request` (it asks to close) and read everything until the proxy closes."""
    client = await RawClient.connect(port)
    await client.send(request)
    data = await asyncio.wait_for(client.reader.read(-1), 10)
    await client.close()
    return data


async def test_trailers_reach_a_client_that_takes_them(proxies, upstreams, green):
    blue = await upstreams.raw("blue", chunked_with(TRAILERS))
    proxy = await proxies.start(versions_config(blue.url, green.url))
    asked = b"GET /t HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    data = await exchange(proxy.port, asked)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head.lower()
    expected_trailers = b"X-Checksum: 5eb63bbbe01eeed093cb22bb8f5acdc3\r\ngrpc-status: 0\r\n"
    assert body == BODY + b"0\r\n" + expected_trailers + b"\r\n", body
    # The upstream was told the client takes trailers.
    assert blue.requests[0].header("TE") == "trailers"


async def test_trailers_are_dropped_for_a_client_that_did_not_ask(proxies, upstreams, green):
    blue = await upstreams.raw("blue", chunked_with(TRAILERS))
    proxy = await proxies.start(versions_config(blue.url, green.url))
    for te in (b"", b"TE: gzip\r\n"):
        plain = b"GET /t HTTP/1.1\r\nHost: a\r\n" + te + b"Connection: close\r\n\r\n"
        _, _, body = (await exchange(proxy.port, plain)).partition(b"\r\n\r\n")
        assert body == BODY + b"0\r\n\r\n", (te, body)
    # HTTP/1.0: no chunked framing at all, the body ends with the connection.
    old = await exchange(proxy.port, b"GET /t HTTP/1.0\r\nTE: trailers\r\n\r\n")
    head, _, body = old.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and body == b"hello world", old


async def test_a_malformed_trailer_section_is_the_upstreams_fault(proxies, upstreams, green):
    blue = await upstreams.raw("blue", chunked_with(b"Content-Length: 3\r\n"))
    proxy = await proxies.start(versions_config(blue.url, green.url))
    asked = b"GET /t HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    data = await exchange(proxy.port, asked)
    # Either the whole answer was read at once and judged before any of it went (a
    # 502 saying why), or its head went first and the client is cut off: it never
    # sees an end of body it could take for a whole answer.
    if data.startswith(b"HTTP/1.1 502"):
        assert b"a framing field among the trailers" in data, data
    else:
        assert data.startswith(b"HTTP/1.1 200 OK") and not data.endswith(b"0\r\n\r\n"), data
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="protocol") == 1
