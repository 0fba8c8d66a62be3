"""Forwarding over real loopback sockets: the proxy subprocess between real clients
and real upstreams (PRODUCT.md §4, §10, §13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import time

import aiohttp
import pytest

from proxy.routing import bucket

from .conftest import (
    AppUpstream,
    MiB,
    Proxy,
    ProxyFactory,
    RawClient,
    RawUpstream,
    RssSampler,
    Upstreams,
    answer_then_close,
    eventually,
    request,
    versions_config,
)

pytestmark = pytest.mark.live

RSS_LIMIT = 100 * MiB


def sticky(weight: int = 0, **routing) -> dict:
    return {"weight": weight, "sticky": {"key": "header:X-User-Id"}, **routing}


def key_for(version_on_canary: bool, weight: int, group: str = "green") -> str:
    """A sticky key whose bucket puts it on the canary (or not) at `weight`."""
    for i in range(10_000):
        key = f"user-{i}"
        if (bucket(group, key) <= weight) == version_on_canary:
            return key
    raise AssertionError("no key found")


# ------------------------------------------------------------------ round trips


@pytest.mark.timeout(20)
async def test_get_and_post_round_trip(proxy: Proxy, blue: AppUpstream, green, session):
    headers = {
        "Host": "shop.example:8443",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "X-Custom": "kept",
    }
    async with session.get(proxy.url + "/a/b?x=1&y=two", headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Turnout-Version"] == "blue"
        assert r.headers["X-Upstream"] == "blue"
        doc = await r.json()
    assert doc["method"] == "GET"
    assert doc["path"] == "/a/b?x=1&y=two"

    async with session.post(proxy.url + "/submit?id=9", data=b"hello body", headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Turnout-Version"] == "blue"
        doc = await r.json()
    assert doc["method"] == "POST"
    assert doc["path"] == "/submit?id=9"
    assert doc["body"] == "hello body"

    assert [s.method for s in blue.requests] == ["GET", "POST"]
    assert green.requests == []
    for seen in blue.requests:
        assert seen.header_all("Host") == ["shop.example:8443"]
        assert seen.header_all("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
        assert seen.header_all("X-Forwarded-Proto") == ["http"]
        assert seen.header_all("X-Forwarded-Host") == ["shop.example:8443"]
        assert seen.header("X-Custom") == "kept"
    assert blue.requests[1].body == b"hello body"


@pytest.mark.timeout(20)
async def test_forwarded_for_is_set_without_client_value(proxy: Proxy, blue: AppUpstream):
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/plain", host="plain.test"))
        r = await c.response()
        assert r.status == 200
    finally:
        await c.close()
    seen = blue.requests[-1]
    assert seen.header_all("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header_all("X-Forwarded-Host") == ["plain.test"]
    assert seen.header_all("Host") == ["plain.test"]


@pytest.mark.timeout(20)
async def test_hop_by_hop_request_headers_are_removed(proxy: Proxy, blue: AppUpstream):
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(
            request(
                "GET",
                "/hop",
                headers=[
                    ("Connection", "X-Hop-A, close"),
                    ("X-Hop-A", "secret"),
                    ("Keep-Alive", "timeout=5"),
                    ("TE", "gzip"),
                    ("Proxy-Connection", "keep-alive"),
                    ("Upgrade", "h2c"),
                    ("X-End-To-End", "yes"),
                ],
            )
        )
        r = await c.response()
        assert r.status == 200
        assert await c.closed_by_peer(), "Connection: close must close the client connection"
    finally:
        await c.close()
    seen = blue.requests[-1]
    names = {k.lower() for k, _ in seen.headers}
    for hop in ("x-hop-a", "keep-alive", "te", "proxy-connection", "upgrade"):
        assert hop not in names, f"{hop} reached the upstream: {seen.headers}"
    for value in seen.header_all("Connection"):
        assert "x-hop-a" not in value.lower()
    assert seen.header("X-End-To-End") == "yes"

    # TE: trailers is the one TE value that is forwarded.
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/te", headers=[("TE", "trailers")]))
        assert (await c.response()).status == 200
    finally:
        await c.close()
    assert blue.requests[-1].header_all("TE") == ["trailers"]


async def _hop_response(up: RawUpstream, reader, writer) -> None:
    while await up.read_head(reader) is not None:
        body = b"hop!"
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: 4\r\n"
            b"Connection: X-Resp-Hop, keep-alive\r\n"
            b"X-Resp-Hop: private\r\n"
            b"Keep-Alive: timeout=30, max=100\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Turnout-Version: spoofed\r\n"
            b"X-Kept: yes\r\n\r\n" + body
        )
        await writer.drain()


@pytest.mark.timeout(20)
async def test_hop_by_hop_response_headers_are_removed(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    hop = await upstreams.raw("blue", _hop_response)
    proxy = await proxies.start(versions_config(hop.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        for _ in range(2):  # the connection stays usable
            await c.send(request("GET", "/"))
            r = await c.response()
            assert r.status == 200
            assert r.body == b"hop!"
            assert r.header("X-Kept") == "yes"
            assert r.header_all("X-Turnout-Version") == ["blue"]
            names = {k.lower() for k, _ in r.headers}
            for name in ("x-resp-hop", "keep-alive", "proxy-connection", "upgrade"):
                assert name not in names, f"{name} reached the client: {r.headers}"
            for value in r.header_all("Connection"):
                assert "x-resp-hop" not in value.lower()
    finally:
        await c.close()


@pytest.mark.timeout(20)
async def test_expose_version_false_hides_the_version_header(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, session
):
    routing = {
        "weight": 0,
        "rules": [{"name": "qa", "match": {"header": {"X-Canary": "always"}}, "to": "canary"}],
    }
    cfg = versions_config(blue.url, upstreams.dead_url(), routing=routing, expose_version=False)
    proxy = await proxies.start(cfg)
    async with session.get(proxy.url + "/") as r:
        assert r.status == 200
        assert "X-Turnout-Version" not in r.headers
    async with session.get(proxy.url + "/", headers={"X-Canary": "always"}) as r:
        assert r.status == 502
        assert "X-Turnout-Version" not in r.headers
        assert (await r.json())["version"] == "green"


# -------------------------------------------------------------- connection reuse


@pytest.mark.timeout(20)
async def test_keep_alive_serves_several_requests_on_one_connection(
    proxy: Proxy, blue: AppUpstream
):
    c = await RawClient.connect(proxy.port)
    try:
        for i in range(5):
            body = f"body-{i}".encode()
            method = "POST" if i % 2 else "GET"
            await c.send(request(method, f"/k/{i}", body=body if method == "POST" else b""))
            r = await c.response()
            assert r.status == 200
            assert r.json()["path"] == f"/k/{i}"
            assert r.header("X-Turnout-Version") == "blue"
            assert (r.header("Connection") or "").lower() != "close"
    finally:
        await c.close()
    assert blue.paths() == [f"/k/{i}" for i in range(5)]


@pytest.mark.timeout(20)
async def test_http10_client_closes_unless_keep_alive_asked(proxy: Proxy, blue: AppUpstream):
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(b"GET /old HTTP/1.0\r\nHost: old.test\r\n\r\n")
        r = await c.response()
        assert r.status == 200
        assert r.json()["path"] == "/old"
        assert await c.closed_by_peer()
    finally:
        await c.close()

    c = await RawClient.connect(proxy.port)
    try:
        for i in range(2):
            await c.send(
                f"GET /ka/{i} HTTP/1.0\r\nHost: ka.test\r\nConnection: keep-alive\r\n\r\n".encode()
            )
            r = await c.response()
            assert r.status == 200
            assert r.json()["path"] == f"/ka/{i}"
            assert (r.header("Connection") or "").lower() == "keep-alive"
    finally:
        await c.close()

    # A chunked upstream answer to an HTTP/1.0 client is delimited by closing.
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(
            b"GET /chunks?n=3&delay=0.01 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
        )
        r = await c.response()
        assert r.status == 200
        assert r.header("Transfer-Encoding") is None
        assert len(r.body.splitlines()) == 3
    finally:
        await c.close()


@pytest.mark.timeout(20)
async def test_http10_request_without_host_is_forwarded_with_a_host(
    proxy: Proxy, blue: AppUpstream
):
    # Host is optional in HTTP/1.0, but the proxy speaks HTTP/1.1 upstream, where it
    # is required (RFC 9112 §3.2): the upstream must still get a valid request.
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(b"GET /no-host HTTP/1.0\r\n\r\n")
        r = await c.response()
        assert r.status == 200, r
        assert r.json()["path"] == "/no-host"
    finally:
        await c.close()
    assert len(blue.requests[-1].header_all("Host")) == 1


@pytest.mark.timeout(20)
async def test_pipelined_requests_are_answered_in_order(proxy: Proxy, blue: AppUpstream):
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(
            request("GET", "/first")
            + request("POST", "/second", body=b"middle-body")
            + request("GET", "/third?q=3")
        )
        got = [await c.response() for _ in range(3)]
    finally:
        await c.close()
    assert [r.status for r in got] == [200, 200, 200]
    assert [r.json()["path"] for r in got] == ["/first", "/second", "/third?q=3"]
    assert got[1].json()["method"] == "POST"
    assert got[1].json()["body"] == "middle-body"
    assert blue.paths() == ["/first", "/second", "/third?q=3"]


@pytest.mark.timeout(20)
async def test_pipelined_chunked_request_behind_another_is_answered(
    proxy: Proxy, blue: AppUpstream
):
    chunked = (
        b"POST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nchunky\r\n5\r\n-body\r\n0\r\n\r\n"
    )
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/slow?delay=0.3") + chunked + request("GET", "/third"))
        got = [await c.response(timeout=5) for _ in range(3)]
    finally:
        await c.close()
    assert [r.status for r in got] == [200, 200, 200]
    assert [r.json()["path"] for r in got] == ["/slow?delay=0.3", "/second", "/third"]
    assert got[1].json()["body"] == "chunky-body"


@pytest.mark.timeout(20)
async def test_half_closed_client_still_gets_its_answers(proxy: Proxy, blue: AppUpstream):
    """A client may send its requests and shut down its sending side (`nc -N`)."""
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/only"))
        c.writer.write_eof()
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/only"
        assert await c.closed_by_peer()
    finally:
        await c.close()

    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/one") + request("GET", "/two"))
        c.writer.write_eof()
        got = [await c.response() for _ in range(2)]
        assert [r.json()["path"] for r in got] == ["/one", "/two"]
        assert await c.closed_by_peer()
    finally:
        await c.close()


@pytest.mark.timeout(30)
async def test_many_concurrent_clients(proxy: Proxy, blue: AppUpstream):
    n = 300
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(i: int) -> tuple[int, str]:
            async with s.post(proxy.url + f"/c/{i}", data=f"body-{i}".encode()) as r:
                return r.status, (await r.json())["body"]

        got = await asyncio.gather(*(one(i) for i in range(n)))
    assert got == [(200, f"body-{i}") for i in range(n)]
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="200") == n
    assert m.get("turnout_in_flight_requests", version="blue") == 0


@pytest.mark.timeout(20)
async def test_idle_connections_are_closed_after_idle_timeout(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(blue.url, green.url, limits={"idle_timeout": "1s"})
    proxy = await proxies.start(cfg)
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/once"))
        assert (await c.response()).status == 200
        t0 = time.monotonic()
        assert await c.closed_by_peer(timeout=5), "idle client connection kept open"
        assert 0.9 <= time.monotonic() - t0 <= 3.5
    finally:
        await c.close()
    # the pooled upstream connection is swept too
    await eventually(lambda: blue.closed == blue.connections == 1, timeout=4)


@pytest.mark.timeout(20)
async def test_slow_upload_is_not_a_response_timeout(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    """response_timeout bounds the wait for the answer, not the client's upload."""
    cfg = versions_config(blue.url, green.url, limits={"response_timeout": "1s"})
    proxy = await proxies.start(cfg)

    async def trickle():
        for _ in range(8):
            yield b"x" * 1000
            await asyncio.sleep(0.2)

    async with session.post(proxy.url + "/upload", data=trickle()) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"received": 8000}


