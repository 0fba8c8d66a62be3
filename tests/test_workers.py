"""`turnout run --workers N` over real sockets (PRODUCT.md §11): one port, one
release state, one aggregated /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from proxy.controller import TICK

from .conftest import LOOPBACK, ROOT, Metrics, Proxy, ProxyFactory, eventually, versions_config
from .live import admin, background_load, guard_config, run_cli, status, wait_latched
from .support import KEY_HEADER, VERSION_HEADER
from .test_persistence import StateFolder, state_config

pytestmark = pytest.mark.live

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


async def until_every_worker_served(
    proxy: Proxy, version: str | None = None, limit: int = 400, users: int = 0
) -> list[str]:
    """Fresh connections, ten at a time, until every worker has answered at least one
    more request (the kernel picks a worker per connection, so how many it takes is
    not known; `limit` bounds it); with `version`, every answer must come from it."""
    before = {m["index"]: m["requests"] for m in await members(proxy)}
    seen: list[str] = []

    async def every_worker_answered():
        now = {m["index"]: m["requests"] for m in await members(proxy)}
        return all(now[i] > n for i, n in before.items()) or None

    while not await every_worker_answered():
        assert len(seen) < limit, f"{limit} connections did not reach every worker"
        seen += await fresh_connections(proxy, 10, users=users + len(seen))
        assert version is None or set(seen) == {version}, seen
        # the leader learns a follower's count at its next tick: wait for it, bounded
        with contextlib.suppress(AssertionError):
            await eventually(every_worker_answered, timeout=TICK * 4)
    return seen


async def all_latched(proxy: Proxy, latched: bool = True) -> list[dict]:
    """Every worker says (in its own answer to the leader) the latch is set, or not."""

    async def said():
        found = await members(proxy)
        return found if all(m["latched"] is latched for m in found) else None

    return await eventually(said, timeout=3)


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
    seen += await until_every_worker_served(proxy, users=len(seen))  # however it spreads them

    async def all_counted():
        return await answered(proxy) == len(seen) or None

    await eventually(all_counted, timeout=3)
    found = await members(proxy)
    pids = {m["pid"] for m in found}
    assert len(pids) == 2 and proxy.proc.pid not in pids  # two worker processes under one
    assert sum(m["requests"] for m in found) == len(seen)
    code, out, _ = await run_cli("status", "--admin", proxy.admin_url)
    assert code == 0
    assert f"workers: 2 (0: pid {found[0]['pid']}, {found[0]['requests']} requests" in out
    code, text = await admin(proxy, "GET", "/metrics")
    assert code == 200
    metrics = Metrics(text)
    total = metrics.get("turnout_requests_total", version="blue", code="200") + metrics.get(
        "turnout_requests_total", version="green", code="200"
    )
    assert total == len(seen)
    assert seen.count("blue") == metrics.get("turnout_requests_total", version="blue", code="200")


async def test_a_rollback_is_in_force_in_every_worker_within_a_second(proxies, blue, green):
    """The answer itself says so: 200 only once every follower confirmed it, each
    within workers.PUSH_TIMEOUT (< 1 s), else 503 naming the one that did not."""
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 100, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await start_fleet(proxies, cfg)
    await until_every_worker_served(proxy, "green")
    started = time.monotonic()
    code, doc = await admin(proxy, "POST", "/rollback", body={"reason": "fleet test"})
    took = time.monotonic() - started
    assert code == 200, doc
    assert doc["ok"] and doc["persisted"] and doc["in_force"]["unconfirmed"] == {}
    print(f"rollback in force in both workers, answered after {1000 * took:.1f} ms")
    assert all(m["latched"] for m in doc["status"]["workers"]["members"])
    await until_every_worker_served(proxy, "blue")
    code, _ = await admin(proxy, "POST", "/resume")
    assert code == 200
    await all_latched(proxy, False)
    await until_every_worker_served(proxy, "green")


async def test_an_unsaved_rollback_is_in_force_in_every_worker(proxies, blue, green, tmp_path):
    """Followers take the latch from the leader, not from the state file."""
    folder = StateFolder(tmp_path / "state")
    proxy = await start_fleet(proxies, state_config(blue, green))
    await until_every_worker_served(proxy, "green")
    folder.make_unwritable()
    started = time.monotonic()
    code, doc = await admin(proxy, "POST", "/rollback", body={"reason": "read-only disk"})
    took = time.monotonic() - started
    assert code == 503, doc
    assert doc["latched"] is True and doc["persisted"] is False and doc["ok"] is False
    assert doc["in_force"] == {"workers": 2, "unconfirmed": {}, "starting": []}
    print(f"unsaved rollback in force in both workers, answered after {1000 * took:.1f} ms")
    await until_every_worker_served(proxy, "blue")
    code, _ = await admin(proxy, "GET", "/readyz")
    assert code == 503
    folder.mend()

    async def saved():
        code, _ = await admin(proxy, "GET", "/readyz")
        return code == 200 or None

    await eventually(saved, timeout=5)
    assert json.loads(folder.state_file.read_text())["latch"]["reason"] == "read-only disk"


async def test_a_follower_started_again_takes_an_unsaved_latch_from_the_leader(
    proxies, blue, green, tmp_path
):
    folder = StateFolder(tmp_path / "state")
    proxy = await start_fleet(proxies, state_config(blue, green))
    folder.make_unwritable()
    code, _ = await admin(proxy, "POST", "/rollback", body={"reason": "unsaved"})
    assert code == 503
    old = {m["index"]: m["pid"] for m in await members(proxy)}
    os.kill(old[1], signal.SIGKILL)  # its replacement cannot read the state file at all

    async def replaced():
        now = await members(proxy)
        return now if now[1]["pid"] != old[1] and now[1]["latched"] is not None else None

    now = await eventually(replaced, timeout=10)
    assert now[1]["latched"] is True
    await until_every_worker_served(proxy, "blue")


async def test_the_guard_judges_the_whole_fleet(proxies, pair):
    blue, green = pair
    guard = {"window": "10s", "min_requests": 20, "max_error_rate": 0.02, "on_breach": "rollback"}
    proxy = await start_fleet(proxies, guard_config(blue, green, weight=50, guard=guard))
    green.fault_rate = 1.0
    async with background_load(proxy, rate=150, limit=10):
        doc = await wait_latched(proxy)
    assert doc["rollback"]["actor"] == "guard"
    green.fault_rate = 0.0
    # the leader judged and latched, and pushed the latch to the follower
    await all_latched(proxy)
    await until_every_worker_served(proxy, "blue")
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


async def scrape(proxy: Proxy) -> Metrics | None:
    """/metrics, or None while no leader answers (it is being replaced)."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        code, text = await admin(proxy, "GET", "/metrics", timeout=2)
        if code == 200:
            return Metrics(text)
    return None


