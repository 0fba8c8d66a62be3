"""A fleet of replicas as one release (PRODUCT.md §11): the guard's verdict from the
fleet's counts in a real Prometheus, and the Prometheus source against a scripted
query API that fails in each way a real one can.

Every replica is a separate `python -m proxy run` process on its own ports; the
Prometheus server scrapes their admin listeners every second.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web

from proxy import sources
from proxy.guard import FleetCounts

from .conftest import Proxy, ProxyFactory, eventually
from .fleet import PrometheusServer, RedisServer, bucket_samples, sample
from .live import (
    admin,
    background_load,
    guard_config,
    run_cli,
    status,
    status_line,
    wait_latched,
)
from .support import LOOPBACK, FaultyUpstream, serve_app

pytestmark = pytest.mark.live

FLEET_GUARD = {
    "window": "10s",
    "min_requests": 20,
    "max_error_rate": 0.02,
    "relative_to_stable": True,
    "on_breach": "rollback",
    "source": "prometheus",
}


class FakePrometheus:
    """GET /api/v1/query answering `mode`: ok, empty, error, garbage, slow."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.queries: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> FakePrometheus:
        app = web.Application()
        app.router.add_get("/api/v1/query", self.query)
        self.runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def query(self, request: web.Request) -> web.Response:
        q = request.query["query"]
        self.queries.append(q)
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "error":
            return web.json_response({"status": "error", "error": "parse error"}, status=400)
        if self.mode == "garbage":
            return web.Response(text="<html>proxy error</html>", status=502)
        result: list[dict] = []
        if self.mode == "ok":
            if "turnout_requests_total" in q:
                result = [
                    sample(60, version="green", code="500"),
                    sample(60, version="blue", code="200"),
                ]
            else:
                result = bucket_samples("green", {1.0: 60.0, float("inf"): 60.0})
                result += bucket_samples("blue", {1.0: 60.0, float("inf"): 60.0})
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )


async def test_prometheus_source_up_down_and_back() -> None:
    fake = await FakePrometheus().start()
    source = sources.Prometheus(
        FleetCounts(f"http://{LOOPBACK}:{fake.port}", "edge", 1.0, 0.3), 30.0
    )
    try:
        assert source.stats(0.0, "green", "blue") is None  # nothing asked yet
        assert source.doc()["last_error"] == "no query yet" and source.doc()["up"] is False
        await source.refresh()
        assert source.up()
        pair = source.stats(time.monotonic(), "green", "blue")
        assert pair is not None
        green, blue = pair
        assert (green.requests, green.errors, blue.requests, blue.errors) == (60, 60, 60, 0)
        assert all('job="edge"' in q and "[30000ms]" in q for q in fake.queries)
        doc = source.doc()
        assert doc["up"] is True and doc["last_error"] is None and doc["kind"] == "prometheus"
        assert doc["last_query_at"] is not None

        for mode, why in [
            ("empty", "no series of turnout_request_duration_seconds for job 'edge'"),
            ("error", "query answered 400: parse error"),
            ("garbage", "query answered 502: not a PromQL answer"),
            ("slow", "no answer within 0.3s"),
        ]:
            fake.mode = mode
            await source.refresh()
            assert source.stats(time.monotonic(), "green", "blue") is None, mode
            assert source.doc()["up"] is False and source.doc()["last_error"] == why, mode
            fake.mode = "ok"
            await source.refresh()
            assert source.up(), mode
    finally:
        await source.close()
        await fake.stop()
    try:
        await source.refresh()  # the server is gone now
        assert not source.up() and source.doc()["last_error"].startswith("unreachable")
    finally:
        await source.close()


async def test_an_old_answer_is_no_answer() -> None:
    fake = await FakePrometheus().start()
    source = sources.Prometheus(FleetCounts(f"http://{LOOPBACK}:{fake.port}", "t", 1.0, 0.5), 10.0)
    try:
        await source.refresh()
        now = time.monotonic()
        assert source.stats(now, "green", "blue") is not None
        assert source.stats(now + 2.4, "green", "blue") is not None
        assert source.stats(now + 2.6, "green", "blue") is None  # 2 intervals + timeout passed
    finally:
        await source.close()
        await fake.stop()


# ------------------------------------------------------------- a real Prometheus, two replicas


