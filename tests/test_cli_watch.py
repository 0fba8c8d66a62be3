"""The CLI against a live proxy: `status --watch` redraws until Ctrl-C, `explain` says
the decision path in words, and errors are one line with a hint (PRODUCT.md §2)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from .conftest import ROOT, ProxyFactory, free_port, versions_config
from .live import run_cli, write_with_tokens

pytestmark = pytest.mark.live

ROUTING = {"weight": 30, "sticky": {"key": "header:X-User-Id", "group": "g"}}


@pytest.mark.timeout(30)
async def test_watch_redraws_every_second_until_interrupted(proxies: ProxyFactory, blue, green):
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=ROUTING))
    env = dict(os.environ)
    env.pop("TURNOUT_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "status", "--watch", "--admin", proxy.admin_url,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen = b""
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while seen.count(b"turnout status --watch") < 3 and loop.time() < deadline:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 5)
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, err = await asyncio.wait_for(proc.communicate(), 10)
    assert seen.count(b"turnout status --watch") >= 3, seen
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    frame = seen.decode().split("turnout status --watch")[1]
    assert "stable blue" in frame and "weight 30%" in frame and "rollback latch: clear" in frame


@pytest.mark.timeout(30)
async def test_explain_says_the_decision_path_in_words(proxies: ProxyFactory, blue, green):
    routing = {**ROUTING, "rules": [{"name": "qa", "match": {"header": {"X-Canary": "always"}},
                                     "to": "canary"}]}  # fmt: skip
    proxy = await proxies.start(versions_config(blue.url, green.url, routing=routing))
    code, out, err = await run_cli("explain", "--admin", proxy.admin_url, "--key", "alice")
    assert code == 0, err
    assert "no rule matched; the key hashes to bucket" in out
    assert "the canary's weight is 30%: buckets 1-30 go to green and 31-100 to blue" in out
    code, out, err = await run_cli(
        "explain", "--admin", proxy.admin_url, "--key", "bob", "--header", "X-Canary:always"
    )
    assert code == 0, err
    assert "green: rule 'qa' matched (rules come before the weight)" in out


@pytest.mark.timeout(30)
async def test_errors_are_one_line_with_a_hint(proxies: ProxyFactory, blue, green):
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli("status", "--admin", dead)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "is turnout running?" in err and "--admin URL or set TURNOUT_ADMIN" in err

    proxy = proxies.new()
    tokens = [{"name": "viewer-bot", "token_env": "TURNOUT_TOKEN_VIEW", "roles": []}]
    write_with_tokens(proxy, versions_config(blue.url, green.url, routing=ROUTING), tokens)
    await proxy.start(env={"TURNOUT_TOKEN_VIEW": "view-only-5ecret"})
    code, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "HTTP 401" in err and "pass --token or set TURNOUT_TOKEN" in err
    code, out, err = await run_cli("promote", "--admin", proxy.admin_url,
                                   "--token", "view-only-5ecret")  # fmt: skip
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "HTTP 403" in err and "needs a role other than viewer" in err
    assert "ask for a token that holds that role" in err
    code, out, err = await run_cli("status", "--admin", proxy.admin_url + "/nothing-here")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    # pointed at the proxy port: the call reaches an upstream, and the hint says so
    code, out, err = await run_cli("status", "--admin", proxy.url)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "is Turnout's proxy port" in err and "admin.listen" in err, err
