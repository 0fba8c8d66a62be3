"""HTTPS and mTLS upstreams (`https://` endpoints, `versions.<name>.tls`), over
loopback with certificate authorities made in the test: the upstream's certificate
is verified (and a wrong one is a 502 of kind `tls` with OpenSSL's words), the
client certificate is presented, TLS connections are pooled."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import LOOPBACK, Proxy, eventually, versions_config
from .live import run_cli
from .support import Authority, serve_app

pytestmark = pytest.mark.live


class TlsUpstream:
    """An aiohttp app over TLS that records each request's connection and the client
    certificate it came with."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, ctx: ssl.SSLContext) -> TlsUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner, self.port = await serve_app(app, ctx)
        return self

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        peer = transport.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        self.seen.append({
            "path": request.path_qs,
            "conn": transport.get_extra_info("peername")[1],
            "client_cert": subject.get("organizationalUnitName") or bool(peer),
            "proto": request.headers.get("X-Forwarded-Proto"),
            "host": request.headers.get("Host"),
        })  # fmt: skip
        return web.json_response({"upstream": self.name})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def tls_upstreams():
    started: list[TlsUpstream] = []

    async def start(name: str, ctx: ssl.SSLContext) -> TlsUpstream:
        up = await TlsUpstream(name).start(ctx)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


async def fetch(proxy: Proxy, path: str = "/") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + path) as r:
        return r.status, await r.json(content_type=None)


async def reconfigure(proxy: Proxy, cfg: dict) -> None:
    """Write `cfg` and wait until it is in force."""
    generation = await proxy.generation()
    proxy.write_config(cfg)

    async def newer() -> bool:
        return await proxy.generation() > generation

    await eventually(newer, timeout=5)


def config(blue_url: str, green_url: str, **tls) -> dict:
    cfg = versions_config(blue_url, green_url)
    cfg["versions"]["blue"]["tls"] = tls
    return cfg


async def test_an_https_upstream_is_verified_pooled_and_told_https(
    proxies, green, tls_upstreams, tmp_path
):
    ca = Authority(tmp_path)
    blue = await tls_upstreams("blue", ca.server(LOOPBACK))
    proxy = await proxies.start(config(blue.url, green.url, ca=str(ca.ca_file())))
    for i in range(3):
        assert await fetch(proxy, f"/r{i}") == (200, {"upstream": "blue"})
    assert [s["path"] for s in blue.seen] == ["/r0", "/r1", "/r2"]
    assert len({s["conn"] for s in blue.seen}) == 1  # one pooled TLS connection
    assert blue.seen[0]["host"] == f"{LOOPBACK}:{proxy.port}"  # the client's Host passes
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="tls") == 0


async def test_a_certificate_the_proxy_cannot_trust_is_a_502_of_kind_tls(
    proxies, green, tls_upstreams, tmp_path
):
    ca, stranger = Authority(tmp_path), Authority(tmp_path)
    blue = await tls_upstreams("blue", stranger.server(LOOPBACK))
    proxy = await proxies.start(config(blue.url, green.url, ca=str(ca.ca_file())))
    status, doc = await fetch(proxy)
    assert status == 502 and doc["version"] == "blue", doc
    assert doc["cause"].startswith("tls: certificate verify failed: "), doc
    assert "unable to get local issuer certificate" in doc["cause"], doc
    assert blue.seen == []
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="tls") == 1
    # The system's store (no `ca`) does not know a private CA either.
    await reconfigure(proxy, config(blue.url, green.url))
    status, doc = await fetch(proxy)
    assert status == 502 and doc["cause"].startswith("tls: certificate verify failed"), doc


async def test_the_name_checked_is_server_name_or_the_endpoint_host(
    proxies, green, tls_upstreams, tmp_path
):
    ca = Authority(tmp_path)
    blue = await tls_upstreams("blue", ca.server("blue.internal"))
    ca_file = str(ca.ca_file())
    proxy = await proxies.start(config(blue.url, green.url, ca=ca_file))
    status, doc = await fetch(proxy)
    assert status == 502 and "IP address mismatch" in doc["cause"], doc
    await reconfigure(proxy, config(blue.url, green.url, ca=ca_file, server_name="blue.internal"))
    assert await fetch(proxy) == (200, {"upstream": "blue"})
    assert blue.seen and blue.seen[-1]["proto"] == "http"


