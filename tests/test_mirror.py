"""Mirror (shadow traffic) over real loopback sockets (PRODUCT.md §5, docs/mirror.md).

Blue is stable, green the canary at weight 0; every test reads what the
upstreams actually received (conftest's AppUpstream / RawUpstream record each
request with its headers and body) and what the proxy counted (/status.mirror,
/metrics, /events). Copies leave asynchronously, so a test that asserts that
something was *not* copied also checks the `sent` counter, which the proxy
bumps before the primary's response can reach the client.

Everything listens on 127.0.0.1; every wait is bounded (conftest.eventually,
RawClient timeouts, tests.support.Load's hard request count).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.routing import bucket

from .conftest import (
    AppUpstream,
    Proxy,
    ProxyFactory,
    RawClient,
    RawUpstream,
    Response,
    Upstreams,
    eventually,
    request,
    versions_config,
)
from .live import admin, background_load, run_cli, state_doc, status_line, wait_latched
from .support import FaultyUpstream

pytestmark = pytest.mark.live

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade"}  # fmt: skip
PROMPT = 0.5  # seconds: a primary answer slower than this waited for something


# --------------------------------------------------------------------------- helpers


def mirror_config(blue: str, green: str, mirror: dict[str, Any], **extra: Any) -> dict:
    """Blue stable, green canary at weight 0 (sticky on X-User-Id), `mirror` section,
    and a rule that sends `X-Canary: always` to the canary."""
    cfg = versions_config(
        blue,
        green,
        routing={
            "weight": 0,
            "sticky": {"key": "header:X-User-Id"},
            "rules": [{"name": "qa", "match": {"header": {"X-Canary": "always"}}, "to": "canary"}],
        },
        mirror=mirror,
    )
    cfg.update(extra)
    return cfg


async def fetch(
    proxy: Proxy,
    method: str = "GET",
    path: str = "/",
    headers: list[tuple[str, str]] = (),
    body: bytes = b"",
    raw: bytes | None = None,
) -> tuple[Response, float]:
    """One request on a fresh client connection (closed after); (response, seconds)."""
    client = await RawClient.connect(proxy.port)
    try:
        t0 = time.monotonic()
        await client.send(
            raw if raw is not None else request(method, path, "shop.test", headers, body)
        )
        resp = await client.response(method, timeout=10)
        return resp, time.monotonic() - t0
    finally:
        await client.close()


def chunked_request(path: str, pieces: list[bytes], headers: list[tuple[str, str]] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: shop.test", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers]
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def mirror_status(proxy: Proxy) -> dict:
    doc = (await proxy.status())["mirror"]
    assert doc is not None
    return doc


async def settled(proxy: Proxy, timeout: float = 10.0) -> dict:
    """/status.mirror once no copy is in flight."""

    async def probe():
        doc = await mirror_status(proxy)
        return doc if doc["in_flight"] == 0 else None

    return await eventually(probe, timeout)


async def counted(proxy: Proxy, key: str, at_least: int, timeout: float = 10.0) -> dict:
    async def probe():
        doc = await mirror_status(proxy)
        return doc if doc[key] >= at_least else None

    return await eventually(probe, timeout)


def shadows(up) -> list:
    return [r for r in up.requests if r.header("X-Turnout-Shadow") is not None]


def without(headers: list[tuple[str, str]], *names: str) -> Counter:
    drop = {n.lower() for n in names}
    return Counter((k.lower(), v) for k, v in headers if k.lower() not in drop)


class Gauge:
    """Requests an upstream is working on right now, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


async def slow_canary(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream, delay: float, mirror: dict
) -> tuple[Proxy, RawUpstream, Gauge, list[float]]:
    """A proxy mirroring to a green that answers each copy after `delay` s (below)."""
    gauge, abandoned = Gauge(), []
    green = await upstreams.raw("green", slow_handler(delay, gauge, abandoned))
    proxy = await proxies.start(mirror_config(blue.url, green.url, mirror))
    return proxy, green, gauge, abandoned


def slow_handler(delay: float, gauge: Gauge, abandoned: list[float]):
    """A keep-alive RawUpstream handler that answers each request after `delay` s.

    While it waits it watches the connection: if the proxy closes it (a shadow
    timeout), the handler records the moment in `abandoned` and stops.
    """

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer) -> None:
        for _ in range(1000):
            head = await up.read_head(reader)
            if head is None:
                return
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    up.requests[-1].body = await reader.readexactly(int(line.split(b":")[1]))
            gauge.enter()
            try:
                try:
                    await asyncio.wait_for(reader.read(1), delay)
                    abandoned.append(time.monotonic())  # EOF: the proxy gave up on it
                    return
                except TimeoutError:
                    pass
            finally:
                gauge.leave()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nslow\n"
            )
            await writer.drain()

    return handler