# ---------------------------------------------------------- malformed and limits


async def _assert_rejected(proxy: Proxy, payload: bytes, status: int) -> dict:
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(payload)
        r = await c.response()
        assert r.status == status, r
        assert r.header(
            "Content-Type",
        ) is not None and "json" in r.header("Content-Type")
        doc = r.json()
        assert doc.get("error"), doc
        assert await c.closed_by_peer(), "the connection must close after a rejection"
        return doc
    finally:
        await c.close()


async def _warm(proxy: Proxy) -> None:
    """One good request, so the proxy holds a pooled upstream connection."""
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/warm"))
        assert (await c.response()).status == 200
    finally:
        await c.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\x01\x02 garbage \xff\r\n\r\n", id="garbage"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n", id="header-line"),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"ZZ\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-framing",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            id="conflicting-length",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5x\r\n\r\nhello", id="bad-length"
        ),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", id="obs-fold"),
    ],
)
async def test_malformed_request_gets_400_and_never_reaches_upstream(
    proxy: Proxy, blue: AppUpstream, green: AppUpstream, payload: bytes
):
    await _warm(proxy)
    before = (len(blue.requests), blue.bytes_in, green.connections)
    await _assert_rejected(proxy, payload, 400)
    await asyncio.sleep(0.2)  # let anything wrongly forwarded arrive
    assert (len(blue.requests), blue.bytes_in, green.connections) == before, blue.paths()
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", code="400") >= 1


