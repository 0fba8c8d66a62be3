"""TLS termination on the listener, over loopback with certificates made in the test:
what the upstream receives, SNI, a renewed certificate without a restart, a broken
one that keeps the old, and handshake failures counted by reason (never logged
per connection)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest

from .conftest import LOOPBACK, Proxy, RawClient, Response, eventually, versions_config
from .support import Authority

pytestmark = pytest.mark.live

SHOP = "shop.example"


def tls_config(blue, green, *pairs: str, **tls) -> dict:
    certificates = [{"cert": f"{name}.pem", "key": f"{name}.key"} for name in pairs]
    return versions_config(blue.url, green.url, tls={"certificates": certificates, **tls})


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


OPEN: list[RawClient] = []  # closed after each test (see `closing`)


@pytest.fixture(autouse=True)
async def closing():
    yield
    while OPEN:
        with contextlib.suppress(Exception):
            await OPEN.pop().close()


async def tls_client(
    proxy: Proxy, ctx: ssl.SSLContext, server_name: str | None = SHOP
) -> RawClient:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(LOOPBACK, proxy.port, ssl=ctx, server_hostname=server_name), 10
    )
    client = RawClient(reader, writer)
    OPEN.append(client)
    return client


async def cleartext(proxy: Proxy) -> RawClient:
    client = await RawClient.connect(proxy.port)
    OPEN.append(client)
    return client


def handshake(port: int, ctx: ssl.SSLContext, server_name: str = SHOP) -> Exception | None:
    """A blocking client's handshake (run it in a thread); the error it ended with."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name):
                return None
        except (OSError, ssl.SSLError) as e:
            return e


def served_names(client: RawClient) -> set[str]:
    cert = client.writer.get_extra_info("peercert")
    return {value for kind, value in cert["subjectAltName"] if kind == "DNS"}


async def get(client: RawClient, path: str = "/", host: str = SHOP, extra: str = "") -> Response:
    await client.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return await client.response()


async def failures(proxy: Proxy) -> dict[str, float]:
    m = await proxy.metrics()
    reasons = ("timeout", "closed", "http_request", "protocol_version", "certificate_rejected")
    return {r: m.get("turnout_tls_handshake_failures_total", reason=r) for r in reasons}


async def test_https_is_served_and_the_upstream_hears_https(proxies, blue, green, authority):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    client = await tls_client(proxy, authority.trust())
    assert served_names(client) == {SHOP}
    first = await get(client, "/a?x=1", extra="X-Forwarded-Proto: http\r\n")
    assert first.status == 200 and first.header("X-Turnout-Version") == "blue"
    # Pipelined on one TLS connection: both answered, in order.
    await client.send(
        f"GET /b HTTP/1.1\r\nHost: {SHOP}\r\n\r\nGET /c HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode()
    )
    assert (await client.response()).status == 200
    assert (await client.response()).status == 200
    seen = blue.requests
    assert [r.path for r in seen] == ["/a?x=1", "/b", "/c"]
    assert seen[0].header_all("X-Forwarded-Proto") == ["https"]  # the client's is replaced
    assert seen[0].header("X-Forwarded-For") == LOOPBACK
    assert seen[0].header("X-Forwarded-Host") == SHOP
    # A smuggling attempt over TLS is refused like one in cleartext, and nothing of
    # it reaches the upstream.
    await client.send(
        f"POST /s HTTP/1.1\r\nHost: {SHOP}\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".encode()
    )
    assert (await client.response("POST")).status == 400
    assert await client.closed_by_peer()
    assert [r.path for r in blue.requests] == ["/a?x=1", "/b", "/c"]
    status = await proxy.status()
    assert status["tls"]["certificates"][0]["names"] == [SHOP]
    assert status["tls"]["min_version"] == "1.2" and status["tls"]["alpn"] == ["http/1.1"]
    assert "(TLS)" in proxy.log()


async def test_cookies_the_proxy_sets_over_tls_are_secure(proxies, blue, green, authority):
    authority.issue("shop", SHOP)
    routing = {"weight": 50, "sticky": {"key": "header:X-User-Id", "anonymous": "cookie"}}
    config = tls_config(blue, green, "shop")
    config["routing"] = routing
    proxy = await proxies.start(config)
    client = await tls_client(proxy, authority.trust())
    answer = await get(client)
    (cookie,) = answer.header_all("Set-Cookie")
    assert cookie.startswith("turnout_id=") and cookie.endswith("; Secure"), cookie