# ------------------------------------------------------------------------ 1. eligibility


async def test_get_is_copied_with_its_head_and_host(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(mirror_config(blue.url, green.url, {"percent": 100}))
    raw = (
        b"GET /echo/a?x=1&y=%20z&x=2 HTTP/1.1\r\n"
        b"Host: shop.example:8443\r\n"
        b"X-User-Id: alice\r\n"
        b"X-Custom: one\r\n"
        b"X-Custom: two\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: gzip\r\n"
        b"X-Turnout-Shadow: forged\r\n"  # a client cannot pass for a copy
        b"X-Forwarded-For: 10.9.8.7\r\n"
        b"Connection: close\r\n\r\n"
    )
    resp, _ = await fetch(proxy, raw=raw)
    assert resp.status == 200
    assert resp.header("X-Turnout-Version") == "blue"
    assert resp.json()["upstream"] == "blue"

    copy = (await eventually(lambda: shadows(green), timeout=5))[0]
    primary = blue.requests[-1]
    assert len(green.requests) == 1 and len(blue.requests) == 1
    assert (copy.method, copy.path) == ("GET", "/echo/a?x=1&y=%20z&x=2")
    assert copy.path == primary.path
    assert copy.header_all("X-Turnout-Shadow") == ["1"]
    assert primary.header("X-Turnout-Shadow") is None
    assert copy.header_all("Host") == ["shop.example:8443"] == primary.header_all("Host")
    assert copy.header_all("X-Custom") == ["one", "two"]
    assert copy.header("X-Forwarded-For") == "10.9.8.7, 127.0.0.1"
    assert copy.header("X-Forwarded-Host") == "shop.example:8443"
    names = {k.lower() for k, _ in copy.headers}
    assert not names & (HOP_BY_HOP | {"x-hop"}), copy.headers
    # The same head as the request stable received, plus the shadow mark.
    assert without(copy.headers, "X-Turnout-Shadow") == without(primary.headers)

    # `TE: trailers` is the one TE the primary keeps; so does the copy.
    resp, _ = await fetch(proxy, "GET", "/echo/te", [("TE", "trailers"), ("Connection", "close")])
    assert resp.status == 200
    copy = (await eventually(lambda: [r for r in shadows(green) if r.path == "/echo/te"]))[0]
    primary = blue.requests[-1]
    assert primary.header("TE") == "trailers"
    assert without(copy.headers, "X-Turnout-Shadow") == without(primary.headers)

    # HEAD is a default method too; the pooled connection to green stays usable after it.
    resp, _ = await fetch(proxy, "HEAD", "/echo/h", [("Connection", "close")])
    assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    resp, _ = await fetch(proxy, "GET", "/echo/after-head", [("Connection", "close")])
    assert resp.status == 200
    await eventually(lambda: len(shadows(green)) == 4, timeout=5)
    assert [(r.method, r.path) for r in shadows(green)[2:]] == [
        ("HEAD", "/echo/h"), ("GET", "/echo/after-head"),
    ]  # fmt: skip
    doc = await settled(proxy)
    assert (doc["sent"], doc["dropped"], doc["failed"]) == (4, 0, 0)

    # POST is not a default method: served by blue, not copied.
    resp, _ = await fetch(proxy, "POST", "/echo/p", [("Connection", "close")], b"order=1")
    assert resp.status == 200 and resp.json()["body"] == "order=1"
    assert (await mirror_status(proxy))["sent"] == 4
    m = await proxy.metrics()
    assert m.get("turnout_mirror_requests_total", outcome="sent") == 4
    assert m.get("turnout_mirror_requests_total", outcome="dropped") == 0
    assert m.get("turnout_mirror_requests_total", outcome="failed") == 0
    await asyncio.sleep(0.2)
    assert "/echo/p" not in green.paths()


async def test_post_bodies_are_copied_whole_and_large_ones_dropped(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = mirror_config(
        blue.url, green.url, {"percent": 100, "methods": ["GET", "POST"], "max_body_bytes": "8KiB"}
    )
    proxy = await proxies.start(cfg)
    rng = random.Random(5)
    sized = bytes(rng.getrandbits(8) for _ in range(4096))
    pieces = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1000, 1, 2500, 1599)]
    chunked = b"".join(pieces)

    resp, _ = await fetch(proxy, "POST", "/echo/sized?q=1", [("Connection", "close")], sized)
    assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    resp, _ = await fetch(
        proxy, "POST", raw=chunked_request("/echo/chunked", pieces, [("Connection", "close")])
    )
    assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"

    # Expect: 100-continue: the body follows blue's 100; the copy carries it whole.
    client = await RawClient.connect(proxy.port)
    try:
        head = request("POST", "/echo/expect", "shop.test", [("Expect", "100-continue")])
        await client.send(head.replace(b"\r\n\r\n", b"\r\nContent-Length: 3000\r\n\r\n"))
        assert (await client.response(timeout=5)).status == 100
        await client.send(sized[:3000])
        resp = await client.response(timeout=5)
        assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    finally:
        await client.close()

    await eventually(lambda: len(shadows(green)) == 3 and all(r.body for r in green.requests))
    by_path = {r.path: r for r in green.requests}
    assert by_path["/echo/expect"].body == sized[:3000]
    assert by_path["/echo/sized?q=1"].body == sized
    assert by_path["/echo/sized?q=1"].header("Content-Length") == "4096"
    copy = by_path["/echo/chunked"]
    assert copy.body == chunked  # re-framed with a length: the body is complete by then
    assert copy.header("Content-Length") == str(len(chunked))
    assert copy.header("Transfer-Encoding") is None
    assert {r.path: r.body for r in blue.requests} == {
        "/echo/sized?q=1": sized, "/echo/chunked": chunked, "/echo/expect": sized[:3000],
    }  # fmt: skip
    doc = await settled(proxy)
    assert (doc["sent"], doc["dropped"], doc["failed"]) == (3, 0, 0)

    # Over max_body_bytes (8 KiB): served by blue, not copied, counted as dropped,
    # whether the size is declared or found while the chunked body streams.
    big = bytes(rng.getrandbits(8) for _ in range(16 * 1024))
    resp, _ = await fetch(proxy, "POST", "/echo/big-sized", [("Connection", "close")], big)
    assert resp.status == 200 and resp.json()["body"].encode("latin-1") == big
    big_pieces = [big[i : i + 3000] for i in range(0, len(big), 3000)]
    resp, _ = await fetch(
        proxy,
        "POST",
        raw=chunked_request("/echo/big-chunked", big_pieces, [("Connection", "close")]),
    )
    assert resp.status == 200 and resp.json()["body"].encode("latin-1") == big
    doc = await mirror_status(proxy)
    assert (doc["sent"], doc["dropped"], doc["failed"]) == (3, 2, 0)
    m = await proxy.metrics()
    assert m.get("turnout_mirror_requests_total", outcome="dropped") == 2
    # "sent" counts copies dispatched: wait for them to arrive, then for any stray one
    await eventually(lambda: len(green.paths()) >= 3, timeout=5)
    await asyncio.sleep(0.2)
    assert sorted(green.paths()) == ["/echo/chunked", "/echo/expect", "/echo/sized?q=1"]