def counter_series(m: Metrics) -> dict[tuple, float]:
    return {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in m.samples
        if name.endswith("_total") or name.endswith("_count") or name.endswith("_bucket")
    }


async def test_killing_the_leader_under_load_never_lowers_a_counter(proxies, pair):
    blue, green = pair
    guard = {"window": "30s", "min_requests": 10_000, "on_breach": "rollback"}
    proxy = await start_fleet(proxies, guard_config(blue, green, weight=50, guard=guard))
    scrapes: list[Metrics] = []

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            m = await scrape(proxy)
            if m is not None:
                scrapes.append(m)
            await asyncio.sleep(0.05)

    stop = asyncio.Event()
    sampler = asyncio.get_running_loop().create_task(sample(stop))
    async with background_load(proxy, rate=200, limit=30):
        await eventually(lambda: scrapes and scrapes[-1].get("turnout_requests_total") > 100)
        leader = (await members(proxy))[0]["pid"]
        before = scrapes[-1].get("turnout_requests_total")
        os.kill(leader, signal.SIGKILL)
        killed_at = len(scrapes)  # every later scrape is the new leader's

        async def new_leader():
            with contextlib.suppress(AssertionError, aiohttp.ClientError, OSError):
                found = await members(proxy)
                return found[0]["pid"] != leader and len(found) == 2 or None
            return None

        await eventually(new_leader, timeout=15)
        count = len(scrapes)
        await eventually(lambda: len(scrapes) >= count + 5, timeout=5)
    stop.set()
    await sampler
    after = (await scrape(proxy)).get("turnout_requests_total")
    first = scrapes[killed_at].get("turnout_requests_total")
    print(f"turnout_requests_total {before:.0f} when the leader was killed, {first:.0f} at the"
          f" new leader's first scrape, {after:.0f} at the end")  # fmt: skip
    assert after >= before
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        old, new = counter_series(earlier), counter_series(later)
        lower = {k: (v, new.get(k)) for k, v in old.items() if new.get(k, -1) < v}
        assert not lower, lower  # every series is still there, none went down


async def test_a_new_leader_judges_from_the_windows_of_the_last_one(proxies, pair):
    blue, green = pair
    guard = {"window": "60s", "min_requests": 10_000, "on_breach": "rollback"}
    proxy = await start_fleet(proxies, guard_config(blue, green, weight=50, guard=guard))
    seen = await until_every_worker_served(proxy)
    canary = seen.count("green")

    async def in_the_window():
        doc = await status(proxy)
        return doc["guard"]["evidence"]["canary"]["requests"] == canary or None

    await eventually(in_the_window, timeout=3)
    leader = (await members(proxy))[0]["pid"]
    os.kill(leader, signal.SIGKILL)

    async def judged_again():
        with contextlib.suppress(AssertionError, aiohttp.ClientError, OSError):
            doc = await status(proxy)
            if doc["workers"]["members"][0]["pid"] != leader and doc["guard"]["evidence"]:
                return doc
        return None

    doc = await eventually(judged_again, timeout=15)
    assert doc["guard"]["evidence"]["canary"]["requests"] == canary  # not 0: no fresh start
    assert sum(v["requests"] for v in doc["versions"].values()) == len(seen)


async def test_a_corrupt_state_file_is_logged_once_per_worker(proxies, blue, green, tmp_path):
    (tmp_path / "turnout-state.json").write_text('{"latch": {"active": tru')
    proxy = await start_fleet(proxies, sticky_config(blue, green, 100))
    assert proxy.state_path == tmp_path / "turnout-state.json"
    await all_latched(proxy)
    # Many ticks later (the leader pushes every tick), still one line per worker start.
    await asyncio.sleep(10 * TICK)
    assert proxy.log().count("not valid JSON") == 2