async def test_sni_picks_the_certificate(proxies, blue, green, authority):
    authority.issue("shop", SHOP, f"*.{SHOP}")
    authority.issue("api", "api.example")
    proxy = await proxies.start(tls_config(blue, green, "shop", "api"))
    trust = authority.trust()
    for name, expected in [
        (SHOP, {SHOP, f"*.{SHOP}"}),
        ("api.example", {"api.example"}),
        (f"img.{SHOP}", {SHOP, f"*.{SHOP}"}),
    ]:
        client = await tls_client(proxy, trust, name)
        assert served_names(client) == expected, name
        assert (await get(client, host=name)).status == 200
        await client.close()
    # No name sent (a client dialling the address): the first certificate.
    anonymous = authority.trust()
    anonymous.check_hostname = False
    client = await tls_client(proxy, anonymous, None)
    assert served_names(client) == {SHOP, f"*.{SHOP}"}
    await client.close()


async def test_a_renewed_certificate_is_served_without_a_restart(
    proxies, blue, green, authority, tmp_path
):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    trust = authority.trust()
    old_client = await tls_client(proxy, trust)
    old_serial = old_client.writer.get_extra_info("peercert")["serialNumber"]
    generation = await proxy.generation()
    authority.issue("shop", SHOP, "renewed.example")  # what certbot's deploy does: new files

    async def renewed() -> bool:
        client = await tls_client(proxy, trust)
        try:
            return served_names(client) == {SHOP, "renewed.example"}
        finally:
            await client.close()

    await eventually(renewed, timeout=5)
    assert await proxy.generation() > generation
    # The connection made on the old certificate goes on serving.
    assert old_client.writer.get_extra_info("peercert")["serialNumber"] == old_serial
    assert (await get(old_client)).status == 200
    assert "ERROR" not in proxy.log()


async def test_a_broken_certificate_keeps_the_one_in_force(
    proxies, blue, green, authority, tmp_path
):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    generation = await proxy.generation()
    trust = authority.trust()
    other = Authority(tmp_path)
    other.issue("other", "other.example")
    (tmp_path / "shop.key").write_bytes((tmp_path / "other.key").read_bytes())  # mismatched

    async def rejected() -> str | None:
        return (await proxy.status())["config"]["last_error"]

    error = await eventually(rejected, timeout=5)
    assert "tls.certificates[0]" in error and "the key does not match the certificate" in error
    assert await proxy.generation() == generation
    client = await tls_client(proxy, trust)  # the pair in force still serves
    assert served_names(client) == {SHOP} and (await get(client)).status == 200
    # Broken files on disk are not read again and again: fixing them is one reload.
    authority.issue("shop", SHOP, "fixed.example")

    async def fixed() -> bool:
        c = await tls_client(proxy, trust)
        try:
            return "fixed.example" in served_names(c)
        finally:
            await c.close()

    await eventually(fixed, timeout=5)
    assert (await proxy.status())["config"]["last_error"] is None


async def test_handshake_failures_are_counted_by_reason_and_not_logged(
    proxies, blue, green, authority
):
    authority.issue("shop", SHOP)
    config = tls_config(blue, green, "shop", min_version="1.3", handshake_timeout="300ms")
    proxy = await proxies.start(config)
    assert await failures(proxy) == dict.fromkeys(await failures(proxy), 0)
    # Cleartext HTTP to the TLS port: OpenSSL recognises it.
    plain = await cleartext(proxy)
    await plain.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await plain.closed_by_peer()
    # TLS 1.2 only, against a listener that wants 1.3.
    old = authority.trust()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_client(proxy, old)
    # A client that does not trust the certificate refuses it with an alert (a
    # blocking socket, in a thread: asyncio's TLS client closes without the alert).
    refused = await asyncio.to_thread(handshake, proxy.port, ssl.create_default_context())
    assert isinstance(refused, ssl.SSLCertVerificationError), refused
    # Connected, and silent: the handshake times out.
    silent = await cleartext(proxy)
    assert await silent.closed_by_peer(timeout=5)
    # Gone before a word.
    gone = await cleartext(proxy)
    await gone.close()
    expected = {
        "http_request": 1,
        "protocol_version": 1,
        "certificate_rejected": 1,
        "timeout": 1,
        "closed": 1,
    }

    seen: list[dict] = []

    async def counted() -> bool:
        seen.append(await failures(proxy))
        return seen[-1] == expected

    with contextlib.suppress(AssertionError):
        await eventually(counted, timeout=5)
    assert seen[-1] == expected
    status = await proxy.status()
    assert status["tls"]["handshake_failures"]["timeout"] == 1
    # A good client is served meanwhile, and nothing of the failures was logged.
    client = await tls_client(proxy, authority.trust())
    assert (await get(client)).status == 200
    assert client.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    log = proxy.log()
    assert "Traceback" not in log and "WARNING" not in log and "ERROR" not in log, log