async def test_canary_traffic_upgrades_and_the_latch_are_not_copied(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session: aiohttp.ClientSession
):
    proxy = await proxies.start(mirror_config(blue.url, green.url, {"percent": 100}))

    # Served by green (a rule): not copied.
    resp, _ = await fetch(
        proxy, "GET", "/echo/qa", [("X-Canary", "always"), ("Connection", "close")]
    )
    assert resp.status == 200 and resp.header("X-Turnout-Version") == "green"
    assert [(r.path, r.header("X-Turnout-Shadow")) for r in green.requests] == [("/echo/qa", None)]
    assert (await mirror_status(proxy))["sent"] == 0

    # An Upgrade (WebSocket) is tunnelled to blue and not copied.
    async with session.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "blue:hi"
    assert (await mirror_status(proxy))["sent"] == 0

    # A GET to stable is (the control).
    resp, _ = await fetch(proxy, "GET", "/echo/control", [("Connection", "close")])
    assert resp.header("X-Turnout-Version") == "blue"
    await eventually(lambda: len(shadows(green)) == 1)
    assert (await mirror_status(proxy))["sent"] == 1

    # The rollback latch stops mirroring at once (and sends the rule's users to blue).
    code, doc = await admin(proxy, "POST", "/rollback", body={"reason": "test"})
    assert code == 200 and doc["status"]["rollback"]["active"] is True
    for path, extra in (("/echo/latched", []), ("/echo/latched-qa", [("X-Canary", "always")])):
        resp, _ = await fetch(proxy, "GET", path, [*extra, ("Connection", "close")])
        assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    assert (await mirror_status(proxy))["sent"] == 1

    # Resume: copies flow again. Then nothing else ever reached green.
    code, _ = await admin(proxy, "POST", "/resume")
    assert code == 200
    resp, _ = await fetch(proxy, "GET", "/echo/resumed", [("Connection", "close")])
    assert resp.header("X-Turnout-Version") == "blue"
    await eventually(lambda: len(shadows(green)) == 2)
    doc = await settled(proxy)
    assert (doc["sent"], doc["dropped"], doc["failed"]) == (2, 0, 0)
    assert green.paths() == ["/echo/qa", "/echo/control", "/echo/resumed"]
    assert "/ws" in blue.paths()


