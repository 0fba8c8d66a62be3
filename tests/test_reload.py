"""Hot reload against the running subprocess: file edits, SIGHUP, ConfigMap symlink
swaps, invalid files, cohort files, in-flight requests (PRODUCT.md §9, §13)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load
from proxy.routing import bucket

from .conftest import AppUpstream, Proxy, ProxyFactory, eventually, versions_config

pytestmark = pytest.mark.live

GROUP = "checkout"


def routing(weight: int, **extra) -> dict:
    return {"weight": weight, "sticky": {"key": "header:X-User-Id", "group": GROUP}, **extra}


def config(blue: AppUpstream | str, green: AppUpstream | str, weight: int, **extra) -> dict:
    b = blue if isinstance(blue, str) else blue.url
    g = green if isinstance(green, str) else green.url
    return versions_config(b, g, routing=routing(weight, **extra))


def key_in(low: int, high: int) -> str:
    """A sticky key whose bucket lies in low..high."""
    return next(f"user-{i}" for i in range(100_000) if low <= bucket(GROUP, f"user-{i}") <= high)


async def version_of(session: aiohttp.ClientSession, proxy: Proxy, key: str) -> str:
    async with session.get(proxy.url + "/", headers={"X-User-Id": key}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Turnout-Version"]


async def wait_explained(proxy: Proxy, key: str, version: str, timeout: float = 5.0) -> float:
    """Seconds until /explain puts `key` on `version`."""
    t0 = time.monotonic()

    async def probe() -> bool:
        return (await proxy.explain(key))["version"] == version

    await eventually(probe, timeout=timeout, interval=0.01)
    return time.monotonic() - t0


async def wait_generation(proxy: Proxy, generation: int, timeout: float = 5.0) -> dict:
    async def probe():
        doc = await proxy.status()
        return doc if doc["config"]["generation"] >= generation else None

    return await eventually(probe, timeout=timeout)


@pytest.mark.timeout(30)
async def test_weight_edit_is_in_force_within_a_second(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(config(blue, green, 0))
    key = key_in(20, 60)
    assert await version_of(session, proxy, key) == "blue"

    proxy.write_config(config(blue, green, 100))  # atomic: write a temp file, rename it
    elapsed = await wait_explained(proxy, key, "green")
    assert elapsed < 1.0, f"reload took {elapsed:.2f}s"
    assert await version_of(session, proxy, key) == "green"
    doc = await proxy.status()
    assert doc["config"]["generation"] == 2
    assert doc["weight"] == {"configured": 100, "effective": 100}

    proxy.write_config(config(blue, green, 10), atomic=False)  # rewritten in place
    elapsed = await wait_explained(proxy, key, "blue")
    assert elapsed < 1.0, f"reload took {elapsed:.2f}s"
    assert await version_of(session, proxy, key) == "blue"
    await wait_generation(proxy, 3)
    m = await proxy.metrics()
    assert m.get("turnout_config_generation") == 3
    assert m.get("turnout_config_reloads_total", result="success") == 2
    assert m.get("turnout_config_reloads_total", result="failure") == 0
    assert m.get("turnout_canary_weight") == 10


@pytest.mark.timeout(30)
async def test_sighup_reloads(proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream):
    proxy = await proxies.start(config(blue, green, 0))
    # An unchanged file: SIGHUP still reloads (a new generation).
    proxy.signal(signal.SIGHUP)
    await wait_generation(proxy, 2)
    m = await proxy.metrics()
    assert m.get("turnout_config_reloads_total", result="success") == 1
    assert m.get("turnout_config_generation") == 2

    key = key_in(1, 40)
    proxy.write_config(config(blue, green, 50))
    proxy.signal(signal.SIGHUP)
    await wait_explained(proxy, key, "green", timeout=2)
    doc = await proxy.status()
    assert doc["weight"]["configured"] == 50
    assert doc["config"]["last_error"] is None


@pytest.mark.timeout(30)
async def test_configmap_symlink_swap_is_picked_up(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session, tmp_path: Path
):
    """The kubelet's layout: turnout.yaml -> ..data/turnout.yaml, ..data -> ..<timestamp>."""
    confdir = tmp_path / "configmap"
    confdir.mkdir()
    proxy = proxies.new(confdir / "turnout.yaml")

    def publish(stamp: str, cfg: dict) -> None:
        d = confdir / f"..{stamp}"
        d.mkdir()
        (d / "turnout.yaml").write_text(proxy.render(cfg))
        tmp_link = confdir / "..data_tmp"
        os.symlink(d.name, tmp_link)
        os.replace(tmp_link, confdir / "..data")  # atomic swap of the directory link

    publish("2026_01_01_00_00_00.000000001", config(blue, green, 0))
    os.symlink("..data/turnout.yaml", confdir / "turnout.yaml")
    await proxy.start()
    key = key_in(30, 70)
    assert await version_of(session, proxy, key) == "blue"

    publish("2026_01_01_00_05_00.000000002", config(blue, green, 100))
    elapsed = await wait_explained(proxy, key, "green", timeout=5)
    assert elapsed < 1.0, f"symlink swap took {elapsed:.2f}s to apply"
    (confdir / "..2026_01_01_00_00_00.000000001" / "turnout.yaml").unlink()  # kubelet cleanup
    (confdir / "..2026_01_01_00_00_00.000000001").rmdir()
    assert await version_of(session, proxy, key) == "green"

    publish("2026_01_01_00_10_00.000000003", config(blue, green, 0))
    await wait_explained(proxy, key, "blue", timeout=5)
    doc = await proxy.status()
    assert doc["config"]["generation"] == 3
    assert doc["config"]["last_error"] is None