class Fleet:
    """Two replicas (separate processes, own ports and state files) and a Prometheus
    scraping both every second; the replicas' guard reads the fleet's counts from it."""

    def __init__(self, proxies: ProxyFactory, tmp_path: Path, shared: bool = False) -> None:
        self.replicas: list[Proxy] = [proxies.new(), proxies.new()]
        targets = [f"{LOOPBACK}:{p.admin_port}" for p in self.replicas]
        self.prometheus = PrometheusServer(tmp_path, targets)
        self.redis = RedisServer(tmp_path) if shared else None  # state.backend redis too

    async def start(self, blue: FaultyUpstream, green: FaultyUpstream) -> Fleet:
        await self.prometheus.start()
        if self.redis is not None:
            await self.redis.start()
        fleet = {"url": self.prometheus.url, "job": "turnout", "query_interval": "1s",
                 "timeout": "1s"}  # fmt: skip
        for i, replica in enumerate(self.replicas):
            cfg = guard_config(blue, green, weight=50, guard=FLEET_GUARD | {"prometheus": fleet})
            cfg["state_file"] = f"state-{i}.json"
            if self.redis is not None:
                redis = {"url": self.redis.url, "key_prefix": "turnout:both:"}
                cfg["state"] = {"backend": "redis", "redis": redis}
            replica.write_config(cfg)
            await replica.start()
        await eventually(lambda: self.prometheus.scraped(2), timeout=15)
        # Both replicas have had a usable answer (the series exist from the start).
        await eventually(lambda: self.all_sources_up(True), timeout=10)
        return self

    async def all_sources_up(self, up: bool) -> bool:
        docs = [await status(r) for r in self.replicas]
        return all(d["guard"]["source"]["up"] is up for d in docs)

    async def stop(self) -> None:
        for replica in self.replicas:  # first: a replica that outlives its servers only logs
            await replica.stop()
        await self.prometheus.stop()
        if self.redis is not None:
            await self.redis.stop()


@pytest.fixture
async def fleet(pair, proxies: ProxyFactory, tmp_path: Path):
    f = Fleet(proxies, tmp_path)
    try:
        yield await f.start(*pair)
    finally:
        await f.stop()
        print(f"--- prometheus log ---\n{f.prometheus.log()}")


async def test_a_fleet_with_both_shows_one_latch_one_step_and_one_verdict(
    pair, proxies: ProxyFactory, tmp_path: Path
):
    """Prometheus for the verdict and Redis for the state, as deploy/kubernetes suggests:
    `turnout status` on either replica tells the same story and names both."""
    blue, green = pair
    f = Fleet(proxies, tmp_path, shared=True)
    try:
        await f.start(blue, green)
        a, b = f.replicas
        green.fault_rate = 1.0
        async with background_load(a, 100, limit=30), background_load(b, 100, limit=30):
            await asyncio.gather(wait_latched(a, 20), wait_latched(b, 20))
        assert f.redis is not None

        async def shown(replica: Proxy) -> list[str]:
            code, out, err = await run_cli("status", "--admin", replica.admin_url)
            assert code == 0, err
            # each line as one, however the status wrapped it at 80 columns
            state, guard = status_line(out, "state:"), status_line(out, "guard:")
            assert state.startswith(f"state: redis {f.redis.url} prefix turnout:both: — up"), out
            assert guard.endswith(f"source prometheus {f.prometheus.url} job turnout (up)"), out
            return [status_line(out, prefix) for prefix in ("rollback latch", "rollout", "guard:")]

        async def one_story() -> list[str] | None:
            # Each replica queries Prometheus on its own clock (every query_interval):
            # their verdicts agree once both have judged the same counts.
            lines = [await shown(r) for r in (a, b)]
            return lines[0] if lines[0] == lines[1] else None

        story = await eventually(one_story, timeout=6)
        assert any(line.startswith("guard: breach") for line in story), story
        docs = [await status(r) for r in (a, b)]
        assert docs[0]["rollback"] == docs[1]["rollback"]  # one latch: the first evidence
    finally:
        await f.stop()


async def _latched_after(replica: Proxy, t0: float, timeout: float) -> tuple[float, dict]:
    doc = await wait_latched(replica, timeout)
    return time.monotonic() - t0, doc