# --------------------------------------------------------------- 2. never waits on a copy


async def test_a_slow_canary_never_delays_the_primary(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream
):
    proxy, _, gauge, abandoned = await slow_canary(
        proxies, upstreams, blue, 10.0, {"percent": 100, "timeout": "15s"}
    )

    latencies: list[float] = []
    # 25 requests on one keep-alive connection: reusable at once after each answer.
    client = await RawClient.connect(proxy.port)
    try:
        for i in range(25):
            t0 = time.monotonic()
            await client.send(request("GET", f"/echo/ka{i}", "shop.test", [("X-User-Id", f"u{i}")]))
            resp = await client.response(timeout=5)
            latencies.append(time.monotonic() - t0)
            assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
            assert resp.header("Connection") is None  # kept alive
    finally:
        await client.close()
    # 25 more, each on its own connection that the client closes after the answer.
    for i in range(25):
        resp, seconds = await fetch(proxy, "GET", f"/echo/new{i}", [("X-User-Id", f"n{i}")])
        latencies.append(seconds)
        assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    print(f"primary latency: max {max(latencies) * 1000:.1f} ms over {len(latencies)}")
    assert max(latencies) < PROMPT, sorted(latencies)[-5:]

    # Every copy is at green, unanswered, and no client exchange is open.
    await eventually(lambda: gauge.now == 50, timeout=5)
    doc = await mirror_status(proxy)
    assert (doc["sent"], doc["in_flight"], doc["failed"], doc["dropped"]) == (50, 50, 0, 0)
    m = await proxy.metrics()
    assert m.get("turnout_in_flight_requests", version="blue") == 0
    assert m.get("turnout_requests_total", version="blue", code="200") == 50

    # Ten seconds later green answers them all: each copy ends well, none failed.
    doc = await settled(proxy, timeout=15)
    assert (doc["sent"], doc["failed"], doc["dropped"]) == (50, 0, 0)
    m = await proxy.metrics()
    count = m.get("turnout_mirror_duration_seconds_count", version="green")
    assert count == 50
    mean = m.get("turnout_mirror_duration_seconds_sum", version="green") / count
    print(f"copies: {count:.0f} answered after {mean:.2f} s on average, none failed")
    assert mean >= 9.5
    assert not abandoned


async def test_a_copy_past_its_timeout_fails_without_touching_the_primary(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream
):
    proxy, _, gauge, abandoned = await slow_canary(
        proxies, upstreams, blue, 10.0, {"percent": 100, "timeout": "1s"}
    )
    t0 = time.monotonic()
    for i in range(10):
        resp, seconds = await fetch(proxy, "GET", f"/echo/t{i}", [("X-User-Id", f"u{i}")])
        assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
        assert seconds < PROMPT
    doc = await mirror_status(proxy)
    assert doc["sent"] == 10 and doc["failed"] < 10
    doc = await counted(proxy, "failed", 10, timeout=5)
    elapsed = time.monotonic() - t0
    assert (doc["sent"], doc["failed"], doc["in_flight"]) == (10, 10, 0)
    print(f"10 copies failed {elapsed:.2f} s after the first send (timeout 1s)")
    assert 1.0 <= elapsed < 4.0
    # The proxy closed its connections to green when the copies timed out.
    await eventually(lambda: len(abandoned) == 10, timeout=3)
    assert all(t - t0 >= 1.0 for t in abandoned)
    m = await proxy.metrics()
    assert m.get("turnout_mirror_requests_total", outcome="failed") == 10
    assert m.get("turnout_requests_total", version="blue", code="200") == 10


# ------------------------------------------------------------------------ 3. max_in_flight


