"""Limits and timeouts on the forwarding path, over real loopback sockets.

Each test sends raw bytes and asserts two things: what the client got, and what
an upstream that logs every byte it receives actually received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from .conftest import (
    AppUpstream,
    MiB,
    ProxyFactory,
    RawClient,
    RssSampler,
    Upstreams,
    answer_then_close,
    eventually,
    request,
    versions_config,
)

pytestmark = pytest.mark.live

SMUGGLE = (
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2a\r\nGET /smuggled HTTP/1.1\r\nHost: internal\r\n"
    b"\r\n\r\n0\r\n\r\n"
)


class Logging:
    """A raw upstream's handler: every byte received is kept per connection; each
    request head (bodies are not expected) gets `answer`."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") -> None:
        self.answer = answer
        self.received: list[bytearray] = []

    async def __call__(self, up, reader: asyncio.StreamReader, writer) -> None:
        got = bytearray()
        self.received.append(got)
        answered = 0
        while True:
            data = await reader.read(65536)
            if not data:
                return
            got += data
            while got.count(b"\r\n\r\n") > answered:
                answered += 1
                writer.write(self.answer)
                await writer.drain()

    def total(self) -> bytes:
        return b"".join(bytes(b) for b in self.received)


async def status_and_close(c: RawClient) -> tuple[int, bool]:
    r = await c.response()
    return r.status, await c.closed_by_peer()


async def refused_then_next(port: int, data: bytes, next_request: bytes) -> tuple[int, bool, int]:
    """Send `data` on one connection, then `next_request` on another: the first
    answer's status, whether the proxy closed that connection, the second's status."""
    c = await RawClient.connect(port)
    try:
        await c.send(data)
        status, closed = await status_and_close(c)
    finally:
        await c.close()
    c = await RawClient.connect(port)
    try:
        await c.send(next_request)
        next_status = (await c.response()).status
    finally:
        await c.close()
    return status, closed, next_status


