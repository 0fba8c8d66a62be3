"""HTTP/2 on the listener (PRODUCT.md §14), over loopback: h2c prior knowledge and ALPN
`h2` over TLS, with the `h2` library's client (frame by frame) and curl. Every stream
is an exchange: routed, counted, framed towards an HTTP/1.1 upstream exactly, and a
malformed one never reaches it. Flow control per stream, trailers, resets, the rapid
reset rule, and GOAWAY then drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess

import pytest
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame

from .conftest import RawUpstream, eventually, versions_config
from .h2client import H2Client
from .support import Authority

pytestmark = pytest.mark.live

SHOP = "shop.example"
OPEN: list[H2Client] = []


@pytest.fixture(autouse=True)
async def closing():
    yield
    while OPEN:
        await OPEN.pop().close()


async def client(proxy, ctx=None, validate: bool = True) -> H2Client:
    c = await H2Client.connect(proxy.port, ctx, validate)
    OPEN.append(c)
    return c


def h2c_config(blue, green, **extra) -> dict:
    return versions_config(blue.url, green.url, http2={"cleartext": True}, **extra)


async def test_streams_are_exchanges_routed_counted_and_logged(proxies, blue, green, tmp_path):
    log = tmp_path / "access.log"
    routing = {"weight": 50, "sticky": {"key": "header:x-user-id"}}
    proxy = await proxies.start(
        h2c_config(blue, green, routing=routing, access_log={"path": str(log)})
    )
    c = await client(proxy)
    first = await c.get("/a?x=1", headers=[("x-user-id", "u-1")])
    assert first.status == 200 and first.ended
    served = first.header("x-turnout-version")
    assert served in ("blue", "green")
    up = blue if served == "blue" else green
    seen = up.requests[0]
    assert seen.path == "/a?x=1"
    assert seen.header("Host") == SHOP  # :authority is the Host
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("Transfer-Encoding") is None and seen.header("Content-Length") is None
    # Sticky: the same user on twenty streams at once, all answered by the same version.
    sids = [c.request(f"/m{i}", headers=[("x-user-id", "u-1")]) for i in range(20)]
    for sid in sids:
        answer = await c.answer(sid)
        assert answer.status == 200 and answer.header("x-turnout-version") == served
    assert len(up.requests) == 21
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version=served, code="200") == 21
    lines = await eventually(lambda: len(log.read_text().splitlines()) >= 21 and log.read_text())
    assert '"path": "/m19"' in lines or '"path":"/m19"' in lines


async def test_curl_speaks_h2c_with_prior_knowledge(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    url = f"http://127.0.0.1:{proxy.port}/curl"
    out = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.stdout == "2 200", out
    # A POST with a body, without and with Content-Length.
    out = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-s", "--http2-prior-knowledge", "--data-binary", "hello", url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert '"body": "hello"' in out.stdout
    assert blue.requests[-1].header("Content-Length") == "5"


async def test_prior_knowledge_is_refused_unless_configured(proxies, blue, green):
    proxy = await proxies.start(versions_config(blue.url, green.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    assert data.startswith(b"HTTP/1.1 505"), data
    writer.close()
    assert blue.requests == []


async def test_alpn_h2_over_tls_and_http11_beside_it(proxies, blue, green, tmp_path):
    authority = Authority(tmp_path)
    authority.issue("shop", SHOP)
    tls = {"certificates": [{"cert": "shop.pem", "key": "shop.key"}], "alpn": ["h2", "http/1.1"]}
    proxy = await proxies.start(versions_config(blue.url, green.url, tls=tls))
    ctx = authority.trust()
    ctx.set_alpn_protocols(["h2"])
    c = await client(proxy, ctx)
    answer = await c.get("/tls")
    assert answer.status == 200
    assert blue.requests[-1].header("X-Forwarded-Proto") == "https"
    # curl negotiates h2 by ALPN; an HTTP/1.1-only client on the same listener still works.
    ca = str(authority.ca_file())
    url = f"https://{SHOP}:{proxy.port}/curl"
    resolve = f"{SHOP}:{proxy.port}:127.0.0.1"
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        out = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-s", flag, "--cacert", ca, "--resolve", resolve, "-o", "/dev/null",
             "-w", "%{http_version} %{http_code}", url],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.stdout == f"{version} 200", out
    assert (await proxy.status())["tls"]["alpn"] == ["h2", "http/1.1"]


def recording(answer: bytes):
    """A RawUpstream handler that records each request's head and whole body bytes."""

    async def handler(up: RawUpstream, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            low = head.lower()
            body = b""
            if b"content-length:" in low:
                n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(n)
            elif b"transfer-encoding: chunked" in low:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    body += line
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        body += await reader.readuntil(b"\r\n")
                        break
                    body += await reader.readexactly(size + 2)
            up.requests[-1].body = body
            writer.write(answer)
            await writer.drain()

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_request_bodies_are_framed_exactly_towards_the_upstream(proxies, upstreams, green):
    blue = await upstreams.raw("blue", recording(OK))
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    # With content-length: relayed as it is.
    sid = c.request("/sized", "POST", headers=[("content-length", "5")], end=False)
    c.send(sid, b"he")
    c.send(sid, b"llo", end=True)
    assert (await c.answer(sid)).status == 200
    assert blue.requests[-1].header("Content-Length") == "5" and blue.requests[-1].body == b"hello"
    # Without: chunked, one chunk per DATA frame, ended whole.
    sid = c.request("/streamed", "POST", end=False)
    await c.upload(sid, b"a" * 70_000)
    assert (await c.answer(sid)).status == 200
    seen = blue.requests[-1]
    assert seen.header("Transfer-Encoding") == "chunked" and seen.header("Content-Length") is None
    assert seen.body.endswith(b"0\r\n\r\n")
    chunks, rest = [], seen.body
    while (size := int(rest.split(b"\r\n", 1)[0], 16)) != 0:
        head_end = rest.index(b"\r\n") + 2
        chunks.append(rest[head_end : head_end + size])
        rest = rest[head_end + size + 2 :]
    assert b"".join(chunks) == b"a" * 70_000
    # Longer than its content-length: the stream is reset and the upstream connection
    # closed; nothing past the declared length is ever written to it.
    count = len(blue.requests)
    sid = c.request("/long", "POST", headers=[("content-length", "3")], end=False)
    c.send(sid, b"abcdef", end=True)
    await c.until(lambda: c.answers[sid].reset is not None or c.closed.is_set())
    await asyncio.sleep(0.2)
    assert all(r.path != "/long" or r.body in (b"", b"abc") for r in blue.requests[count:])


async def test_malformed_streams_are_reset_and_never_reach_the_upstream(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green, limits={"max_header_bytes": 4096}))
    c = await client(proxy, validate=False)
    bad = [
        ("/a b", []),  # a space would split the request line upstream
        ("/a", [("x-bad", "one\x0btwo")]),  # a control character in a value
        ("/a", [("x\x01y", "v")]),  # a name that is not a token
        ("/a", [(":protocol", "websocket")]),  # extended CONNECT is not served
        ("/a", [("connection", "keep-alive")]),  # connection-specific
        ("/a", [("content-length", "1,1")]),
    ]
    for path, extra in bad:
        if c.closed.is_set():
            c = await client(proxy, validate=False)
        sid = c.request(path, headers=extra)
        await c.until(lambda c=c, sid=sid: c.answers[sid].over or c.closed.is_set())
        assert c.answers[sid].status == 0, (path, extra)  # no answer head: a reset
    # Each was refused on its own stream or ended the connection: none was forwarded.
    assert blue.requests == [] and green.requests == []
    c2 = await client(proxy)
    big = await c2.get("/big", headers=[("x-big", "v" * 5000)])
    assert big.status == 431 and blue.requests == []
    c3 = await client(proxy, validate=False)
    sid = c3.request("/h", headers=[("host", "other.example")])  # differs from :authority
    await c3.until(lambda: c3.answers[sid].over or c3.closed.is_set())
    assert c3.answers[sid].status in (0, 400) and blue.requests == []
    ok = await c2.get("/fine")  # the connection still serves
    assert ok.status == 200 and [r.path for r in blue.requests] == ["/fine"]