async def test_max_in_flight_drops_the_excess(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream
):
    proxy, green, gauge, abandoned = await slow_canary(
        proxies, upstreams, blue, 2.0, {"percent": 100, "max_in_flight": 2, "timeout": "5s"}
    )

    async def one(i: int) -> tuple[Response, float]:
        return await fetch(proxy, "GET", f"/echo/burst{i}", [("X-User-Id", f"b{i}")])

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(20)))
    burst = time.monotonic() - t0
    assert all(r.status == 200 and r.header("X-Turnout-Version") == "blue" for r, _ in results)
    assert max(s for _, s in results) < 2.0  # no primary waited for green's 2 s

    doc = await mirror_status(proxy)
    print(f"burst of 20 in {burst:.2f} s: sent {doc['sent']}, dropped {doc['dropped']}")
    assert doc["sent"] + doc["dropped"] == 20
    assert doc["in_flight"] <= 2
    # The guarantee: at most 2 copies outstanding. Green answers after 2 s, so while
    # the burst lasts less than that, exactly the first 2 were sent.
    if burst < 1.9:
        assert (doc["sent"], doc["dropped"]) == (2, 18), (burst, doc)
    else:  # a very slow machine: each 2 s frees at most 2 slots
        assert doc["sent"] <= 2 * (1 + int(burst / 2.0)), (burst, doc)
    m = await proxy.metrics()
    assert m.get("turnout_mirror_requests_total", outcome="dropped") == doc["dropped"]
    assert m.get("turnout_mirror_requests_total", outcome="sent") == doc["sent"]

    final = await settled(proxy, timeout=6)
    assert (final["sent"], final["dropped"], final["failed"]) == (doc["sent"], doc["dropped"], 0)
    assert len(green.requests) == final["sent"]
    assert gauge.peak <= 2


# ----------------------------------------------------------------------------- 4. compare


class Scripted(AppUpstream):
    """AppUpstream plus /cmp/* answers that differ between blue and green on purpose."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix("/cmp/")
        if request.path.startswith("/cmp/"):
            return await getattr(self, "cmp_" + name)(request)
        return await super()._dispatch(request)

    async def cmp_same(self, request: web.Request) -> web.Response:
        # Equal as JSON except the ignored meta.request_id: other key order, 7 vs 7.0.
        meta = {"request_id": str(uuid.uuid4()), "v": 1}
        if self.name == "blue":
            doc = {"data": {"id": 7, "tags": ["a", "b"]}, "meta": meta}
        else:
            doc = {
                "meta": {"v": 1.0, "request_id": str(uuid.uuid4())},
                "data": {"tags": ["a", "b"], "id": 7.0},
            }
        return web.json_response(doc)

    async def cmp_streamed(self, request: web.Request) -> web.StreamResponse:
        # A chunked JSON answer (the primary's body goes through the parser path).
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        items = [{"n": i, "text": "x" * 50} for i in range(200)]
        body = json.dumps({"items": items, "meta": {"request_id": str(uuid.uuid4())}}).encode()
        for i in range(0, len(body), 1000):
            await resp.write(body[i : i + 1000])
        await resp.write_eof()
        return resp

    async def cmp_body(self, request: web.Request) -> web.Response:
        return web.json_response({"price": 10 if self.name == "blue" else 12, "currency": "EUR"})

    async def cmp_status(self, request: web.Request) -> web.Response:
        code = 200 if self.name == "blue" else 500
        return web.json_response({"ok": code == 200}, status=code)

    async def cmp_text(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {self.name}\n")

    async def cmp_ctype(self, request: web.Request) -> web.Response:
        ctype = "application/json" if self.name == "blue" else "text/html"
        return web.Response(body=b"[1]", content_type=ctype)


async def test_compare_counts_matches_and_reports_mismatches(
    proxies: ProxyFactory, upstreams: Upstreams
):
    blue = await Scripted("blue").start()
    green = await Scripted("green").start()
    upstreams.started += [blue, green]
    mirror = {
        "percent": 100,
        "compare": {
            "ignore_headers": ["Date", "Server"],
            "ignore_json_fields": ["meta.request_id"],
        },
    }
    proxy = await proxies.start(mirror_config(blue.url, green.url, mirror))

    expected = [  # path, result, difference
        ("/cmp/same?x=1", "match", None),
        ("/cmp/streamed", "match", None),
        ("/cmp/body?sku=42", "mismatch", "body"),
        ("/cmp/status", "mismatch", "status"),
        ("/cmp/text", "mismatch", "body"),
        ("/cmp/ctype", "mismatch", "headers"),
    ]
    for i, (path, _, _) in enumerate(expected, 1):
        resp, seconds = await fetch(proxy, "GET", path, [("Connection", "close")])
        assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"

        async def judged(n=i):
            doc = await mirror_status(proxy)
            return doc if doc["matched"] + doc["mismatched"] >= n else None

        await eventually(judged, timeout=5)
    doc = await settled(proxy)
    assert (doc["sent"], doc["failed"], doc["matched"], doc["mismatched"]) == (6, 0, 2, 4)
    m = await proxy.metrics()
    assert m.get("turnout_mirror_compared_total", result="match") == 2
    assert m.get("turnout_mirror_compared_total", result="mismatch") == 4

    code, events = await proxy.admin_get("/events", limit=50)
    assert code == 200
    found = {e["request"]: e for e in events["events"] if e["kind"] == "mismatch"}
    want = {f"GET {p}": d for p, r, d in expected if r == "mismatch"}
    assert set(found) == set(want)
    for line, difference in want.items():
        assert found[line]["difference"] == difference
        assert found[line]["version"] == "green"

    body = found["GET /cmp/body?sku=42"]["detail"]
    assert body["paths"] == ["price"]
    assert '"price": 10' in body["primary_excerpt"] and '"price": 12' in body["shadow_excerpt"]
    assert found["GET /cmp/status"]["detail"] == {"primary": 200, "shadow": 500}
    text = found["GET /cmp/text"]["detail"]
    assert text["primary_excerpt"] == "hello from blue\\n"
    assert text["shadow_excerpt"] == "hello from green\\n"
    assert (text["primary_length"], text["shadow_length"]) == (16, 17)
    assert text["primary_digest"] != text["shadow_digest"]
    assert found["GET /cmp/ctype"]["detail"] == {
        "content-type": {"primary": "application/json", "shadow": "text/html"}
    }

    latest = {x["request"]: x for x in doc["latest_mismatches"]}
    assert set(latest) == set(want)
    assert latest["GET /cmp/body?sku=42"]["detail"]["paths"] == ["price"]
    assert latest["GET /cmp/status"]["difference"] == "status"
    assert doc["compare"] is True

    # 6. `turnout status` prints a mirror line with the counts.
    code, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert code == 0, err
    line = status_line(out, "mirror:")
    for part in ("100%", "GET", "sent 6", "dropped 0", "failed 0", "matched 2", "mismatched 4"):
        assert part in line, line
    code, out, err = await run_cli("status", "--json", "--admin", proxy.admin_url)
    assert code == 0, err
    cli_mirror = json.loads(out)["mirror"]
    assert {k: cli_mirror[k] for k in ("sent", "dropped", "failed", "matched", "mismatched")} == {
        "sent": 6, "dropped": 0, "failed": 0, "matched": 2, "mismatched": 4,
    }  # fmt: skip


# ----------------------------------------------------------------- 5. dark launch guard


class RecordingFaulty(FaultyUpstream):
    """FaultyUpstream that also keeps each request's X-Turnout-Shadow value."""

    def __init__(self, name: str, fault_rate: float = 0.0) -> None:
        super().__init__(name, fault_rate)
        self.shadow_marks: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.shadow_marks.append(request.headers.get("X-Turnout-Shadow"))
        return await super().handle(request)