@pytest.mark.timeout(20)
async def test_malformed_request_on_cold_proxy_contacts_no_upstream(
    proxy: Proxy, blue: AppUpstream, green: AppUpstream
):
    await _assert_rejected(proxy, b"GET /x HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n", 400)
    await _assert_rejected(
        proxy,
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nQQ\r\nhi\r\n0\r\n\r\n",
        400,
    )
    await asyncio.sleep(0.2)
    assert blue.requests == [] and green.requests == []
    assert blue.bytes_in == 0 and green.bytes_in == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "target", [pytest.param(b"evil.example:443", id="authority"), pytest.param(b"/", id="origin")]
)
async def test_connect_is_refused_and_never_forwarded(
    proxy: Proxy, blue: AppUpstream, green: AppUpstream, target: bytes
):
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(b"CONNECT %s HTTP/1.1\r\nHost: evil.example:443\r\n\r\n" % target)
        r = await c.response()
        assert r.status == 405, r
        assert "error" in r.json()
    finally:
        await c.close()
    await asyncio.sleep(0.1)
    assert blue.requests == [] and green.requests == []
    assert blue.connections == 0 and green.connections == 0


@pytest.mark.timeout(20)
async def test_missing_host_on_http11_is_400(proxy: Proxy, blue: AppUpstream):
    doc = await _assert_rejected(proxy, b"GET /nohost HTTP/1.1\r\nAccept: */*\r\n\r\n", 400)
    assert "host" in doc["cause"].lower()
    assert blue.requests == []