@pytest.mark.timeout(30)
async def test_invalid_config_keeps_the_old_one_in_force(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    template = f"""\
stable: blue
canary: green
versions:
  blue:
    endpoints: [{blue.url}]
  green:
    endpoints: [{green.url}]
routing:
  sticky:
    key: header:X-User-Id
    group: {GROUP}
  weight: WEIGHT
"""
    proxy = await proxies.start(template.replace("WEIGHT", "100"))
    key = key_in(40, 60)
    assert await version_of(session, proxy, key) == "green"

    text = proxy.write_config(template.replace("WEIGHT", "150"))
    line = text.splitlines().index("  weight: 150") + 1

    async def rejected():
        doc = await proxy.status()
        return doc if doc["config"]["last_error"] else None

    doc = await eventually(rejected, timeout=3)
    error = doc["config"]["last_error"]
    assert "routing.weight" in error and "150" in error
    assert f"line {line}" in error, error
    assert doc["config"]["generation"] == 1
    assert doc["weight"]["configured"] == 100
    m = await proxy.metrics()
    assert m.get("turnout_config_reloads_total", result="failure") == 1
    assert m.get("turnout_config_generation") == 1
    for _ in range(10):  # traffic untouched: still the old weight
        assert await version_of(session, proxy, key) == "green"

    proxy.write_config(template.replace("WEIGHT", "0"))
    doc = await wait_generation(proxy, 2)
    assert doc["config"]["last_error"] is None
    assert doc["weight"]["configured"] == 0
    assert await version_of(session, proxy, key) == "blue"
    m = await proxy.metrics()
    assert m.get("turnout_config_generation") == 2
    assert m.get("turnout_config_reloads_total", result="failure") == 1
    assert m.get("turnout_config_reloads_total", result="success") == 1


@pytest.mark.timeout(30)
async def test_cohort_file_edit_is_picked_up(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session, tmp_path: Path
):
    cohort = tmp_path / "cohorts" / "beta.txt"
    cohort.parent.mkdir()
    cohort.write_text("carol\n")
    extra = {
        "rules": [{"name": "beta", "match": {"cohort": "beta"}, "to": "canary"}],
        "cohorts": {"beta": {"file": "cohorts/beta.txt"}},
    }
    proxy = await proxies.start(config(blue, green, 0, **extra))
    assert await version_of(session, proxy, "carol") == "green"
    assert await version_of(session, proxy, "dave") == "blue"

    cohort.write_text("carol\n# new testers\ndave\n")
    elapsed = await wait_explained(proxy, "dave", "green", timeout=5)
    assert elapsed < 1.0, f"cohort edit took {elapsed:.2f}s"
    assert (await proxy.explain("dave"))["reason"] == "rule:beta"
    assert await version_of(session, proxy, "dave") == "green"

    cohort.write_text("dave\n")
    await wait_explained(proxy, "carol", "blue", timeout=5)
    assert await version_of(session, proxy, "carol") == "blue"
    assert (await proxy.status())["config"]["generation"] == 3


@pytest.mark.timeout(30)
async def test_in_flight_request_survives_reload_removing_its_endpoint(
    proxies: ProxyFactory, upstreams, green: AppUpstream, session
):
    old = await upstreams.app("blue-old")
    new = await upstreams.app("blue-new")
    proxy = await proxies.start(config(old, green, 0))

    async def slow() -> tuple[int, dict]:
        async with session.get(proxy.url + "/slow?delay=1.5") as r:
            return r.status, await r.json()

    task = asyncio.create_task(slow())

    async def arrived() -> bool:
        return bool(old.requests)

    await eventually(arrived, timeout=5)
    m = await proxy.metrics()
    assert m.get("turnout_in_flight_requests", version="blue") == 1
    proxy.write_config(config(new, green, 0))
    await wait_generation(proxy, 2, timeout=3)
    assert not task.done()

    status, doc = await asyncio.wait_for(task, 10)
    assert status == 200
    assert doc["upstream"] == "blue-old"

    async with session.get(proxy.url + "/after") as r:
        assert r.status == 200
        assert (await r.json())["upstream"] == "blue-new"
    assert old.paths() == ["/slow?delay=1.5"]
    assert new.paths() == ["/after"]
    m = await proxy.metrics()
    assert m.get("turnout_in_flight_requests", version="blue") == 0


@pytest.mark.timeout(30)
async def test_pooled_connections_to_unchanged_endpoints_survive_reload(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(config(blue, green, 0))
    key = key_in(1, 50)
    assert await version_of(session, proxy, key) == "blue"
    assert await version_of(session, proxy, "other") == "blue"
    assert blue.connections == 1  # one pooled keep-alive connection, reused

    proxy.write_config(config(blue, green, 50))
    await wait_explained(proxy, key, "green")
    for i in range(5):
        await version_of(session, proxy, f"stable-{i}-{key_in(51, 100)}")
    assert blue.connections == 1, "reload dropped the pool of an unchanged endpoint"
    assert blue.closed == 0


@pytest.mark.timeout(60)
async def test_raising_the_weight_never_moves_a_canary_user_back(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, session
):
    proxy = await proxies.start(config(blue, green, 5))
    keys = [f"user-{i}" for i in range(2000)]
    at5 = {k for k in keys if bucket(GROUP, k) <= 5}
    at50 = {k for k in keys if bucket(GROUP, k) <= 50}
    assert at5 <= at50 and 50 < len(at5) < 150
    sample = sorted(at5) + [k for k in keys if k not in at5][: 200 - len(at5)]
    assert len(sample) == 200
    sem = asyncio.Semaphore(16)

    async def live(key: str) -> str:
        async with sem:
            return await version_of(session, proxy, key)

    async def explained(key: str) -> str:
        async with sem:
            return (await proxy.explain(key))["version"]

    before = dict(zip(sample, await asyncio.gather(*map(live, sample)), strict=True))
    assert {k for k, v in before.items() if v == "green"} == at5

    proxy.write_config(config(blue, green, 50))
    await wait_generation(proxy, 2)

    after = dict(zip(sample, await asyncio.gather(*map(live, sample)), strict=True))
    moved_back = [k for k in at5 if after[k] != "green"]
    assert moved_back == []
    assert {k for k, v in after.items() if v == "green"} == at50 & set(sample)

    everyone = dict(zip(keys, await asyncio.gather(*map(explained, keys)), strict=True))
    assert {k for k, v in everyone.items() if v == "green"} == at50


# ------------------------------------------------------------------ hostile input


@pytest.mark.timeout(30)
async def test_a_deeply_nested_config_is_rejected_and_later_edits_still_apply(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    proxy = await proxies.start(config(blue, green, 0))
    text = proxy.render(config(blue, green, 0))
    proxy.write_config(text + "mirror: " + "[" * 100_000 + "]" * 100_000 + "\n")

    async def rejected():
        doc = await proxy.status()
        return doc if doc["config"]["last_error"] else None

    doc = await eventually(rejected, timeout=5)
    assert "nested deeper than the limit of 64 levels" in doc["config"]["last_error"]
    assert doc["config"]["generation"] == 1
    assert (await proxy.metrics()).get("turnout_config_reloads_total", result="failure") == 1
    proxy.write_config(config(blue, green, 30))  # the watcher is alive: this one is applied
    doc = await wait_generation(proxy, 2)
    assert doc["config"]["last_error"] is None and doc["weight"]["configured"] == 30
    assert "RecursionError" not in proxy.log() and "Traceback" not in proxy.log()


@pytest.mark.timeout(90)
async def test_requests_are_served_while_a_million_line_cohort_file_loads(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream, tmp_path: Path
):
    cohort = tmp_path / "beta.txt"
    cohort.write_text("someone\n")
    extra = {
        "rules": [{"name": "beta", "match": {"cohort": "beta"}, "to": "canary"}],
        "cohorts": {"beta": {"file": str(cohort)}},
    }
    proxy = await proxies.start(config(blue, green, 0, **extra))
    tmp = tmp_path / "beta.tmp"
    tmp.write_text("".join(f"member-{i:07d}\n" for i in range(1_000_000)))
    tmp.replace(cohort)
    await wait_generation(proxy, 2, timeout=60)
    assert (await proxy.explain("member-0999999"))["version"] == "green"

    # How long one load of it takes here, with nothing else to do (a thread: the loop runs).
    t0 = time.monotonic()
    await asyncio.to_thread(load, str(proxy.config_path))
    alone = time.monotonic() - t0

    # SIGHUP reloads the same bytes. A load on the event loop would block it from the
    # signal to the swap, so anything sent after a quarter of that time would be
    # answered by the new generation; off the loop, the old one answers meanwhile.
    proxy.signal(signal.SIGHUP)
    hup = time.monotonic()
    served_meanwhile = []

    async def probe() -> bool:
        sent = time.monotonic()
        doc = await proxy.status()
        if doc["config"]["generation"] == 2 and sent > hup + alone / 4:
            served_meanwhile.append(sent - hup)
        return doc["config"]["generation"] == 3

    await eventually(probe, timeout=60, interval=0.01)
    assert served_meanwhile, f"nothing was answered during the load (alone: {alone:.2f}s)"
    assert (await proxy.explain("member-0000001"))["version"] == "green"