@pytest.fixture
async def faulty_pair():
    blue = await RecordingFaulty("blue").start()
    green = await RecordingFaulty("green", fault_rate=0.5).start()
    yield blue, green
    await green.stop()
    await blue.stop()


DARK_GUARD = {
    "window": "30s",
    "min_requests": 20,
    "max_error_rate": 0.02,
    "relative_to_stable": True,
    "on_breach": "rollback",
}


async def test_dark_launch_trips_the_guard_without_any_user_on_green(
    proxies: ProxyFactory, faulty_pair: tuple[RecordingFaulty, RecordingFaulty]
):
    blue, green = faulty_pair
    cfg = mirror_config(blue.url, green.url, {"percent": 100}, guard=DARK_GUARD)
    cfg["versions"]["green"]["release"] = "2.0.0"
    proxy = await proxies.start(cfg)

    async with background_load(proxy, rate=100, limit=12, seed=3) as load:
        doc = await wait_latched(proxy)
        sent_at_latch = doc["mirror"]["sent"]
        served_at_latch = len(load.samples)
        # more load under the latch (however fast it goes here): no more copies
        await eventually(lambda: len(load.samples) > served_at_latch + 50, timeout=10)
        doc_after = await proxy.status()
    assert doc_after["mirror"]["sent"] == sent_at_latch

    rb = doc["rollback"]
    print(
        f"latched after {served_at_latch} user requests; evidence canary {rb['evidence']['canary']}"
        f"; {len(load.samples)} user requests in all, green got {green.requests} copies"
    )
    assert rb["actor"] == "guard" and "canary breached" in rb["reason"]
    canary = rb["evidence"]["canary"]
    assert canary["requests"] >= DARK_GUARD["min_requests"]
    assert canary["shadow_requests"] == canary["requests"]  # all of it was shadow traffic
    assert canary["shadow_errors"] == canary["errors"] >= 1
    assert state_doc(proxy)["latch"]["evidence"]["canary"]["shadow_requests"] >= 20

    # Not one user was served by green; green only ever saw copies.
    versions = Counter((s.version, s.status) for s in load.samples)
    assert versions == Counter({("blue", 200): len(load.samples)}), versions
    final = await settled(proxy)
    assert green.requests == final["sent"] == sent_at_latch
    assert green.shadow_marks == ["1"] * green.requests
    assert set(blue.shadow_marks) == {None}
    assert green.failed == green.requests // 2
    m = await proxy.metrics()
    assert m.get("turnout_requests_total", version="green") == 0
    assert m.get("turnout_rollback_active") == 1