async def test_a_slow_stream_holds_back_only_itself(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    c.read_window = False  # acknowledge nothing: the download stalls at the client's window
    slow = c.request("/download?size=4000000")
    await c.until(lambda: len(c.answers[slow].body) >= 65_535)
    fast = c.request("/fast")  # the connection window is spent too, so the fast one waits
    await asyncio.sleep(0.1)
    assert len(c.answers[slow].body) == 65_535
    c.read_window = True
    c.conn.acknowledge_received_data(65_535, slow)
    c.flush()
    assert (await c.answer(fast)).status == 200
    done = await c.answer(slow)
    assert done.ended and len(done.body) == 4_000_000


async def test_trailers_are_relayed(proxies, upstreams, green):
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nConnection: close\r\nx-sum: 42\r\n\r\n"
    )
    blue = await upstreams.raw("blue", recording(answer))
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    got = await c.get("/t")
    assert got.status == 200 and bytes(got.body) == b"hello"
    assert got.trailers == [("grpc-status", "0"), ("x-sum", "42")]
    assert blue.requests[0].header("TE") == "trailers"


async def test_a_reset_stream_cancels_its_exchange(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    sid = c.request("/slow?delay=5")
    await eventually(lambda: len(blue.requests) == 1)
    c.conn.reset_stream(sid, ErrorCodes.CANCEL)
    c.flush()
    counted = await eventually(_metric(proxy, "turnout_requests_total", version="blue", code="499"))
    assert counted == 1
    assert (await c.get("/after")).status == 200


def _metric(proxy, name: str, **labels: str):
    async def probe():
        value = (await proxy.metrics()).get(name, **labels)
        return value or None

    return probe


async def test_rapid_reset_ends_the_connection(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    for _ in range(300):
        sid = c.request("/slow?delay=5")
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
    c.flush()
    await c.until(lambda: c.goaway is not None, timeout=20)
    assert c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_sigterm_sends_goaway_and_finishes_streams_in_flight(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green, limits={"drain_timeout": "10s"}))
    c = await client(proxy)
    assert (await c.get("/warm")).status == 200
    sid = c.request("/slow?delay=1.5")
    await eventually(lambda: any(r.path.startswith("/slow") for r in blue.requests))
    proxy.signal(signal.SIGTERM)
    await c.until(lambda: c.goaway is not None)
    # GOAWAY came first, while the stream was in flight, naming it as served.
    assert c.goaway.error_code == ErrorCodes.NO_ERROR
    assert c.goaway.last_stream_id == sid and sid in c.goaway_while_open
    # A client that opened a stream as the GOAWAY was on its way (h2 itself would not
    # send once it has read a GOAWAY: it is put back in its open state for this).
    c.conn.state_machine.state = ConnectionState.CLIENT_OPEN
    late = c.request("/late")  # opened after the GOAWAY: refused, never forwarded
    answer = await c.answer(sid)
    assert answer.status == 200 and answer.ended
    assert (await c.answer(late)).reset == ErrorCodes.REFUSED_STREAM
    assert await proxy.wait(10) == 0
    assert not any(r.path == "/late" for r in blue.requests)


async def test_bodiless_answers_end_their_streams_and_an_idle_connection_goes_away(
    proxies, blue, green
):
    proxy = await proxies.start(h2c_config(blue, green, limits={"idle_timeout": "1s"}))
    c = await client(proxy)
    head = await c.get("/x", method="HEAD")
    assert head.status == 200 and head.ended and head.body == b""
    assert head.header("content-length") is not None  # what a GET would carry
    for code in (204, 304):
        answer = await c.get(f"/status/{code}")
        assert answer.status == code and answer.ended and answer.body == b""
    # Every stream is over, so the connection is idle: after idle_timeout it is closed
    # with GOAWAY(NO_ERROR), naming the last stream it read.
    await c.until(lambda: c.goaway is not None, timeout=10)
    assert c.goaway.error_code == ErrorCodes.NO_ERROR and c.goaway.last_stream_id == 5
    await asyncio.wait_for(c.closed.wait(), 10)


async def test_empty_data_frames_never_end_a_chunked_body_early(proxies, upstreams, green):
    blue = await upstreams.raw("blue", recording(OK))
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    sid = c.request("/up", "POST", end=False)
    c.send(sid, b"")
    c.send(sid, b"abc")
    c.send(sid, b"")
    c.send(sid, b"", end=True)  # how many clients end an upload
    assert (await c.answer(sid)).status == 200
    assert blue.requests[-1].body == b"3\r\nabc\r\n0\r\n\r\n"
    # The upstream connection is in step: the next request gets its own answer.
    assert (await c.get("/next")).status == 200
    assert [r.path for r in blue.requests] == ["/up", "/next"]
    assert len(blue.heads) == 2


async def test_a_window_kept_shut_gives_the_stream_up(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green, limits={"send_timeout": "1s"}))
    c = await client(proxy)
    c.read_window = False  # reads its socket, never reopens the window
    sid = c.request("/download?size=4000000")
    answer = await c.answer(sid, timeout=15)
    assert answer.reset == ErrorCodes.CANCEL and len(answer.body) == 65_535
    cancelled = _metric(proxy, "turnout_requests_total", version="blue", code="499")
    assert await eventually(cancelled) == 1
    in_flight = await proxy.metrics()
    assert in_flight.get("turnout_in_flight_requests", version="blue") == 0


