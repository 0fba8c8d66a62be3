"""Helpers shared by the live release tests (test_guard_live.py, test_release.py).

Everything talks to 127.0.0.1 only. Load is `tests.support.Load`: scheduled on
a clock and bounded in time and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections import Counter
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from .conftest import LOOPBACK, ROOT, Proxy, eventually, free_port
from .support import KEY_HEADER, VERSION_HEADER, FaultyUpstream, Load


def guard_config(
    blue: FaultyUpstream,
    green: FaultyUpstream,
    weight: int = 50,
    release: str = "2.0.0",
    guard: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Blue stable, green canary (with a release), sticky on X-User-Id, a guard."""
    cfg: dict[str, Any] = {
        "stable": "blue",
        "canary": "green",
        "versions": {
            "blue": {"endpoints": [blue.url]},
            "green": {"endpoints": [green.url], "release": release},
        },
        "routing": {"weight": weight, "sticky": {"key": f"header:{KEY_HEADER}"}},
    }
    if guard is not None:
        cfg["guard"] = guard
    cfg.update(extra)
    return cfg


def fired(evidence: dict) -> dict[str, dict]:
    """The tests that fired in a breach's evidence, at whichever speed fired first: the
    window's (`evidence["tests"]`) or the cumulative one's (`evidence["cumulative"]`)."""
    if evidence.get("speed") == "cumulative":
        cum = evidence["cumulative"]
        return {name: cum["tests"][name] for name in cum["breaches"]}
    return {name: test for name, test in evidence["tests"].items() if test["breach"]}


def write_with_tokens(proxy: Proxy, config: dict[str, Any], tokens: list[dict]) -> None:
    """Write `config` with `admin.tokens` (Proxy.render only fills in admin.listen)."""
    doc = yaml.safe_load(proxy.render(config))
    doc["admin"]["tokens"] = tokens
    tmp = proxy.config_path.with_name(f".{proxy.config_path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(proxy.config_path)


def state_doc(proxy: Proxy) -> dict:
    return json.loads(proxy.state_path.read_text())


def audit_lines(proxy: Proxy) -> list[dict]:
    path = proxy.config_path.parent / "turnout-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def admin(
    proxy: Proxy,
    method: str,
    path: str,
    token: str | None = None,
    body: dict | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """One admin call with an optional bearer token; (status, JSON or text)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    t = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=t) as s,
        s.request(method, proxy.admin_url + path, headers=headers, json=body) as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def status(proxy: Proxy, token: str | None = None) -> dict:
    code, doc = await admin(proxy, "GET", "/status", token)
    assert code == 200, doc
    return doc


async def versions_seen(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    n: int,
    rng: random.Random | None = None,
    all_ok: bool = True,
) -> Counter:
    """Versions of `n` requests from random users, sent a few at a time; with `all_ok`
    every answer must be a 200."""
    rng = rng or random.Random()
    seen: Counter = Counter()

    async def one() -> None:
        user = f"u{rng.getrandbits(48):012x}"
        async with session.get(proxy.url + "/", headers={KEY_HEADER: user}) as r:
            await r.read()
            seen[(r.headers.get(VERSION_HEADER), r.status)] += 1

    for start in range(0, n, 20):
        await asyncio.gather(*(one() for _ in range(min(20, n - start))))
    assert not all_ok or all(code == 200 for _, code in seen), seen
    out: Counter = Counter()
    for (version, _code), count in seen.items():
        out[version] += count
    return out


@contextlib.asynccontextmanager
async def background_load(proxy: Proxy, rate: float, limit: float, seed: int | None = None):
    """Steady random-user load at `rate` req/s while the block runs (at most `limit` s)."""
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10), connector=connector
    ) as session:
        load = Load(proxy.url, rate, random.Random(seed))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(load.drive(session, limit, stop=stop))
        try:
            yield load
        finally:
            stop.set()
            await task


async def wait_latched(proxy: Proxy, timeout: float = 8.0) -> dict:
    """Poll /status until the rollback latch is set; returns that status."""

    async def latched():
        doc = await status(proxy)
        return doc if doc["rollback"]["active"] else None

    return await eventually(latched, timeout)


@contextlib.asynccontextmanager
async def hook_server(path: str, handler):
    """A webhook receiver on 127.0.0.1 calling `handler` for POST `path`; yields its URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    try:
        yield f"http://{LOOPBACK}:{port}{path}"
    finally:
        await runner.cleanup()


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m proxy ARGS` as a subprocess (through asyncio: the loop keeps serving)."""
    full_env = dict(os.environ)
    full_env.pop("TURNOUT_TOKEN", None)
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def status_line(out: str, prefix: str) -> str:
    """The line of `turnout status` output that starts with `prefix`, with the lines it
    goes on over joined back (the status wraps at 80 columns, indenting what follows)."""
    lines = out.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith(prefix))
    end = next(
        (j for j in range(at + 1, len(lines)) if not lines[j].startswith("    ")), len(lines)
    )
    return " ".join(x.strip() for x in lines[at:end])