# ------------------------------------------------------------------- more: sampling, dead


@pytest.mark.parametrize(
    "key",
    ["header:X-User-Id", "cookie:sid", "query:uid"],
)
async def test_percent_samples_by_user(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, key: str
):
    """With a sticky key a user is always mirrored or never: bucket("<group>:mirror:<key>")."""
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 0, "sticky": {"key": key}}, mirror={"percent": 50}
    )
    proxy = await proxies.start(cfg)
    users = [f"user{i}" for i in range(12)]
    for _ in range(4):
        for user in users:
            headers: list[tuple[str, str]] = [("Connection", "close")]
            path = "/echo/s"
            if key.startswith("header:"):
                headers.append(("X-User-Id", user))
                path += f"?who={user}"
            elif key.startswith("cookie:"):
                headers.append(("Cookie", f"a=b; sid={user}"))
                path += f"?who={user}"
            else:
                path += f"?uid={user}&who={user}"
            resp, _ = await fetch(proxy, "GET", path, headers)
            assert resp.header("X-Turnout-Version") == "blue"
    await settled(proxy)
    per_user = Counter(r.path.rsplit("who=", 1)[1] for r in green.requests)
    expected = {u: 4 for u in users if bucket("green:mirror", u) <= 50}
    assert dict(per_user) == expected
    assert 0 < len(expected) < len(users)  # the sample really splits these users


async def test_a_dead_canary_fails_its_dark_launch(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream
):
    """Copies to a canary that refuses connections count as guard errors, so it trips."""
    cfg = mirror_config(blue.url, upstreams.dead_url(), {"percent": 100}, guard=DARK_GUARD)
    proxy = await proxies.start(cfg)
    async with background_load(proxy, rate=100, limit=10, seed=4) as load:
        doc = await wait_latched(proxy)
    assert all(s.status == 200 and s.version == "blue" for s in load.samples)
    assert doc["mirror"]["failed"] >= DARK_GUARD["min_requests"]
    canary = doc["rollback"]["evidence"]["canary"]
    assert canary["shadow_errors"] == canary["requests"] >= DARK_GUARD["min_requests"]


# ------------------------------------------------------- more: how a copy's exchange ends


def close_framed(body: bytes):
    """Answers 200 with no Content-Length: the body ends when the connection closes."""

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer) -> None:
        if await up.read_head(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(body)
        await writer.drain()

    return handler


def truncated(length: int, sent: int):
    """Announces `length` body bytes, sends `sent` of them, then closes."""

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer) -> None:
        if await up.read_head(reader) is None:
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % length
        writer.write(head + b"x" * sent)
        await writer.drain()

    return handler