async def test_a_failing_canary_latches_every_replica_from_the_fleet_counts(pair, fleet: Fleet):
    blue, green = pair
    a, b = fleet.replicas
    green.fault_rate = 1.0
    t0 = time.monotonic()
    async with background_load(a, 100, limit=30), background_load(b, 100, limit=30):
        (ta, da), (tb, db) = await asyncio.gather(
            _latched_after(a, t0, 20), _latched_after(b, t0, 20)
        )
    print(f"fleet fault-to-latch (prometheus source, 1 s scrape, 1 s query interval): "
          f"replica A {ta:.2f} s, replica B {tb:.2f} s, both {max(ta, tb):.2f} s")  # fmt: skip
    for doc in (da, db):
        evidence = doc["rollback"]["evidence"]
        assert evidence["source"]["kind"] == "prometheus"
        assert evidence["canary"]["errors"] >= 20
        assert "error_rate" in doc["rollback"]["reason"] or "relative" in doc["rollback"]["reason"]
    for replica in (a, b):
        code, out, err = await run_cli("status", "--admin", replica.admin_url)
        assert code == 0, err
        assert "rollback latch: SET" in out and "guard: " in out
        guard = status_line(out, "guard:")
        assert guard.endswith(f"source prometheus {fleet.prometheus.url} job turnout (up)"), out
    # Fixed and resumed: the breach still in the fleet's counters is not judged again.
    green.fault_rate = 0.0
    code, doc = await admin(a, "POST", "/resume")
    assert code == 200, doc
    async with background_load(a, 100, limit=5):
        await asyncio.sleep(4.0)
    doc = await status(a)
    assert doc["rollback"]["active"] is False, doc["rollback"]
    assert doc["guard"]["state"] in ("inconclusive", "healthy")


async def test_the_local_source_for_comparison(pair, proxies: ProxyFactory):
    """The same two replicas and load with each judging its own slice (guard.source
    local): the figure the README puts beside the fleet's."""
    blue, green = pair
    replicas = []
    for i in range(2):
        cfg = guard_config(blue, green, weight=50, guard=FLEET_GUARD | {"source": "local"})
        cfg["state_file"] = f"state-{i}.json"
        replicas.append(await proxies.start(cfg))
    a, b = replicas
    green.fault_rate = 1.0
    t0 = time.monotonic()
    async with background_load(a, 100, limit=30), background_load(b, 100, limit=30):
        (ta, da), (tb, db) = await asyncio.gather(
            _latched_after(a, t0, 20), _latched_after(b, t0, 20)
        )
    print(f"local fault-to-latch (each replica its own slice): "
          f"replica A {ta:.2f} s, replica B {tb:.2f} s, both {max(ta, tb):.2f} s")  # fmt: skip
    for doc in (da, db):
        assert doc["rollback"]["evidence"].get("speed") in ("window", "cumulative")
        assert doc["guard"]["source"]["kind"] == "local"


async def test_a_replica_without_canary_traffic_latches_from_the_fleet(pair, fleet: Fleet):
    """All of the canary's traffic reaches replica A; B serves none of it and still latches,
    because the verdict is the fleet's (a local guard on B would see nothing to judge)."""
    blue, green = pair
    a, b = fleet.replicas
    green.fault_rate = 1.0
    t0 = time.monotonic()
    async with background_load(a, 150, limit=30):
        (tb, db) = await _latched_after(b, t0, 20)
        await wait_latched(a, 10)
    print(f"replica B, which served no canary request, latched {tb:.2f} s after the fault")
    assert (await b.metrics()).get("turnout_requests_total", version="green") == 0
    assert db["rollback"]["evidence"]["canary"]["errors"] >= 20


async def test_prometheus_down_is_inconclusive_and_its_return_resumes_verdicts(pair, fleet: Fleet):
    blue, green = pair
    a, b = fleet.replicas
    await fleet.prometheus.stop()
    await eventually(lambda: fleet.all_sources_up(False), timeout=10)

    async def judged_down(replica: Proxy) -> bool:  # as of the replica's next tick
        doc = (await status(replica))["guard"]
        gauge = (await replica.metrics()).get("turnout_guard_source_up")
        return doc["state"] == "inconclusive" and bool(doc["source"]["last_error"]) and gauge == 0

    for replica in (a, b):
        await eventually(lambda r=replica: judged_down(r), timeout=5)
    # A failing canary while the source is down: inconclusive, never a breach.
    green.fault_rate = 1.0
    async with background_load(a, 100, limit=4), background_load(b, 100, limit=4):
        await asyncio.sleep(3.5)
    for replica in (a, b):
        doc = await status(replica)
        assert doc["rollback"]["active"] is False, doc["rollback"]
        assert doc["guard"]["state"] == "inconclusive"
    # Prometheus back (same data folder): both replicas judge again, and latch.
    await fleet.prometheus.start()
    async with background_load(a, 100, limit=30), background_load(b, 100, limit=30):
        await asyncio.gather(wait_latched(a, 20), wait_latched(b, 20))
    for replica in (a, b):
        source = (await status(replica))["guard"]["source"]
        assert source["up"] is True and source["last_error"] is None
        assert (await replica.metrics()).get("turnout_guard_source_up") == 1
