"""HTTP/2 upstreams (h2c://), frame by frame, with HTTP/1.1 clients in raw bytes: one
multiplexed connection per endpoint, empty DATA frames that must not end a chunked
body early, trailers, request bodies framed exactly, a refused stream sent again."""

from __future__ import annotations

import asyncio

import pytest
from h2.errors import ErrorCodes

from .conftest import RawClient, versions_config
from .h2server import H2Upstream, Received, Session

pytestmark = pytest.mark.live


async def pieces(up: H2Upstream, session: Session, sid: int, got: Received) -> None:
    """An answer in pieces, with empty DATA frames between them and at the end (as many
    servers end a stream), and trailers when the path asks for them."""
    conn = session.conn
    conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
    for piece in (b"hel", b"", b"lo"):
        conn.send_data(sid, piece)
        session.flush()
        await asyncio.sleep(0)
    if got.headers[":path"] == "/trailers":
        conn.send_headers(sid, [("grpc-status", "0"), ("x-sum", "42")], end_stream=True)
    else:
        conn.send_data(sid, b"", end_stream=True)
    session.flush()


@pytest.fixture
async def h2up():
    started: list[H2Upstream] = []

    async def make(plan) -> H2Upstream:
        up = await H2Upstream(plan).start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


async def test_http11_clients_through_one_multiplexed_connection(proxies, h2up, green):
    blue = await h2up(pieces)
    proxy = await proxies.start(versions_config(blue.url, green.url))
    clients = [await RawClient.connect(proxy.port) for _ in range(3)]
    for round_ in range(2):  # keep-alive: each connection stays in step with its answers
        for i, c in enumerate(clients):
            await c.send(f"GET /p{round_}{i} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode())
        for c in clients:
            answer = await c.response()
            assert answer.status == 200 and answer.body == b"hello"
            assert answer.header("Transfer-Encoding") == "chunked"
            assert answer.header("X-Turnout-Version") == "blue"
    assert blue.connections == 1  # six exchanges, one HTTP/2 connection
    first = blue.requests[0].headers
    assert first[":authority"] == "shop.example" and first[":scheme"] == "http"
    assert first[":method"] == "GET" and first["x-forwarded-proto"] == "http"
    assert "host" not in first and "connection" not in first
    # Trailers reach a client that takes them, after the whole body.
    c = clients[0]
    await c.send(b"GET /trailers HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
    head = await c.reader.readuntil(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    body = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
    while not body.endswith(b"0\r\ngrpc-status: 0\r\nx-sum: 42\r\n\r\n"):
        body += await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
    assert body == b"3\r\nhel\r\n2\r\nlo\r\n0\r\ngrpc-status: 0\r\nx-sum: 42\r\n\r\n"
    for c in clients:
        await c.close()


async def echo_body(up: H2Upstream, session: Session, sid: int, got: Received) -> None:
    conn = session.conn
    body = b"%d:" % len(got.body) + bytes(got.body[:20])
    conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
    conn.send_data(sid, body, end_stream=True)
    session.flush()


async def test_request_bodies_reach_an_h2_upstream_exactly(proxies, h2up, green):
    blue = await h2up(echo_body)
    proxy = await proxies.start(versions_config(blue.url, green.url))
    c = await RawClient.connect(proxy.port)
    await c.send(b"POST /sized HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert (await c.response("POST")).body == b"5:hello"
    chunked = b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    await c.send(
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    assert (await c.response("POST")).body == b"7:abcdefg"
    big = bytes(range(256)) * 4096  # 1 MiB: past the stream's first window
    await c.send(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    assert (await c.response("POST")).body == b"%d:" % len(big) + big[:20]
    assert [bytes(r.body) for r in blue.requests[:2]] == [b"hello", b"abcdefg"]
    assert bytes(blue.requests[2].body) == big
    assert "content-length" in blue.requests[0].headers
    assert "transfer-encoding" not in blue.requests[1].headers
    await c.close()


async def test_a_refused_stream_is_sent_again(proxies, h2up, green):
    async def refuse_the_second(up: H2Upstream, session: Session, sid: int, got: Received):
        if len(up.requests) == 2:
            session.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            session.flush()
            return
        await echo_body(up, session, sid, got)

    blue = await h2up(refuse_the_second)
    proxy = await proxies.start(versions_config(blue.url, green.url))
    c = await RawClient.connect(proxy.port)
    for path in ("/one", "/two"):
        await c.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert (await c.response()).status == 200
    # /two was refused on the connection in use, never processed: sent again, once.
    assert [r.headers[":path"] for r in blue.requests] == ["/one", "/two", "/two"]
    await c.close()


def hostile(head: list[tuple[str, str]], body: bytes):
    async def plan(up: H2Upstream, session: Session, sid: int, got: Received) -> None:
        session.conn.send_headers(sid, head)
        session.conn.send_data(sid, body, end_stream=True)
        session.flush()

    return plan


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!"


@pytest.mark.parametrize(
    ("case", "head", "body"),
    [
        (
            "DATA past content-length",
            [(":status", "200"), ("content-length", "2")],
            b"ok" + SMUGGLED,
        ),
        ("CRLF in a value", [(":status", "200"), ("x-a", "1\r\nContent-Length: 0")], SMUGGLED),
        ("a status that is not one", [(":status", "2OO")], SMUGGLED),
        ("transfer-encoding", [(":status", "200"), ("transfer-encoding", "chunked")], SMUGGLED),
        ("an upper-case name", [(":status", "200"), ("Content-Length", "2")], b"ok" + SMUGGLED),
    ],
)
async def test_a_hostile_h2_upstream_never_gets_bytes_past_the_framing(
    proxies, h2up, green, case, head, body
):
    blue = await h2up(hostile(head, body))
    proxy = await proxies.start(versions_config(blue.url, green.url))
    c = await RawClient.connect(proxy.port)
    await c.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    data = await asyncio.wait_for(c.reader.read(-1), 10)  # the proxy closes after the 502
    await c.close()
    # One well-framed error answer for the first request, and nothing of the upstream's.
    assert data.startswith(b"HTTP/1.1 502 "), (case, data)
    assert b"forged!" not in data and data.count(b"HTTP/1.1 ") == 1, (case, data)
    assert b'"cause": "upstream HTTP/2 error: ' in data or b"malformed upstream" in data, data
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="protocol") == 1