def closes_on_reuse():
    """Answers the first request of each connection; closes when a second one arrives
    without answering it (its idle keep-alive timer fired just then)."""

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer) -> None:
        if await up.read_head(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await up.read_head(reader)  # then close, unanswered

    return handler


QUIET_GUARD = {"window": "30s", "min_requests": 1000, "on_breach": "alert"}  # only observes


async def guard_canary(proxy: Proxy) -> dict:
    """The canary's guard window (zeros before the controller's first verdict)."""
    evidence = (await proxy.status())["guard"]["evidence"]
    return evidence["canary"] if evidence else {"shadow_requests": 0, "shadow_errors": 0}


async def first_verdict(proxy: Proxy) -> None:
    """Wait for the controller's first tick: what is recorded before it is never judged
    (see test_outcomes_before_the_first_tick_reach_the_guard)."""

    async def probe():
        return (await proxy.status())["guard"]["evidence"] is not None

    await eventually(probe, timeout=3)


async def test_a_copy_framed_by_close_is_a_complete_answer(
    proxies: ProxyFactory, upstreams: Upstreams
):
    blue = await upstreams.raw("blue", close_framed(b"same body"))
    green = await upstreams.raw("green", close_framed(b"same body"))
    mirror = {"percent": 100, "compare": {}}
    proxy = await proxies.start(mirror_config(blue.url, green.url, mirror, guard=QUIET_GUARD))
    await first_verdict(proxy)
    resp, _ = await fetch(proxy, "GET", "/until-close", [("Connection", "close")])
    assert resp.status == 200 and resp.body == b"same body"
    doc = await counted(proxy, "matched", 1, timeout=5)
    assert (doc["sent"], doc["failed"], doc["matched"], doc["mismatched"]) == (1, 0, 1, 0)

    async def judged():
        canary = await guard_canary(proxy)
        return canary if canary["shadow_requests"] else None

    canary = await eventually(judged, timeout=3)
    assert (canary["shadow_requests"], canary["shadow_errors"]) == (1, 0)


async def test_a_truncated_copy_fails_and_is_not_compared(
    proxies: ProxyFactory, upstreams: Upstreams
):
    blue = await upstreams.raw("blue", truncated(1000, 1000))
    green = await upstreams.raw("green", truncated(1000, 10))
    mirror = {"percent": 100, "compare": {}}
    proxy = await proxies.start(mirror_config(blue.url, green.url, mirror))
    resp, _ = await fetch(proxy, "GET", "/cut", [("Connection", "close")])
    assert resp.status == 200 and resp.body == b"x" * 1000
    doc = await counted(proxy, "failed", 1, timeout=5)
    await asyncio.sleep(0.2)
    doc = await mirror_status(proxy)
    assert (doc["sent"], doc["failed"], doc["matched"], doc["mismatched"]) == (1, 1, 0, 0)
    code, events = await proxy.admin_get("/events")
    assert not [e for e in events["events"] if e["kind"] == "mismatch"]


async def test_a_copy_on_a_pooled_connection_the_canary_just_closed_is_resent(
    proxies: ProxyFactory, upstreams: Upstreams, blue: AppUpstream
):
    green = await upstreams.raw("green", closes_on_reuse())
    proxy = await proxies.start(
        mirror_config(blue.url, green.url, {"percent": 100}, guard=QUIET_GUARD)
    )
    await first_verdict(proxy)
    for i in range(3):
        resp, _ = await fetch(proxy, "GET", f"/echo/reuse{i}", [("Connection", "close")])
        assert resp.status == 200
        await settled(proxy)
    doc = await mirror_status(proxy)
    assert (doc["sent"], doc["failed"]) == (3, 0), doc
    # Copies 2 and 3 each met a connection the canary closed unanswered, and went again.
    assert [r.path for r in green.requests] == [
        "/echo/reuse0", "/echo/reuse1", "/echo/reuse1", "/echo/reuse2", "/echo/reuse2",
    ]  # fmt: skip

    async def judged():
        canary = await guard_canary(proxy)
        return canary if canary["shadow_requests"] >= 3 else None

    canary = await eventually(judged, timeout=3)
    assert (canary["shadow_requests"], canary["shadow_errors"]) == (3, 0)


async def test_an_http10_request_without_host_is_copied_with_one(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(mirror_config(blue.url, green.url, {"percent": 100}))
    resp, _ = await fetch(proxy, raw=b"GET /echo/old HTTP/1.0\r\nX-User-Id: old\r\n\r\n")
    assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    copy = (await eventually(lambda: shadows(green), timeout=5))[0]
    assert blue.requests[0].header("Host") == blue.url.removeprefix("http://")
    assert copy.header("Host") == green.url.removeprefix("http://")
    doc = await settled(proxy)
    assert (doc["sent"], doc["failed"]) == (1, 0)


# ------------------------------------------------- counted from the first request on


async def test_outcomes_before_the_first_tick_reach_the_guard(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(
        mirror_config(blue.url, green.url, {"percent": 100}, guard=QUIET_GUARD)
    )
    for i in range(5):
        resp, _ = await fetch(proxy, "GET", f"/echo/early{i}", [("Connection", "close")])
        assert resp.status == 200
    await settled(proxy)
    await first_verdict(proxy)

    async def judged():  # at a later tick, however late it comes
        status = await proxy.status()
        evidence = status["guard"]["evidence"]
        counts = (evidence["stable"]["requests"], evidence["canary"]["shadow_requests"])
        return status if counts == (5, 5) else None  # the primaries, and their copies

    status = await eventually(judged, timeout=5)
    assert status["mirror"]["sent"] == 5


async def test_pipelined_requests_are_each_copied(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(mirror_config(blue.url, green.url, {"percent": 100}))
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(b"".join(request("GET", f"/echo/pipe{i}") for i in range(3)))
        for _ in range(3):
            resp = await client.response(timeout=5)
            assert resp.status == 200 and resp.header("X-Turnout-Version") == "blue"
    finally:
        await client.close()
    assert blue.paths() == ["/echo/pipe0", "/echo/pipe1", "/echo/pipe2"]
    doc = await settled(proxy)
    assert doc["sent"] + doc["dropped"] == 3, doc
    await eventually(lambda: len(green.requests) == 3, timeout=3)