async def test_verify_false_accepts_any_certificate_with_a_warning(
    proxies, green, tls_upstreams, tmp_path
):
    stranger = Authority(tmp_path)
    blue = await tls_upstreams("blue", stranger.server("elsewhere.example"))
    cfg = config(blue.url, green.url, verify=False)
    proxy = await proxies.start(cfg)
    assert await fetch(proxy) == (200, {"upstream": "blue"})
    code, out, err = await run_cli("check", "-c", str(proxy.config_path))
    assert code == 0 and "versions.blue.tls.verify: false: any certificate is accepted" in out + err


async def test_mtls_presents_the_client_certificate_and_fails_without_it(
    proxies, green, tls_upstreams, tmp_path
):
    ca, clients = Authority(tmp_path), Authority(tmp_path)
    blue = await tls_upstreams("blue", ca.server(LOOPBACK, clients=clients))
    cert, key = clients.issue("client", "proxy.internal", organization_unit_name="turnout")
    ca_file = str(ca.ca_file())
    with_cert = config(blue.url, green.url, ca=ca_file, cert=str(cert), key=str(key))
    proxy = await proxies.start(with_cert)
    assert await fetch(proxy) == (200, {"upstream": "blue"})
    assert blue.seen[-1]["client_cert"] == "turnout"  # who the upstream saw
    # Without the client certificate the upstream refuses the handshake (TLS 1.2:
    # during it; see the README for TLS 1.3, where the refusal comes after it).
    strict = ca.server(LOOPBACK, clients=clients)
    strict.maximum_version = ssl.TLSVersion.TLSv1_2
    old = await tls_upstreams("blue-1.2", strict)
    await reconfigure(proxy, config(old.url, green.url, ca=ca_file))
    status, doc = await fetch(proxy)
    assert status == 502 and doc["cause"].startswith("tls: "), doc
    assert old.seen == []
    m = await proxy.metrics()
    assert m.get("turnout_upstream_errors_total", version="blue", kind="tls") == 1
    await reconfigure(proxy, config(old.url, green.url, ca=ca_file, cert=str(cert), key=str(key)))
    assert await fetch(proxy) == (200, {"upstream": "blue-1.2"})


async def test_an_https_endpoint_speaking_cleartext_is_a_502_of_kind_tls(
    proxies, blue, green, tmp_path
):
    cfg = versions_config(blue.url.replace("http://", "https://"), green.url)
    proxy = await proxies.start(cfg)
    status, doc = await fetch(proxy)
    assert status == 502 and doc["cause"].startswith("tls: "), doc
    assert blue.requests == []  # the cleartext server saw no request it could serve


async def test_bad_upstream_tls_settings_are_config_errors(proxies, blue, green, tmp_path: Path):
    ca = Authority(tmp_path)
    cert, key = ca.issue("client", "proxy.internal")
    (tmp_path / "junk.pem").write_text("junk\n")
    proxy = proxies.new()
    for tls, expected in [
        ({"ca": "junk.pem"}, "versions.blue.tls.ca: cannot trust"),
        ({"cert": str(cert)}, "versions.blue.tls.key: is required with a client certificate"),
        ({"cert": str(cert), "key": "junk.pem"}, "not a PEM private key"),
        ({"server_name": "no such name"}, "versions.blue.tls.server_name: must be a host name"),
        ({"verify": "maybe"}, "versions.blue.tls.verify: must be true or false"),
        ({"ciphers": "ALL"}, "versions.blue.tls.ciphers: unknown key"),
    ]:
        proxy.write_config(config(blue.url.replace("http:", "https:"), green.url, **tls))
        code, out, err = await run_cli("check", "-c", str(proxy.config_path))
        assert code == 2 and expected in out + err, (tls, out, err)
    proxy.write_config(config(blue.url, green.url, ca=str(ca.ca_file())))
    code, out, err = await run_cli("check", "-c", str(proxy.config_path))
    assert code == 0 and "versions.blue.tls: is unused: no endpoint of this version" in out + err