@pytest.mark.timeout(20)
async def test_header_block_over_limit_is_431(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(blue.url, green.url, limits={"max_header_bytes": 4096})
    proxy = await proxies.start(cfg)
    big = [(f"X-Fill-{i}", "v" * 200) for i in range(40)]  # ~9 KiB of headers
    await _assert_rejected(proxy, request("GET", "/big", headers=big), 431)
    # Just under the limit still passes.
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/small", headers=big[:10]))
        assert (await c.response()).status == 200
    finally:
        await c.close()
    assert blue.paths() == ["/small"]
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", code="431") == 1


@pytest.mark.timeout(20)
async def test_content_length_over_limit_is_413_without_upstream(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(blue.url, green.url, limits={"max_body_bytes": "1MiB"})
    proxy = await proxies.start(cfg)
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * MiB)
    doc = await _assert_rejected(proxy, head, 413)
    assert doc["version"] == "blue"
    assert blue.connections == 0 and blue.requests == []
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="413") == 1


@pytest.mark.timeout(20)
async def test_refusal_behind_a_relayed_response_keeps_their_order(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    """Writes are held to the end of the loop's turn: a response relayed and a
    refusal made in the same turn still reach the client in order, before the close."""
    cfg = versions_config(blue.url, green.url, limits={"max_body_bytes": "1MiB"})
    proxy = await proxies.start(cfg)
    too_big = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * MiB)
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/first") + too_big)
        first, second = await c.response(), await c.response()
        assert await c.closed_by_peer()
    finally:
        await c.close()
    assert (first.status, first.json()["path"]) == (200, "/first")
    assert second.status == 413
    assert blue.paths() == ["/first"]