async def test_refusals_count_towards_the_rapid_reset_rule(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy, validate=False)
    for _ in range(30):  # in batches, within the proxy's 100 concurrent streams
        refused = []
        for _ in range(10):
            refused.append(c.request("noslash"))  # refused at once: 400, no upstream
            sid = c.request("/slow?delay=5")
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        await c.until(lambda r=refused: c.goaway is not None or all(c.answers[s].over for s in r))
        if c.goaway is not None:
            break
    await c.until(lambda: c.goaway is not None, timeout=20)
    assert c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_a_head_in_endless_continuation_frames_ends_the_connection(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green, limits={"max_header_bytes": 4096}))
    c = await client(proxy)
    assert (await c.get("/warm")).status == 200  # SETTINGS exchanged (an ACK would cut in)
    head = HeadersFrame(3)  # no END_HEADERS: CONTINUATION frames follow
    head.data = Encoder().encode([(b":method", b"GET"), (b":path", b"/")])
    frames = [head.serialize()]
    for _ in range(3):
        more = ContinuationFrame(3)
        more.data = b"\x00" * 4000
        frames.append(more.serialize())
    c.writer.write(b"".join(frames))
    await c.until(lambda: c.goaway is not None, timeout=10)
    assert c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert [r.path for r in blue.requests] == ["/warm"]


