"""`turnout run --workers N` over real sockets (PRODUCT.md §11): one port, one
release state, one aggregated /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from bench.detection import KEY_HEADER, VERSION_HEADER

from .conftest import LOOPBACK, ROOT, Metrics, Proxy, ProxyFactory, eventually, versions_config
from .live import admin, background_load, guard_config, run_cli, status, wait_latched

WORKERS_ENV = dict(os.environ, TURNOUT_WORKERS="2", PYTHONUNBUFFERED="1")


async def fresh_connections(proxy: Proxy, n: int, users: int = 0) -> list[str]:
    """`n` requests, each on a new connection (so the kernel picks a worker for each)."""
    seen = []
    for i in range(n):
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(proxy.url + "/", headers={KEY_HEADER: f"user-{i + users}"}) as r,
        ):
            await r.read()
            assert r.status == 200
            seen.append(r.headers[VERSION_HEADER])
    return seen


async def members(proxy: Proxy) -> list[dict]:
    doc = await status(proxy)
    assert doc["workers"]["count"] == 2
    return doc["workers"]["members"]


async def answered(proxy: Proxy) -> int:
    doc = await status(proxy)
    return sum(v["requests"] for v in doc["versions"].values())


def sticky_config(blue, green, weight: int) -> dict:
    return versions_config(
        blue.url, green.url, routing={"weight": weight, "sticky": {"key": "header:X-User-Id"}}
    )


async def all_served_by(proxy: Proxy, version: str, within: float) -> None:
    """40 fresh connections in a row (spread over both workers) all served by `version`,
    within `within` seconds from now."""
    started = time.monotonic()

    async def only():
        return set(await fresh_connections(proxy, 40)) == {version} or None

    await eventually(only, timeout=within + 2, interval=0.01)
    assert time.monotonic() - started < within


async def start_fleet(proxies: ProxyFactory, config: dict) -> Proxy:
    proxy = await proxies.start(config, env=WORKERS_ENV)

    async def both_up():
        found = await members(proxy)
        return found if len(found) == 2 else None

    await eventually(both_up, timeout=10)
    return proxy


async def test_two_workers_share_the_port_and_report_one_sum(proxies, blue, green):
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 50, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await start_fleet(proxies, cfg)
    seen = await fresh_connections(proxy, 300)
    assert set(seen) == {"blue", "green"}

    async def all_counted():
        return await answered(proxy) == 300 or None

    await eventually(all_counted, timeout=3)
    found = await members(proxy)
    pids = {m["pid"] for m in found}
    assert len(pids) == 2 and proxy.proc.pid not in pids  # two worker processes under one
    assert all(m["requests"] > 0 for m in found), found  # the kernel spread the connections
    assert sum(m["requests"] for m in found) == 300
    code, out, _ = await run_cli("status", "--admin", proxy.admin_url)
    assert code == 0
    assert f"workers: 2 (0: pid {found[0]['pid']}, {found[0]['requests']} requests" in out
    code, text = await admin(proxy, "GET", "/metrics")
    assert code == 200
    metrics = Metrics(text)
    total = metrics.get("turnout_requests_total", version="blue", code="200") + metrics.get(
        "turnout_requests_total", version="green", code="200"
    )
    assert total == 300
    assert seen.count("blue") == metrics.get("turnout_requests_total", version="blue", code="200")


async def test_a_rollback_is_in_force_in_every_worker_within_a_second(proxies, blue, green):
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 100, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await start_fleet(proxies, cfg)
    assert set(await fresh_connections(proxy, 20)) == {"green"}
    code, _ = await admin(proxy, "POST", "/rollback", body={"reason": "fleet test"})
    assert code == 200
    await all_served_by(proxy, "blue", within=1.0)
    found = await members(proxy)
    assert all(m["requests"] > 0 for m in found)
    code, _ = await admin(proxy, "POST", "/resume")
    assert code == 200
    await all_served_by(proxy, "green", within=1.0)


async def test_the_guard_judges_the_whole_fleet(proxies, pair):
    blue, green = pair
    guard = {"window": "10s", "min_requests": 20, "max_error_rate": 0.02, "on_breach": "rollback"}
    proxy = await start_fleet(proxies, guard_config(blue, green, weight=50, guard=guard))
    green.fault_rate = 1.0
    async with background_load(proxy, rate=150, limit=10):
        doc = await wait_latched(proxy)
    assert doc["rollback"]["actor"] == "guard"
    green.fault_rate = 0.0
    # the leader judged and latched; the follower takes the latch from the state file
    await all_served_by(proxy, "blue", within=1.0)
    evidence = doc["rollback"]["evidence"]
    assert evidence is not None


async def test_a_dead_worker_is_replaced_and_counts_never_go_down(proxies, blue, green):
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 0, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await start_fleet(proxies, cfg)
    await fresh_connections(proxy, 100)

    async def counted():
        return await answered(proxy) == 100 or None

    await eventually(counted, timeout=3)
    old = {m["index"]: m["pid"] for m in await members(proxy)}
    os.kill(old[1], signal.SIGKILL)

    async def replaced():
        now = {m["index"]: m["pid"] for m in await members(proxy)}
        return now if now[1] != old[1] else None

    now = await eventually(replaced, timeout=10)
    assert now[0] == old[0]
    await fresh_connections(proxy, 100, users=100)

    async def all_counted():
        return await answered(proxy) == 200 or None

    await eventually(all_counted, timeout=3)  # the dead worker's 100-odd were kept


async def test_sighup_and_sigterm_reach_every_worker(proxies, blue, green):
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 0, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await start_fleet(proxies, cfg)
    pids = [m["pid"] for m in await members(proxy)]
    proxy.signal(signal.SIGHUP)

    async def reloaded():
        code, text = await admin(proxy, "GET", "/metrics")
        return Metrics(text).get("turnout_config_reloads_total", result="success") == 2 or None

    await eventually(reloaded, timeout=5)
    assert await proxy.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def run_turnout(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def test_a_bad_workers_value_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    cfg = versions_config("http://127.0.0.1:9", "http://127.0.0.1:10", routing={"weight": 0})
    path.write_text(Proxy(tmp_path, path).render(cfg))
    out = run_turnout("run", "-c", str(path), "--workers", "many")
    assert out.returncode == 2
    assert "--workers must be a number or 'auto'" in out.stderr


def test_workers_that_cannot_listen_stop_the_fleet(tmp_path):
    """A port held by another program: each worker fails at start, the fleet gives up."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    try:
        path = tmp_path / "t.yaml"
        proxy = Proxy(tmp_path, path)
        proxy.port = holder.getsockname()[1]
        cfg = versions_config("http://127.0.0.1:9", "http://127.0.0.1:10", routing={"weight": 0})
        path.write_text(proxy.render(cfg))
        started = time.monotonic()
        out = run_turnout("run", "-c", str(path), "--workers", "2")
        assert out.returncode == 1, out.stderr[-2000:]
        assert "keeps failing at start: stopping" in out.stderr
        assert time.monotonic() - started < 25
    finally:
        holder.close()


async def test_one_worker_is_the_plain_process(proxies, blue, green):
    cfg = versions_config(blue.url, green.url, routing={"weight": 0})
    proxy = await proxies.start(cfg, env=dict(os.environ, TURNOUT_WORKERS="1"))
    doc = await status(proxy)
    assert doc["workers"] is None


async def test_workers_stop_when_their_supervisor_is_killed(proxies, blue, green):
    proxy = await start_fleet(proxies, sticky_config(blue, green, 0))
    pids = [m["pid"] for m in await members(proxy)]
    proxy.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    proxy.proc.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    async def all_gone():
        return all(gone(pid) for pid in pids) or None

    await eventually(all_gone, timeout=5)
    refused = socket.socket()
    try:
        assert refused.connect_ex((LOOPBACK, proxy.port)) != 0  # nobody keeps the port
    finally:
        refused.close()
