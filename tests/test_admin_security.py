"""The admin API against hostile callers, over real loopback sockets (PRODUCT.md §7, §13).

Without tokens: a page in a local browser (foreign Origin, text/plain bodies)
and DNS rebinding (a foreign Host) are refused; with tokens the bearer rules
hold and actions still take JSON only. Bad bodies are 400/413/415, audited,
rate-limited when they flood; control characters never reach a log line, the
audit file or the terminal raw; rollback.at keeps its milliseconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time

import aiohttp
import pytest

from proxy.admin.auth import REFUSED_PER_SECOND
from proxy.safetext import escape

from .conftest import Proxy, ProxyFactory, eventually, versions_config
from .live import audit_lines, run_cli, state_doc, status_line, write_with_tokens

pytestmark = pytest.mark.live

JSON = {"Content-Type": "application/json"}


async def call(
    proxy: Proxy, method: str, path: str, headers: dict | None = None, data: bytes | None = None
) -> tuple[int, dict | str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.request(method, proxy.admin_url + path, headers=headers or {}, data=data) as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def latched(proxy: Proxy) -> bool:
    code, doc = await call(proxy, "GET", "/status")
    assert code == 200, doc
    return doc["rollback"]["active"]


# ---------------------------------------------------------------- without tokens


@pytest.mark.timeout(30)
async def test_dns_rebinding_a_foreign_host_is_refused(proxy: Proxy):
    evil = {"Host": f"evil.example:{proxy.admin_port}"}
    code, doc = await call(proxy, "GET", "/status", evil)
    assert code == 403 and "loopback Host" in doc["error"], doc
    code, doc = await call(proxy, "POST", "/rollback", {**evil, **JSON}, b'{"reason": "x"}')
    assert code == 403, doc
    assert not await latched(proxy)
    # Probes and Prometheus reach the pod by its IP: those stay open.
    for path in ("/metrics", "/healthz", "/readyz"):
        code, _ = await call(proxy, "GET", path, evil)
        assert code == 200, path
    for host in (f"localhost:{proxy.admin_port}", "127.0.0.1", f"[::1]:{proxy.admin_port}"):
        code, _ = await call(proxy, "GET", "/status", {"Host": host})
        assert code == 200, host
    audit = [(a["action"], a["outcome"]) for a in audit_lines(proxy)]
    assert audit == [("GET /status", "refused 403"), ("rollback", "refused 403")]


@pytest.mark.timeout(30)
async def test_a_page_of_another_site_cannot_pull_the_brake(proxy: Proxy):
    # What a browser sends for fetch(..., {method: "POST", mode: "no-cors", body}) or a form.
    for origin in ("https://evil.example", "null"):
        for ctype in ("text/plain", "application/json"):
            headers = {"Origin": origin, "Content-Type": ctype}
            code, doc = await call(proxy, "POST", "/rollback", headers, b'{"reason": "csrf"}')
            assert code == 403 and "Origin" in doc["error"], (origin, ctype, doc)
        code, _ = await call(proxy, "POST", "/rollback", {"Origin": origin})  # no body
        assert code == 403
    assert not await latched(proxy)
    # A loopback origin (a local tool's page) is served like any local caller.
    headers = {"Origin": f"http://localhost:{proxy.admin_port}", **JSON}
    code, doc = await call(proxy, "POST", "/rollback", headers, b'{"reason": "local page"}')
    assert code == 200, doc
    assert await latched(proxy)


@pytest.mark.timeout(30)
async def test_a_page_of_another_local_program_cannot_pull_the_brake(proxy: Proxy):
    """A dev server's page on localhost:3000 is loopback but another origin: only the
    dashboard this listener serves (its own port, or Sec-Fetch-Site same-origin) may act."""
    here = {"Host": f"127.0.0.1:{proxy.admin_port}"}
    for headers in (
        {**here, "Origin": "http://localhost:3000"},
        {**here, "Origin": f"http://127.0.0.1:{proxy.admin_port}", "Sec-Fetch-Site": "same-site"},
        {**here, "Sec-Fetch-Site": "cross-site"},
    ):
        code, doc = await call(proxy, "POST", "/resume", headers)  # no body: no CORS preflight
        assert code == 403, (headers, doc)
        code, doc = await call(proxy, "POST", "/rollback", {**headers, **JSON}, b"{}")
        assert code == 403, (headers, doc)
    assert not await latched(proxy)
    same = {
        **here,
        "Origin": f"http://127.0.0.1:{proxy.admin_port}",
        "Sec-Fetch-Site": "same-origin",
    }
    code, doc = await call(proxy, "POST", "/rollback", {**same, **JSON}, b'{"reason": "dashboard"}')
    assert code == 200, doc
    assert await latched(proxy)


@pytest.mark.timeout(30)
async def test_actions_take_json_only(proxy: Proxy):
    body = b'{"reason": "typed"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        code, doc = await call(proxy, "POST", "/rollback", {"Content-Type": ctype}, body)
        assert code == 415 and "application/json" in doc["error"], (ctype, doc)
    assert not await latched(proxy)
    typed = {"Content-Type": "Application/JSON; charset=utf-8"}
    code, doc = await call(proxy, "POST", "/rollback", typed, body)
    assert code == 200 and doc["status"]["rollback"]["reason"] == "typed", doc
    code, doc = await call(proxy, "POST", "/resume")  # no body: no type needed
    assert code == 200, doc
    outcomes = [a["outcome"] for a in audit_lines(proxy)]
    assert outcomes == ["refused 415"] * 3 + ["ok", "ok"]


# ------------------------------------------------------------------- with tokens


@pytest.mark.timeout(30)
async def test_with_tokens_the_bearer_decides_and_actions_still_take_json(
    proxies: ProxyFactory, blue, green
):
    p = proxies.new()
    write_with_tokens(p, versions_config(blue.url, green.url),
                      [{"name": "ci", "token_env": "T_CI", "roles": ["engineer"]}])  # fmt: skip
    await p.start(env={"T_CI": "ci-secret"})
    bearer = {"Authorization": "Bearer ci-secret"}
    # The Host rule is the tokenless mode's: with tokens the token is the proof.
    code, _ = await call(p, "GET", "/status", {**bearer, "Host": "proxy.internal:9901"})
    assert code == 200
    code, _ = await call(p, "GET", "/status", {"Host": "localhost"})
    assert code == 401
    code, doc = await call(p, "POST", "/rollback", {**bearer, "Content-Type": "text/plain"}, b"{}")
    assert code == 415, doc
    code, doc = await call(p, "POST", "/rollback", {**bearer, **JSON}, b'{"reason": "ci"}')
    assert code == 200 and doc["actor"] == "ci"


# -------------------------------------------------------------------- bad bodies


@pytest.mark.timeout(30)
async def test_bad_bodies_are_refused_audited_and_change_nothing(proxy: Proxy):
    cases = [
        (b'{"reason": ', 400, "malformed JSON"),
        (b"\xff\xfe{}", 400, "malformed JSON"),
        (b"[" * 60_000 + b"]" * 60_000, 413, "limit"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "nested deeper than 32"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, 400, "nested deeper than 32"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'"text"', 400, "must be a JSON object"),
        (b'{"reason": {"nested": 1}}', 400, "reason must be a string"),
        (json.dumps({"reason": "r" * 513}).encode(), 400, "over the limit of 512"),
        (b"x" * (70 << 10), 413, "over the 65536 byte limit"),
    ]
    for body, status, message in cases:
        code, doc = await call(proxy, "POST", "/rollback", JSON, body)
        assert code == status and message in doc["error"], (body[:40], code, doc)
    assert not await latched(proxy)
    audit = audit_lines(proxy)
    assert [a["outcome"] for a in audit] == [f"refused {s}" for _, s, _ in cases]
    assert all(a["action"] == "rollback" and a["actor"] == "local" for a in audit)
    longest = json.dumps({"reason": "r" * 512}).encode()
    code, doc = await call(proxy, "POST", "/rollback", JSON, longest)
    assert code == 200, doc


@pytest.mark.timeout(60)
async def test_a_flood_of_refused_calls_is_audited_at_a_bounded_rate(proxy: Proxy):
    flood = 300
    timeout = aiohttp.ClientTimeout(total=20)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def refused() -> int:
            headers = {"Content-Type": "text/plain"}
            async with s.post(proxy.admin_url + "/pause", headers=headers, data=b"x") as r:
                return r.status

        codes = await asyncio.gather(*(refused() for _ in range(flood)))
    elapsed = time.monotonic() - started
    assert codes == [415] * flood

    def accounted() -> tuple[int, int] | None:
        lines = audit_lines(proxy)
        written = sum(a["outcome"] == "refused 415" for a in lines)
        summaries = [a for a in lines if a["outcome"] == "suppressed"]
        suppressed = sum(int(a["detail"].split()[0]) for a in summaries)
        return (written, suppressed) if written + suppressed == flood else None

    written, suppressed = await eventually(accounted, timeout=5)
    # Each one-second window writes at most REFUSED_PER_SECOND lines.
    assert written <= REFUSED_PER_SECOND * (int(elapsed) + 2)
    assert all(re.fullmatch(r"\d+ refused calls suppressed", a["detail"])
               for a in audit_lines(proxy) if a["outcome"] == "suppressed")  # fmt: skip
    if elapsed < 5:  # then at most 6 windows were open: most calls were folded into summaries
        assert suppressed >= flood - 6 * REFUSED_PER_SECOND
    _, doc = await call(proxy, "GET", "/events?limit=500")
    refused_events = [e for e in doc["events"] if e["kind"] == "admin"]
    assert len(refused_events) == written  # events only for what was audited


# -------------------------------------------------------------- control characters

FORGED = "disk full\x1b[2J\x1b[31m\n1999-01-01 00:00:00,000 INFO turnout: all clear\u202e"


@pytest.mark.timeout(40)
async def test_control_characters_are_escaped_in_logs_audit_and_cli(proxy: Proxy):
    body = json.dumps({"reason": FORGED}).encode()
    code, doc = await call(proxy, "POST", "/rollback", JSON, body)
    assert code == 200, doc
    assert doc["status"]["rollback"]["reason"] == FORGED  # JSON carries the data as it is

    await eventually(lambda: "ROLLBACK" in proxy.log())
    log = proxy.log()
    assert "\x1b" not in log and "\u202e" not in log
    assert not any(line.startswith("1999-01-01") for line in log.splitlines())
    assert escape(FORGED) in log

    [entry] = audit_lines(proxy)
    assert entry["detail"] == escape(FORGED)
    assert not re.search("[\x00-\x1f\x7f-\x9f]", json.dumps(entry, ensure_ascii=False))

    rc, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert rc == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    line = status_line(out, "rollback latch")  # a long line goes on over indented ones
    assert line.endswith("— " + escape(FORGED))
    assert not any(x.startswith("1999-01-01") for x in out.splitlines())


# --------------------------------------------------------------------- rollback.at


@pytest.mark.timeout(30)
async def test_rollback_at_keeps_its_milliseconds(proxy: Proxy):
    code, doc = await call(proxy, "POST", "/rollback", JSON, b'{"reason": "precise"}')
    assert code == 200
    at = doc["status"]["rollback"]["at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", at), at
    saved = state_doc(proxy)["latch"]["at"]
    assert abs(dt.datetime.fromisoformat(at).timestamp() - saved) < 0.001