async def test_a_method_that_begins_with_pri_is_still_http11(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PRIVATE /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    # Forwarded as the HTTP/1.1 request it is (aiohttp itself refuses the method).
    assert data.startswith(b"HTTP/1.1 ") and b"X-Turnout-Version: blue" in data, data


async def test_an_upstream_that_stops_reading_holds_back_only_its_stream(proxies, upstreams, green):
    async def handler(up: RawUpstream, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            if head.startswith(b"POST /stuck"):
                await asyncio.sleep(30)  # never reads the body
                return
            writer.write(OK)
            await writer.drain()

    blue = await upstreams.raw("blue", handler)
    proxy = await proxies.start(h2c_config(blue, green))
    c = await client(proxy)
    stuck = c.request("/stuck", "POST", end=False)
    upload = asyncio.ensure_future(c.upload(stuck, b"x" * 16_000_000, timeout=30))
    try:
        # The proxy stops reopening the stream's window once the upstream's socket is full.
        async def stalled() -> bool:
            before = c.conn.local_flow_control_window(stuck)
            await asyncio.sleep(0.5)
            return before == 0 == c.conn.local_flow_control_window(stuck)

        await eventually(stalled, timeout=20)
        assert not upload.done()
        fast = await c.get("/fast")  # the same connection, another stream: served
        assert fast.status == 200 and bytes(fast.body) == b"ok"
        assert not upload.done() and c.answers[stuck].status == 0
    finally:
        upload.cancel()


async def test_bodies_over_max_body_bytes_are_413_on_their_stream(proxies, blue, green):
    proxy = await proxies.start(h2c_config(blue, green, limits={"max_body_bytes": 1000}))
    c = await client(proxy)
    sized = c.request("/sized", "POST", headers=[("content-length", "5000")], end=False)
    with contextlib.suppress(StreamClosedError):  # answered, then reset: the rest not wanted
        await c.upload(sized, b"y" * 5000)
    assert (await c.answer(sized)).status == 413
    streamed = c.request("/streamed", "POST", end=False)
    with contextlib.suppress(StreamClosedError):
        await c.upload(streamed, b"z" * 2000)
    assert (await c.answer(streamed)).status == 413
    assert (await c.get("/fine")).status == 200  # the connection serves on
    assert [r.path for r in blue.requests] == ["/fine"]  # neither reached the upstream