async def test_handshakes_count_against_max_connections(proxies, blue, green, authority):
    authority.issue("shop", SHOP)
    config = tls_config(blue, green, "shop")
    config["limits"] = {"max_connections": 2}
    proxy = await proxies.start(config)
    trust = authority.trust()
    held = [await tls_client(proxy, trust)]
    # A handshake in progress holds a place (connections are accepted in order).
    silent = await cleartext(proxy)
    third = await cleartext(proxy)
    assert await third.closed_by_peer()

    async def refused() -> bool:
        m = await proxy.metrics()
        return m.get("turnout_tls_handshake_failures_total", reason="max_connections") == 1

    await eventually(refused, timeout=5)
    await silent.close()
    assert (await get(held[0])).status == 200


async def test_drain_finishes_a_request_in_flight_over_tls(
    proxies, upstreams, blue, green, authority
):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    client = await tls_client(proxy, authority.trust())
    await client.send(f"GET /slow?delay=0.5 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
    await eventually(lambda: any(r.path == "/slow?delay=0.5" for r in blue.requests))
    proxy.signal(signal.SIGTERM)
    answer = await client.response()
    assert answer.status == 200
    assert await proxy.wait(10) == 0


async def test_many_handshakes_in_a_row_all_complete(proxies, blue, green, authority):
    """A client's first bytes often reach the proxy before the TLS protocol takes the
    connection over: they must be handed to it, or the handshake stalls until its
    timeout. Every one of these handshakes completes at once."""
    authority.issue("shop", SHOP)
    config = tls_config(blue, green, "shop", handshake_timeout="5s")
    proxy = await proxies.start(config)
    trust = authority.trust()
    for _ in range(40):
        client = await asyncio.wait_for(tls_client(proxy, trust), 2)
        assert (await get(client)).status == 200
        await client.close()
    assert (await failures(proxy)) == dict.fromkeys(await failures(proxy), 0)


async def test_a_server_name_that_is_not_ascii_fails_quietly(proxies, blue, green, authority):
    authority.issue("shop", SHOP)
    authority.issue("api", "api.example")
    proxy = await proxies.start(tls_config(blue, green, "shop", "api"))
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{LOOPBACK}:{proxy.port}",
        "-servername", b"sh\xffop.example",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.wait_for(proc.wait(), 10)

    async def counted() -> bool:
        m = await proxy.metrics()
        return m.get("turnout_tls_handshake_failures_total", reason="other") == 1

    await eventually(counted, timeout=5)
    client = await tls_client(proxy, authority.trust(), "api.example")
    assert served_names(client) == {"api.example"}
    log = proxy.log()
    assert "Traceback" not in log and "UnicodeDecodeError" not in log, log


async def test_a_client_close_notify_ends_its_connection_without_a_warning(
    proxies, blue, green, authority
):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    client = await tls_client(proxy, authority.trust())
    await client.send(f"GET /slow?delay=1 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
    await eventually(lambda: "/slow?delay=1" in blue.paths())
    client.writer.close()  # close_notify while the answer is on its way

    async def gone() -> bool:
        m = await proxy.metrics()
        return m.get("turnout_requests_total", version="blue", code="499") == 1

    await eventually(gone, timeout=5)
    assert "WARNING" not in proxy.log(), proxy.log()


def hold_silently(port: int, ctx: ssl.SSLContext, served: threading.Event, done: threading.Event):
    """A blocking client (run it in a thread): one request answered, then it keeps the
    connection open and reads nothing more (so it never answers a close_notify)."""
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=SHOP) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        served.set()
        done.wait(15)


async def test_a_drain_does_not_wait_for_idle_tls_clients(proxies, blue, green, authority):
    """An idle TLS connection is closed at once: the drain waits at most the TLS close's
    own bound (2 s) for a client that never answers the close_notify."""
    authority.issue("shop", SHOP)
    config = tls_config(blue, green, "shop")
    config["limits"] = {"drain_timeout": "20s"}
    proxy = await proxies.start(config)
    served, done = threading.Event(), threading.Event()
    holder = asyncio.create_task(
        asyncio.to_thread(hold_silently, proxy.port, authority.trust(), served, done)
    )
    try:
        assert await asyncio.to_thread(served.wait, 10)
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait(8) == 0, proxy.log()
    finally:
        done.set()
        await holder


async def test_a_reload_changes_the_protocol_settings_of_new_handshakes(
    proxies, blue, green, authority
):
    authority.issue("shop", SHOP)
    proxy = await proxies.start(tls_config(blue, green, "shop"))
    old = authority.trust()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    before = await tls_client(proxy, old)
    assert before.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    generation = await proxy.generation()
    proxy.write_config(tls_config(blue, green, "shop", min_version="1.3"))

    async def newer() -> bool:
        return await proxy.generation() > generation

    await eventually(newer, timeout=5)
    refused = await asyncio.to_thread(handshake, proxy.port, old)
    assert isinstance(refused, ssl.SSLError), refused
    assert (await get(before)).status == 200  # the connection made before goes on
