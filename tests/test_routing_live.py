"""Routing over real sockets: sticky keys, rules, cohorts, anonymous policies, the
decision metrics, /status, /explain and the CLI (PRODUCT.md §2, §4, §7, §8, §13)."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import pytest

from proxy.routing import bucket

from .conftest import (
    ROOT,
    AppUpstream,
    Proxy,
    ProxyFactory,
    RawClient,
    free_port,
    request,
    versions_config,
)

pytestmark = pytest.mark.live

GROUP = "checkout"


def keyed(weight: int, key: str = "header:X-User-Id", **sticky) -> dict:
    return {"weight": weight, "sticky": {"key": key, "group": GROUP, **sticky}}


def predicted(key: str, weight: int, group: str = GROUP) -> str:
    return "green" if bucket(group, key) <= weight else "blue"


async def get_version(session: aiohttp.ClientSession, url: str, **kw) -> str:
    async with session.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Turnout-Version"]


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ------------------------------------------------------------------ sticky keys


@pytest.mark.timeout(30)
async def test_sticky_header_key_is_consistent(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=keyed(50)))
    keys = [f"user-{i}" for i in range(20)]
    assert {predicted(k, 50) for k in keys} == {"blue", "green"}  # both sides covered
    for key in keys[:2]:
        got = {
            await get_version(session, proxy.url + "/", headers={"X-User-Id": key})
            for _ in range(50)
        }
        assert got == {predicted(key, 50)}, key
    for key in keys:
        assert await get_version(session, proxy.url + "/", headers={"X-User-Id": key}) == (
            predicted(key, 50)
        )
        doc = await proxy.explain(key)
        assert doc == {
            "version": predicted(key, 50),
            "reason": "weight",
            "bucket": bucket(GROUP, key),
            "words": doc["words"],  # in words: test_cli_watch.py
        }
        assert f"bucket {bucket(GROUP, key)} of 100" in doc["words"]

    m = await proxy.metrics()
    n_green = sum(predicted(k, 50) == "green" for k in keys[:2]) * 50 + sum(
        predicted(k, 50) == "green" for k in keys
    )
    total = 100 + len(keys)
    assert m.get("turnout_route_decisions_total", version="green", reason="weight") == n_green
    assert m.get("turnout_route_decisions_total", version="blue", reason="weight") == (
        total - n_green
    )
    assert m.get("turnout_requests_total", version="green", code="200") == n_green
    assert len(green.requests) == n_green and len(blue.requests) == total - n_green

    status = await proxy.status()
    assert status["config"]["generation"] == 1
    assert status["config"]["last_error"] is None
    assert status["stable"] == "blue" and status["canary"] == "green"
    assert status["weight"] == {"configured": 50, "effective": 50}
    assert status["versions"]["green"]["requests"] == n_green
    assert status["versions"]["blue"]["requests"] == total - n_green
    assert status["versions"]["blue"]["errors"] == 0


@pytest.mark.timeout(30)
async def test_sticky_query_parameter(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(
        versions_config(blue.url, green.url, routing=keyed(50, "query:uid"))
    )
    keys = [f"q{i}" for i in range(30)]
    for key in keys:
        for _ in range(2):
            got = await get_version(session, proxy.url + f"/page?a=1&uid={key}")
            assert got == predicted(key, 50), key
        assert (await proxy.explain(key))["version"] == predicted(key, 50)
    # The query key is read wherever it sits in the query string.
    key = keys[0]
    assert await get_version(session, proxy.url + f"/p?uid={key}&z=9") == predicted(key, 50)
    # No uid: anonymous (random by default), never an error.
    assert await get_version(session, proxy.url + "/page?a=1") in {"blue", "green"}


@pytest.mark.timeout(30)
async def test_sticky_cookie_key(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    routing = keyed(50, "cookie:uid")
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    keys = [f"c{i}" for i in range(20)]
    for key in keys:
        for cookie in (f"uid={key}", f"theme=dark; uid={key}; lang=en"):
            got = await get_version(session, proxy.url + "/", headers={"Cookie": cookie})
            assert got == predicted(key, 50), (key, cookie)
        assert (await proxy.explain(key))["version"] == predicted(key, 50)
    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", reason="weight") == 40


@pytest.mark.timeout(30)
async def test_sticky_ip_uses_the_peer_address(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    # A group under which 127.0.0.1 and 127.0.0.2 land on different sides of 50.
    group = next(
        f"ip-{i}"
        for i in range(10_000)
        if bucket(f"ip-{i}", "127.0.0.1") <= 50 < bucket(f"ip-{i}", "127.0.0.2")
    )
    routing = {"weight": 50, "sticky": {"key": "ip", "group": group}}
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    for peer, expected in (("127.0.0.1", "green"), ("127.0.0.2", "blue")):
        c = await RawClient.connect(proxy.port, local_host=peer)
        try:
            for _ in range(3):
                # a client-supplied X-Forwarded-For must not change the key
                await c.send(request("GET", "/ip", headers=[("X-Forwarded-For", "10.9.9.9")]))
                r = await c.response()
                assert r.status == 200
                assert r.header("X-Turnout-Version") == expected, peer
        finally:
            await c.close()
        doc = await proxy.explain(peer)
        assert doc["version"] == expected and doc["reason"] == "weight"
    assert green.requests[0].header("X-Forwarded-For") == "10.9.9.9, 127.0.0.1"
    assert blue.requests[0].header("X-Forwarded-For") == "10.9.9.9, 127.0.0.2"


# ------------------------------------------------------------------------ rules


RULES = [
    {"name": "qa", "match": {"header": {"X-Canary": "always"}}, "to": "canary"},
    {"name": "beta-cookie", "match": {"cookie": {"beta": "yes"}}, "to": "canary"},
    {"name": "beta", "match": {"cohort": "beta"}, "to": "canary"},
    {
        "name": "no-canary-for-payments",
        "match": {"path_prefix": "/payments", "method": "POST"},
        "to": "stable",
    },
]


async def _rules_proxy(proxies: ProxyFactory, blue, green, weight: int) -> Proxy:
    cohort_file = proxies.tmp_path / "cohorts" / "beta.txt"
    cohort_file.parent.mkdir(exist_ok=True)
    cohort_file.write_text("# beta testers\n\ncarol\n  dave  \n#erin\n")
    routing = {
        **keyed(weight),
        "rules": RULES,
        "cohorts": {"beta": {"keys": ["alice", "bob"], "file": "cohorts/beta.txt"}},
    }
    return await proxies.start(versions_config(blue.url, green.url, routing=routing))


@pytest.mark.timeout(30)
async def test_rules_route_to_the_canary_with_reason(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await _rules_proxy(proxies, blue, green, weight=0)
    url = proxy.url + "/shop"
    cases = [
        ({"X-Canary": "always"}, "rule:qa"),
        ({"Cookie": "theme=dark; beta=yes"}, "rule:beta-cookie"),
        ({"X-User-Id": "alice"}, "rule:beta"),  # inline cohort key
        ({"X-User-Id": "carol"}, "rule:beta"),  # cohort file key
        ({"X-User-Id": "dave"}, "rule:beta"),  # surrounding blanks ignored
    ]
    for headers, _reason in cases:
        assert await get_version(session, url, headers=headers) == "green", headers
    # Near misses stay on stable (weight 0).
    for headers in (
        {"X-Canary": "sometimes"},
        {"Cookie": "beta=no"},
        {"X-User-Id": "erin"},  # commented out in the file
        {"X-User-Id": "# beta testers"},
        {"X-User-Id": "mallory"},
    ):
        assert await get_version(session, url, headers=headers) == "blue", headers

    explained = [
        (await proxy.explain(headers=["X-Canary:always"]), "rule:qa"),
        (await proxy.explain(headers=["Cookie:beta=yes"]), "rule:beta-cookie"),
        (await proxy.explain("alice"), "rule:beta"),
        (await proxy.explain("carol"), "rule:beta"),
        (await proxy.explain("mallory"), "weight"),
    ]
    for doc, reason in explained:
        assert doc["reason"] == reason, doc
        assert doc["version"] == ("blue" if reason == "weight" else "green")

    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", version="green", reason="rule:qa") == 1
    assert m.get("turnout_route_decisions_total", version="green", reason="rule:beta") == 3
    assert m.get("turnout_route_decisions_total", version="green", reason="rule:beta-cookie") == 1
    assert m.get("turnout_route_decisions_total", version="blue", reason="weight") == 3
    assert m.get("turnout_route_decisions_total", version="blue", reason="random") == 2
    # explain is a dry run: it is not counted as traffic
    assert m.get("turnout_requests_total") == 10
    # every pair the table can produce is exported from the start, at 0 until it happens
    assert 'turnout_route_decisions_total{reason="rollback",version="blue"} 0.0' in m.text


@pytest.mark.timeout(30)
async def test_path_prefix_and_method_rule_keeps_payments_on_stable(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await _rules_proxy(proxies, blue, green, weight=100)
    h = {"X-User-Id": "mallory"}
    for path in ("/payments", "/payments/42", "/paymentsX"):  # a plain string prefix
        async with session.post(proxy.url + path, data=b"pay", headers=h) as r:
            assert r.status == 200
            assert r.headers["X-Turnout-Version"] == "blue", path
    # Other methods or paths: the weight (100) decides.
    assert await get_version(session, proxy.url + "/payments/42", headers=h) == "green"
    async with session.post(proxy.url + "/pay", data=b"x", headers=h) as r:
        assert r.headers["X-Turnout-Version"] == "green"
    # First match wins: the qa rule precedes the payments rule.
    async with session.post(
        proxy.url + "/payments", data=b"x", headers={**h, "X-Canary": "always"}
    ) as r:
        assert r.headers["X-Turnout-Version"] == "green"

    doc = await proxy.explain("mallory", path="/payments/1", method="POST")
    assert doc["version"] == "blue" and doc["reason"] == "rule:no-canary-for-payments"
    doc = await proxy.explain("mallory", path="/payments/1", method="GET")
    assert doc["version"] == "green" and doc["reason"] == "weight"
    m = await proxy.metrics()
    assert (
        m.get("turnout_route_decisions_total", version="blue", reason="rule:no-canary-for-payments")
        == 3
    )


# ---------------------------------------------------------- anonymous policies


@pytest.mark.timeout(30)
async def test_anonymous_random_splits_by_weight(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=keyed(50)))
    n = 200
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            return await get_version(session, proxy.url + "/anon")

    got = await asyncio.gather(*(one() for _ in range(n)))
    greens = got.count("green")
    assert 60 <= greens <= 140, greens  # ~50 %; binomial sd is 7
    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", version="green", reason="random") == greens
    assert m.get("turnout_route_decisions_total", version="blue", reason="random") == n - greens
    doc = await proxy.explain()
    assert doc["reason"] == "random" and doc["bucket"] is None


@pytest.mark.timeout(30)
async def test_anonymous_stable_sends_keyless_requests_to_stable(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    routing = keyed(100, anonymous="stable")
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    for _ in range(20):
        assert await get_version(session, proxy.url + "/") == "blue"
    assert await get_version(session, proxy.url + "/", headers={"X-User-Id": "k"}) == "green"
    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", version="blue", reason="anonymous") == 20
    assert m.get("turnout_route_decisions_total", version="green", reason="weight") == 1
    assert (await proxy.explain())["reason"] == "anonymous"


def _cookie_attributes(set_cookie: str) -> tuple[str, str, dict[str, str]]:
    first, *attrs = [p.strip() for p in set_cookie.split(";")]
    name, _, value = first.partition("=")
    parsed = {}
    for a in attrs:
        k, _, v = a.partition("=")
        parsed[k.lower()] = v
    return name, value, parsed


@pytest.mark.timeout(30)
async def test_anonymous_cookie_issues_turnout_id_and_stays_sticky(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    routing = keyed(50, anonymous="cookie")
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    seen_versions = set()
    for _browser in range(20):
        async with session.get(proxy.url + "/landing") as r:
            assert r.status == 200
            cookies = r.headers.getall("Set-Cookie", [])
            first_version = r.headers["X-Turnout-Version"]
        assert len(cookies) == 1, cookies
        name, value, attrs = _cookie_attributes(cookies[0])
        assert name == "turnout_id" and len(value) >= 16
        assert attrs == {"path": "/", "httponly": "", "samesite": "Lax", "max-age": "31536000"}
        assert first_version == predicted(value, 50)
        seen_versions.add(first_version)
        for _ in range(3):
            async with session.get(
                proxy.url + "/next", headers={"Cookie": f"turnout_id={value}"}
            ) as r:
                assert r.status == 200
                assert r.headers["X-Turnout-Version"] == first_version
                assert "Set-Cookie" not in r.headers
    assert seen_versions == {"blue", "green"}
    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", reason="weight") == 80
    assert m.get("turnout_route_decisions_total", reason="random") == 0


# -------------------------------------------------------------------------- CLI


@pytest.mark.timeout(30)
async def test_cli_status_and_explain(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    routing = {**keyed(30), "rules": RULES[:1]}
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    for i in range(4):
        await get_version(session, proxy.url + "/", headers={"X-User-Id": f"u{i}"})

    code, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert code == 0, err
    assert "stable blue" in out and "canary green" in out
    assert "weight 30%" in out
    assert "generation 1" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    blue_n = sum(predicted(f"u{i}", 30) == "blue" for i in range(4))
    assert lines["blue"][1] == str(blue_n) and lines["green"][1] == str(4 - blue_n)

    code, out, err = await run_cli("status", "--json", "--admin", proxy.admin_url)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["generation"] == 1 and doc["weight"]["configured"] == 30

    key = next(f"k{i}" for i in range(1000) if predicted(f"k{i}", 30) == "green")
    code, out, err = await run_cli("explain", "--admin", proxy.admin_url, "--key", key)
    assert code == 0, err
    assert "green" in out and "weight" in out and f"bucket {bucket(GROUP, key)}" in out

    code, out, err = await run_cli(
        "explain", "--admin", proxy.admin_url, "--key", "nobody-x", "--header", "X-Canary:always"
    )
    assert code == 0, err
    assert "green" in out and "rule:qa" in out


@pytest.mark.timeout(30)
async def test_cli_against_dead_admin_prints_one_line():
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("status",), ("status", "--json"), ("explain", "--key", "k")):
        code, out, err = await run_cli(*args, "--admin", dead)
        assert code != 0
        assert out == ""
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert dead.split("//")[1] in err or "admin" in err


@pytest.mark.timeout(30)
async def test_run_with_an_invalid_config_exits_2_with_key_path_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{free_port()}\nstable: blue\ncanary: green\nversions:\n"
        "  blue: {endpoints: [http://127.0.0.1:1]}\n"
        "  green: {endpoints: [http://127.0.0.1:2]}\n"
        "routing:\n  weight: 150\n"
    )
    code, out, err = await run_cli("run", "-c", str(path))
    assert code == 2
    assert "routing.weight" in err and "line 8" in err, err
    assert "Traceback" not in err


@pytest.mark.timeout(40)
async def test_a_second_proxy_process_gives_every_key_the_same_version(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    """Replicas agree with no shared state: the bucket is a pure function of the key."""
    cfg = versions_config(blue.url, green.url, routing=keyed(37))
    one, two = await proxies.start(cfg), await proxies.start(cfg)
    assert one.pid != two.pid
    seen = {"blue": 0, "green": 0}
    for i in range(300):
        headers = {"X-User-Id": f"replica-user-{i}"}
        first = await get_version(session, one.url + "/r", headers=headers)
        second = await get_version(session, two.url + "/r", headers=headers)
        assert first == second == predicted(f"replica-user-{i}", 37)
        seen[first] += 1
    assert seen["blue"] and seen["green"]  # both versions were exercised