@pytest.mark.timeout(30)
async def test_the_te_te_desync_request_is_refused_before_the_upstream(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    log = Logging()
    up = await upstreams.raw("blue", log)
    proxy = await proxies.start(versions_config(up.url, green.url))
    user = request("GET", "/user", headers=[("Authorization", "Bearer secret")])
    status, closed, user_status = await refused_then_next(proxy.port, SMUGGLE, user)
    assert status == 400 and closed
    # A user's request on another connection goes through alone.
    assert user_status == 200
    received = log.total()
    assert b"/a" not in received and b"smuggled" not in received
    assert received.count(b"GET /user HTTP/1.1\r\n") == 1
    assert received.endswith(b"\r\n\r\n")


@pytest.mark.timeout(60)
async def test_a_24_mib_header_line_gets_431_without_growing_memory(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(versions_config(blue.url, green.url))
    c = await RawClient.connect(proxy.port)
    piece = b"a" * 65536
    status = None
    async with RssSampler(proxy.pid) as rss:
        try:
            await c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(24 * 16):  # 24 MiB with no CRLF, unless refused first
                    c.writer.write(piece)
                    await asyncio.wait_for(c.writer.drain(), 5)
            r = await c.response()
            status = r.status
        finally:
            await c.close()
    assert status == 431
    assert rss.peak - rss.samples[0] < 1 * MiB, rss.samples
    assert blue.connections == 0


@pytest.mark.timeout(30)
async def test_a_chunked_body_that_never_ends_is_closed_at_the_body_timeout(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    log = Logging()
    up = await upstreams.raw("blue", log)
    limits = {"client_body_timeout": "1s"}
    proxy = await proxies.start(versions_config(up.url, green.url, limits=limits))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        r = await c.response(timeout=10)
        assert r.status == 408
        assert await c.closed_by_peer()
    finally:
        await c.close()
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", code="408") == 1


@pytest.mark.timeout(30)
async def test_a_head_trickled_forever_is_closed_at_the_header_timeout(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream
):
    limits = {"client_header_timeout": "1s"}
    proxy = await proxies.start(versions_config(blue.url, green.url, limits=limits))
    c = await RawClient.connect(proxy.port)
    closed = False
    try:
        await c.send(b"GET / HTTP/1.1\r\n")
        for i in range(200):  # a header line every 50 ms, never the blank line
            try:
                await c.send(b"X-%d: slow\r\n" % i)
            except ConnectionError:
                closed = True
                break
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(c.reader.read(65536), 0.05)
                if data.startswith(b"HTTP/1.1 408") or not data:
                    closed = True
                    break
    finally:
        await c.close()
    assert closed
    assert blue.connections == 0


@pytest.mark.timeout(30)
async def test_a_client_that_stops_reading_is_closed_at_the_send_timeout(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream
):
    limits = {"send_timeout": "1s"}
    proxy = await proxies.start(versions_config(blue.url, green.url, limits=limits))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        # 256 MiB, never read: far more than the socket buffers hold, so the proxy's
        # writes to this client pause, and stay paused.
        writer.write(request("GET", f"/download?size={256 * MiB}"))
        await writer.drain()

        async def given_up() -> bool:
            m = await proxy.metrics()
            return m.get("turnout_requests_total", version="blue", code="499") == 1

        await eventually(given_up, timeout=15, interval=0.2)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.timeout(30)
async def test_an_upstream_that_sends_extra_bytes_is_never_reused(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    log = Logging(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    up = await upstreams.raw("blue", log)
    proxy = await proxies.start(versions_config(up.url, green.url))
    for i in range(3):
        c = await RawClient.connect(proxy.port)
        try:
            await c.send(request("GET", f"/r/{i}"))
            r = await c.response()
            assert (r.status, r.body) == (200, b"ok")
        finally:
            await c.close()
    # Each request went out on a fresh upstream connection, alone.
    await eventually(lambda: len(log.received) == 3)
    for i, got in enumerate(log.received):
        assert bytes(got).count(b" HTTP/1.1\r\n") == 1, got
        assert bytes(got).startswith(b"GET /r/%d HTTP/1.1\r\n" % i)


@pytest.mark.timeout(30)
async def test_connections_beyond_the_cap_get_503(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(versions_config(blue.url, green.url, limits={"max_connections": 4}))
    held = [await RawClient.connect(proxy.port) for _ in range(4)]
    try:
        for c in held:  # each is accepted: a request on it is served
            await c.send(request("GET", "/held"))
            assert (await c.response()).status == 200
        extra = await RawClient.connect(proxy.port)
        try:
            r = await extra.response()
            assert r.status == 503
            assert await extra.closed_by_peer()
        finally:
            await extra.close()
    finally:
        for c in held:
            await c.close()
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", code="503") == 1


@pytest.mark.timeout(30)
async def test_a_truncated_response_is_counted_as_a_failure(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    truncate = answer_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    up = await upstreams.raw("blue", truncate)
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/"))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await c.response()
    finally:
        await c.close()

    async def counted() -> bool:
        m = await proxy.metrics()
        return m.get("turnout_requests_total", version="blue", code="502") == 1

    await eventually(counted)
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="200") == 0
    _, status = await proxy.admin_get("/status")
    assert status["versions"]["blue"]["errors"] == 1


@pytest.mark.timeout(40)
async def test_keep_alive_clients_at_a_drain_get_an_answer_or_a_clean_close(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream
):
    """SIGTERM closes idle keep-alive connections; a request already on its way must
    meet an answer or a clean end (FIN), never a reset that a client cannot retry on."""
    proxy = await proxies.start(versions_config(blue.url, green.url))
    clients = [await RawClient.connect(proxy.port) for _ in range(40)]
    outcomes: list[str] = []
    try:
        for c in clients:  # each connection is kept alive after one request
            await c.send(request("GET", "/first"))
            assert (await c.response()).status == 200
        os.kill(proxy.pid, signal.SIGTERM)
        for c in clients:  # a second request races the drain
            with contextlib.suppress(ConnectionError):
                c.writer.write(request("GET", "/second"))
        for c in clients:
            try:
                data = await asyncio.wait_for(c.reader.read(65536), 10)
            except ConnectionResetError:
                outcomes.append("reset")
                continue
            outcomes.append("answer" if data.startswith(b"HTTP/1.1 ") else "clean close")
    finally:
        for c in clients:
            await c.close()
    assert "reset" not in outcomes, outcomes
    assert len(outcomes) == len(clients)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cut",
    [
        b"5\r\nhello\r\n0\r\nX-Trailer",  # inside the trailers
        b"5\r\nhel",  # inside a chunk
        b"5\r\nhello\r\n",  # between chunks
    ],
)
async def test_a_chunked_response_cut_short_is_never_completed_for_the_client(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, cut: bytes
):
    """The upstream's close ends a body only when its framing says so: a chunked
    body (here with OWS after `chunked`) that stops early is a failure, and the
    client must not receive a terminating chunk that would make it look whole."""

    truncate = answer_then_close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked \r\n\r\n" + cut)
    up = await upstreams.raw("blue", truncate)
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/"))
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(c.reader.read(65536), 10):
                data += chunk
    finally:
        await c.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert not data.endswith(b"0\r\n\r\n"), data

    async def counted() -> bool:
        m = await proxy.metrics()
        return m.get("turnout_requests_total", version="blue", code="502") == 1

    await eventually(counted)


@pytest.mark.timeout(30)
async def test_a_request_pipelined_after_a_413_for_its_length_never_reaches_the_upstream(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    log = Logging()
    up = await upstreams.raw("blue", log)
    proxy = await proxies.start(versions_config(up.url, green.url, limits={"max_body_bytes": 1024}))
    big = (
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n"
        + b"b" * 2048
        + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, closed, user_status = await refused_then_next(proxy.port, big, request("GET", "/user"))
    assert status == 413 and closed
    # The next user's request on another connection is the first the upstream sees.
    assert user_status == 200
    received = log.total()
    assert b"/after" not in received and b"/big" not in received
    assert received.startswith(b"GET /user HTTP/1.1\r\n") and received.count(b"GET ") == 1