@pytest.mark.timeout(20)
async def test_small_chunked_body_over_limit_is_413_and_never_forwarded(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(blue.url, green.url, limits={"max_body_bytes": "1KiB"})
    proxy = await proxies.start(cfg)
    body = b"800\r\n" + b"b" * 0x800 + b"\r\n0\r\n\r\n"
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    doc = await _assert_rejected(proxy, head + body, 413)
    assert doc["version"] == "blue"
    await asyncio.sleep(0.1)
    assert blue.requests == [] and blue.bytes_in == 0


async def _stream_chunked_until_answered(port: int, total: int) -> int | None:
    """Send a chunked upload of up to `total` bytes while reading; stop sending as soon
    as the answer starts. Returns the answer's status (None if the connection was cut
    before any answer). Plain sockets, so a failed send does not hide received bytes."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    answered = asyncio.Event()

    async def sender() -> None:
        await loop.sock_sendall(
            sock, b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"%x\r\n%s\r\n" % (64 * 1024, b"u" * 64 * 1024)
        for _ in range(total // (64 * 1024)):
            if answered.is_set():
                return
            await loop.sock_sendall(sock, piece)
            await asyncio.sleep(0.002)

    send_task = asyncio.create_task(sender())
    received = b""
    try:
        deadline = time.monotonic() + 10
        while b"\r\n" not in received and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            answered.set()
    finally:
        answered.set()
        send_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await send_task
        sock.close()
    if not received:
        return None
    return int(received.split(b" ", 2)[1])


@pytest.mark.timeout(30)
async def test_chunked_body_crossing_limit_is_413_and_upstream_aborted(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(blue.url, green.url, limits={"max_body_bytes": "1MiB"})
    proxy = await proxies.start(cfg)
    status = await _stream_chunked_until_answered(proxy.port, total=3 * MiB)
    assert status == 413

    async def aborted():
        return blue.uploads and blue.uploads[0]["error"] is not None

    await eventually(aborted, timeout=5)
    up = blue.uploads[0]
    assert not up["complete"]
    assert up["received"] <= 1 * MiB
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="413") == 1


# --------------------------------------------------------------- request targets


@pytest.mark.timeout(20)
async def test_absolute_form_target_uses_configured_upstream(
    proxy: Proxy, blue: AppUpstream, upstreams: Upstreams
):
    trap = await upstreams.app("trap")
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        r = await c.response()
        assert r.status == 200
        assert r.header("X-Turnout-Version") == "blue"
        await c.send(
            f"GET http://127.0.0.1:{trap.port}/y?z=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        r = await c.response()
        assert r.status == 200
        assert r.json()["upstream"] == "blue"
    finally:
        await c.close()
    assert blue.paths() == ["/x", "/y?z=1"]
    assert trap.connections == 0


# ------------------------------------------------------------- bodiless framing


@pytest.mark.timeout(20)
async def test_head_has_length_but_no_body_and_connection_stays_usable(
    proxy: Proxy, blue: AppUpstream
):
    c = await RawClient.connect(proxy.port)
    try:
        for _ in range(2):  # the second HEAD reuses the pooled upstream connection
            await c.send(request("HEAD", "/thing"))
            r = await c.response(method="HEAD")
            assert r.status == 200
            assert int(r.header("Content-Length") or 0) > 0
            assert r.header("X-Turnout-Version") == "blue"
            await c.send(request("GET", "/after-head"))
            r = await c.response()
            assert r.status == 200, r
            assert r.json()["path"] == "/after-head"
    finally:
        await c.close()
    assert [s.method for s in blue.requests] == ["HEAD", "GET", "HEAD", "GET"]


@pytest.mark.timeout(20)
async def test_204_and_304_have_no_body(proxy: Proxy, blue: AppUpstream):
    c = await RawClient.connect(proxy.port)
    try:
        for code in (204, 304, 204):
            await c.send(request("GET", f"/status/{code}"))
            r = await c.response()
            assert r.status == code
            assert r.header("Transfer-Encoding") is None
            assert r.header("X-Turnout-Version") == "blue"
        await c.send(request("GET", "/after"))
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/after"
    finally:
        await c.close()


@pytest.mark.timeout(20)
async def test_expect_100_continue_is_relayed(proxy: Proxy, blue: AppUpstream):
    body = b"continued body"
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(
            b"POST /cont HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await c.response(timeout=5)
        assert interim.status == 100
        await c.send(body)
        r = await c.response()
        assert r.status == 200
        assert r.json()["body"] == body.decode()
        # and the connection goes on
        await c.send(request("GET", "/next"))
        assert (await c.response()).json()["path"] == "/next"
    finally:
        await c.close()


# ------------------------------------------------------------------- streaming


@pytest.mark.timeout(20)
async def test_chunked_response_is_streamed_not_buffered(
    proxy: Proxy, blue: AppUpstream, session: aiohttp.ClientSession
):
    arrivals: list[float] = []
    buf = b""
    async with session.get(proxy.url + "/chunks?n=5&delay=0.2") as r:
        assert r.status == 200
        assert r.headers["X-Turnout-Version"] == "blue"
        async for data in r.content.iter_any():
            buf += data
            now = time.monotonic()
            arrivals += [now] * (buf.count(b"\n") - len(arrivals))
    lines = buf.decode().splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 1, 2, 3, 4]
    sent = blue.chunk_sent
    assert len(arrivals) == 5 and len(sent) == 5
    # The first piece is with the client long before the last one is even sent.
    assert arrivals[0] < sent[-1] - 0.5, (arrivals, sent)
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals  # spread out, as they were sent


async def _upload_body(total: int, block: int = MiB):
    data = b"u" * block
    sent = 0
    while sent < total:
        n = min(block, total - sent)
        yield data if n == block else data[:n]
        sent += n


@pytest.mark.timeout(60)
async def test_100_mib_upload_streams_with_bounded_memory(
    proxy: Proxy, blue: AppUpstream, session: aiohttp.ClientSession
):
    total = 100 * MiB
    async with (
        RssSampler(proxy.pid) as rss,
        session.post(proxy.url + "/upload", data=_upload_body(total)) as r,
    ):
        assert r.status == 200, await r.text()
        doc = await r.json()
    assert doc == {"received": total}
    assert blue.uploads[0]["complete"]
    assert rss.peak < RSS_LIMIT, f"proxy RSS peaked at {rss.peak / MiB:.1f} MiB"


@pytest.mark.timeout(60)
async def test_100_mib_download_streams_with_bounded_memory(
    proxy: Proxy, blue: AppUpstream, session: aiohttp.ClientSession
):
    total = 100 * MiB
    got = 0
    async with (
        RssSampler(proxy.pid) as rss,
        session.get(proxy.url + f"/download?size={total}") as r,
    ):
        assert r.status == 200, await r.text()
        assert int(r.headers["Content-Length"]) == total
        async for data in r.content.iter_chunked(MiB):
            got += len(data)
    assert got == total
    assert rss.peak < RSS_LIMIT, f"proxy RSS peaked at {rss.peak / MiB:.1f} MiB"


@pytest.mark.timeout(60)
async def test_slow_reader_download_keeps_memory_bounded(proxy: Proxy, blue: AppUpstream):
    total = 50 * MiB
    c = await RawClient.connect(proxy.port)
    try:
        async with RssSampler(proxy.pid) as rss:
            await c.send(request("GET", f"/download?size={total}"))
            head = await c.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            got = 0
            deadline = time.monotonic() + 40
            while got < total and time.monotonic() < deadline:
                data = await asyncio.wait_for(c.reader.read(256 * 1024), 10)
                assert data, "connection closed early"
                got += len(data)
                await asyncio.sleep(0.004)  # a reader far slower than the upstream
        assert got == total
    finally:
        await c.close()
    baseline = rss.samples[0]
    assert rss.peak < RSS_LIMIT, f"proxy RSS peaked at {rss.peak / MiB:.1f} MiB"
    assert rss.peak - baseline < 32 * MiB, (
        f"proxy RSS grew by {(rss.peak - baseline) / MiB:.1f} MiB for a slow reader"
    )


@pytest.mark.timeout(30)
async def test_response_head_arriving_with_much_body_in_one_read(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    """A response head that lands in the same socket read as >64 KiB of body is a
    normal response, not an oversized head. The proxy is paused (SIGSTOP) while the
    upstream writes, so its first read of the answer is certain to hold both."""
    body = bytes(range(256)) * 4096  # 1 MiB
    got_request = asyncio.Event()
    may_answer = asyncio.Event()

    async def big_answer(up: RawUpstream, reader, writer) -> None:
        await up.read_head(reader)
        got_request.set()
        await may_answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await asyncio.sleep(5)

    up = await upstreams.raw("blue", big_answer)
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/big"))
        await asyncio.wait_for(got_request.wait(), 5)
        proxy.signal(signal.SIGSTOP)
        try:
            may_answer.set()
            await asyncio.sleep(0.3)  # the answer fills the proxy's receive buffer
        finally:
            proxy.signal(signal.SIGCONT)
        r = await c.response(timeout=10)
    finally:
        await c.close()
    assert r.status == 200, r.body[:200]
    assert r.body == body


async def _endless_head(up: RawUpstream, reader, writer) -> None:
    """A response head that never ends: header lines, 8 KiB at a time (2 MiB at most)."""
    await up.read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    for _ in range(256):
        writer.write(line * 8)
        await writer.drain()
        await asyncio.sleep(0.002)
    await asyncio.sleep(5)


@pytest.mark.timeout(20)
async def test_endless_upstream_response_head_is_502(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    """The proxy does not buffer an upstream response head without bound."""
    up = await upstreams.raw("blue", _endless_head)
    proxy = await proxies.start(versions_config(up.url, green.url))
    async with session.get(proxy.url + "/") as r:
        assert r.status == 502
        doc = await r.json()
    assert doc["version"] == "blue"
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="protocol") == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_close_delimited_upstream_body_is_relayed_whole(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, version: str
):
    """A response without Content-Length or chunking ends when the upstream closes;
    relayed to an HTTP/1.1 client it must end cleanly (not be cut off as an error)."""
    body = b"close-delimited body " * 100
    raw = b"HTTP/%s 200 OK\r\nContent-Type: text/plain\r\n\r\n%s" % (version.encode(), body)
    up = await upstreams.raw("blue", answer_then_close(raw))
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/"))
        r = await c.response()
        assert r.status == 200
        assert r.body == body
    finally:
        await c.close()
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="200") == 1
    assert m.get("turnout_upstream_errors_total") == 0


@pytest.mark.timeout(20)
async def test_upstream_response_with_length_and_chunked_is_not_relayed_ambiguously(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    up = await upstreams.raw("blue", answer_then_close(raw))
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/"))
        r = await c.response()
    finally:
        await c.close()
    if r.status == 200:  # relayed: the client must see one unambiguous framing
        assert not (r.header("Content-Length") and r.header("Transfer-Encoding")), r.headers
        assert r.body == b"hello"
    else:  # or refused as a malformed upstream response
        assert r.status == 502


# ------------------------------------------------------------------- websocket


@pytest.mark.timeout(20)
async def test_websocket_is_tunnelled_and_routed_at_handshake(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=sticky(50)))
    canary_key, stable_key = key_for(True, 50), key_for(False, 50)
    for key, expected in ((canary_key, "green"), (stable_key, "blue")):
        # The handshake answer carries the version header.
        c = await RawClient.connect(proxy.port)
        try:
            await c.send(request("GET", "/ws", headers=[*WS_HANDSHAKE, ("X-User-Id", key)]))
            r = await c.response()
            assert r.status == 101
            assert r.header("X-Turnout-Version") == expected
            assert (r.header("Upgrade") or "").lower() == "websocket"
        finally:
            await c.close()

        async with session.ws_connect(proxy.url + "/ws", headers={"X-User-Id": key}) as ws:
            for i in range(5):
                await ws.send_str(f"msg-{i}")
                assert await asyncio.wait_for(ws.receive_str(), 5) == f"{expected}:msg-{i}"
                await ws.send_bytes(bytes([i, 1, 2, 3]))
                assert await asyncio.wait_for(ws.receive_bytes(), 5) == bytes([3, 2, 1, i])
    assert [s.header("X-User-Id") for s in green.requests] == [canary_key] * 2
    assert [s.header("X-User-Id") for s in blue.requests] == [stable_key] * 2


WS_HANDSHAKE = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


@pytest.mark.timeout(20)
async def test_websocket_client_disconnect_closes_the_upstream_side(
    proxy: Proxy, blue: AppUpstream
):
    """A client that goes away (FIN) must not leave the tunnel open to the upstream."""
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/ws", headers=WS_HANDSHAKE))
        r = await c.response()
        assert r.status == 101
        await eventually(lambda: len(blue.sockets) == 1, timeout=5)
    finally:
        await c.close()
    await eventually(lambda: blue.ws_closed == 1, timeout=5)
    assert not blue.sockets


@pytest.mark.timeout(20)
async def test_websocket_closed_by_the_upstream_reaches_the_client(
    proxy: Proxy, blue: AppUpstream, session: aiohttp.ClientSession
):
    async with session.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("hi")
        assert await asyncio.wait_for(ws.receive_str(), 5) == "blue:hi"
        await ws.send_str("bye")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4000 or msg.data == 4000
    await eventually(lambda: blue.ws_closed == 1, timeout=5)


# --------------------------------------------------------------------- failures


@pytest.mark.timeout(20)
async def test_refused_endpoint_gives_502_json(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    proxy = await proxies.start(versions_config(upstreams.dead_url(), green.url))
    async with session.get(proxy.url + "/x") as r:
        assert r.status == 502
        doc = await r.json()
    assert doc["version"] == "blue"
    assert "connect" in doc["cause"].lower()
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="connect") == 1
    assert m.get("turnout_requests_total", version="blue", code="502") == 1
    assert green.requests == []
    status = await proxy.status()
    assert status["versions"]["blue"]["requests"] == 1
    assert status["versions"]["blue"]["errors"] == 1


async def _silent(up: RawUpstream, reader, writer) -> None:
    await up.read_head(reader)
    await asyncio.sleep(30)


async def _close_after_request(up: RawUpstream, reader, writer) -> None:
    await up.read_head(reader)
    writer.close()


@pytest.mark.timeout(20)
async def test_upstream_that_never_answers_gives_504(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    silent = await upstreams.raw("blue", _silent)
    cfg = versions_config(silent.url, green.url, limits={"response_timeout": "1s"})
    proxy = await proxies.start(cfg)
    t0 = time.monotonic()
    async with session.get(proxy.url + "/wait") as r:
        elapsed = time.monotonic() - t0
        assert r.status == 504
        doc = await r.json()
    assert 0.9 <= elapsed <= 3.0, elapsed
    assert doc["version"] == "blue"
    assert "timeout" in doc["cause"].lower()
    assert len(silent.requests) == 1
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="timeout") == 1
    assert m.get("turnout_requests_total", version="blue", code="504") == 1


@pytest.mark.timeout(20)
async def test_upstream_closing_after_request_gives_502(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    closer = await upstreams.raw("blue", _close_after_request)
    proxy = await proxies.start(versions_config(closer.url, green.url))
    async with session.post(proxy.url + "/x", data=b"payload") as r:
        assert r.status == 502
        doc = await r.json()
    assert doc["version"] == "blue"
    # A failure after the request was sent is never retried.
    assert len(closer.requests) == 1
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="reset") == 1
    assert m.get("turnout_requests_total", version="blue", code="502") == 1


async def _second_request_dies(up: RawUpstream, reader, writer) -> None:
    """Answer the first request (keep-alive); read the second one whole, then close."""
    await up.read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    head = await up.read_head(reader)
    if head is not None and b"content-length: 4" in head.lower():
        await reader.readexactly(4)
    writer.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100, id="length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"a" * 100 + b"\r\n",
            id="chunked",
        ),
    ],
)
async def test_upstream_closing_mid_response_cuts_the_client(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, raw: bytes
):
    """A truncated upstream body must reach the client as a truncation, never as a
    complete response (no clean end of a chunked body)."""
    up = await upstreams.raw("blue", answer_then_close(raw))
    proxy = await proxies.start(versions_config(up.url, green.url))
    c = await RawClient.connect(proxy.port)
    try:
        await c.send(request("GET", "/"))
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await c.response()
    finally:
        await c.close()
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="reset") == 1


@pytest.mark.timeout(20)
async def test_post_on_pooled_connection_that_dies_is_not_retried(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    up = await upstreams.raw("blue", _second_request_dies)
    proxy = await proxies.start(versions_config(up.url, green.url))
    async with session.get(proxy.url + "/first") as r:
        assert r.status == 200
        assert await r.read() == b"ok"
    async with session.post(proxy.url + "/pay", data=b"once") as r:
        assert r.status == 502
        assert (await r.json())["version"] == "blue"
    await asyncio.sleep(0.2)
    assert [s.path for s in up.requests] == ["/first", "/pay"]  # sent once, never again
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="reset") == 1


@pytest.mark.timeout(20)
async def test_dead_endpoint_is_retried_on_the_other_and_skipped(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, green: AppUpstream, session
):
    dead = upstreams.dead_url()
    proxy = await proxies.start(versions_config([dead, blue.url], green.url))
    statuses = []
    for i in range(10):
        async with session.get(proxy.url + f"/r/{i}") as r:
            statuses.append(r.status)
            await r.read()
    assert statuses == [200] * 10
    assert len(blue.requests) == 10

    # The endpoint comes back: once its back-off is over (at most BACKOFF_MAX), the next
    # request probes it and it serves again; no request fails in between.
    revived = await upstreams.app("revived", port=int(dead.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 10
    sent = 10
    while revived.connections == 0 and time.monotonic() < deadline and sent < 2000:
        async with session.get(proxy.url + f"/r/{sent}") as r:
            statuses.append(r.status)
            await r.read()
        sent += 1
    assert revived.connections > 0
    assert statuses == [200] * sent
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", code="502") == 0


@pytest.mark.timeout(20)
async def test_endpoints_of_a_version_take_turns(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    one, two = await upstreams.app("one"), await upstreams.app("two")
    proxy = await proxies.start(versions_config([one.url, two.url], green.url))
    for i in range(20):  # one at a time: a pooled connection is always at hand after the first
        async with session.get(proxy.url + f"/r/{i}") as r:
            assert r.status == 200
            await r.read()
    assert (len(one.requests), len(two.requests)) == (10, 10)


@pytest.mark.timeout(20)
async def test_all_endpoints_dead_gives_502(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    proxy = await proxies.start(versions_config(upstreams.dead_urls(2), green.url))
    for _ in range(3):
        async with session.get(proxy.url + "/") as r:
            assert r.status == 502
            assert (await r.json())["version"] == "blue"
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="blue", code="502") == 3
    # The first request dialled both endpoints; while they back off, the next ones are
    # refused without a dial, and counted apart.
    dialled = m.get("turnout_upstream_errors_total", version="blue", kind="connect")
    undialled = m.get("turnout_upstream_errors_total", version="blue", kind="unavailable")
    assert dialled >= 1 and dialled + undialled == 3


async def test_a_proxy_made_error_to_head_has_no_body(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream
):
    """An answer to HEAD never carries content (RFC 9110 §9.3.2), the proxy's own
    errors included: the client gets the head, then the close, and nothing else."""
    proxy = await proxies.start(versions_config(upstreams.dead_urls(1), green.url))
    c = await RawClient.connect(proxy.port)
    await c.send(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n")
    got = await asyncio.wait_for(c.reader.read(), 10)  # everything up to the close
    head, sep, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and sep and rest == b""
    assert b"\r\nContent-Type: application/json\r\n" in head + b"\r\n"
    await c.close()


async def test_a_pipelined_head_rejected_after_an_answer_in_flight_gets_no_body(
    proxy: Proxy, blue: AppUpstream
):
    """The HEAD's broken chunked body is found while the GET before it is still at the
    upstream; its 400 is sent later, and still has no body."""
    c = await RawClient.connect(proxy.port)
    await c.send(
        b"GET /slow?delay=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"HEAD /h HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    first = await c.response()
    assert first.status == 200
    got = await asyncio.wait_for(c.reader.read(), 10)  # the rest, up to the close
    head, sep, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and sep and rest == b""
    await c.close()
    assert not any(r.path == "/h" for r in blue.requests)


# ------------------------------------------------------------------------ curl


@pytest.mark.timeout(20)
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_through_the_proxy(proxy: Proxy, blue: AppUpstream):
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-D", "-", "--max-time", "10", proxy.url + "/via-curl",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "X-Turnout-Version: blue" in head
    assert json.loads(body)["path"] == "/via-curl"
    assert (
        blue.requests[-1]
        .header(
            "User-Agent",
        )
        .startswith("curl/")
    )


# ------------------------------------------------------------------------ drain


@pytest.mark.timeout(30)
async def test_sigterm_drains_in_flight_then_exits_0(
    proxy: Proxy, blue: AppUpstream, session: aiohttp.ClientSession
):
    async def slow() -> tuple[int, dict]:
        async with session.get(proxy.url + "/slow?delay=1.5") as r:
            return r.status, await r.json()

    task = asyncio.create_task(slow())
    await eventually(lambda: bool(blue.requests), timeout=5)
    proxy.signal(signal.SIGTERM)

    async def refused() -> bool:
        try:
            c = await RawClient.connect(proxy.port)
        except (ConnectionRefusedError, OSError):
            return True
        await c.close()
        return False

    await eventually(refused, timeout=2)
    status, doc = await asyncio.wait_for(task, 10)
    assert status == 200
    assert doc["path"] == "/slow?delay=1.5"
    assert await proxy.wait(10) == 0


@pytest.mark.timeout(30)
async def test_drain_timeout_bounds_the_wait_for_in_flight_requests(
    proxies: ProxyFactory, upstreams: Upstreams, green: AppUpstream, session
):
    silent = await upstreams.raw("blue", _silent)
    cfg = versions_config(silent.url, green.url, limits={"drain_timeout": "1s"})
    proxy = await proxies.start(cfg)

    async def never_answered() -> int:
        async with session.get(proxy.url + "/forever") as r:
            await r.read()
            return r.status

    task = asyncio.create_task(never_answered())
    await eventually(lambda: bool(silent.requests), timeout=5)
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code = await proxy.wait(6)
    elapsed = time.monotonic() - t0
    assert code == 0
    assert 0.9 <= elapsed <= 3.0, f"exited {elapsed:.2f}s after SIGTERM with drain_timeout 1s"
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, 5)  # the unfinished exchange was cut


@pytest.mark.timeout(20)
async def test_sigint_stops_like_sigterm(proxy: Proxy, session):
    async with session.get(proxy.url + "/") as r:
        assert r.status == 200
    proxy.signal(signal.SIGINT)
    assert await proxy.wait(5) == 0
