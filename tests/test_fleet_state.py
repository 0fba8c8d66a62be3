"""A fleet's release state in a real Redis (state.backend: redis, PRODUCT.md §11): an
action sent to any replica is in force in all, the rollout steps once for the fleet,
a dead lease holder is replaced, and an unreachable Redis loses nothing.

Every replica is a separate `python -m proxy run` process on its own ports with its
own state file; they share one redis-server on loopback (tests/fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from .conftest import Proxy, ProxyFactory, eventually
from .fleet import RedisServer
from .live import (
    admin,
    background_load,
    guard_config,
    run_cli,
    status,
    status_line,
    versions_seen,
)
from .support import FaultyUpstream
from .test_workers import all_latched, until_every_worker_served

pytestmark = pytest.mark.live

LEASE = 2.0  # seconds: how soon a dead rollout leader is replaced
GUARD = {"window": "10s", "min_requests": 3, "max_error_rate": 0.2, "on_breach": "rollback"}


class RedisFleet:
    """`count` replicas sharing one Redis under one key prefix."""

    def __init__(self, proxies: ProxyFactory, tmp_path: Path, count: int) -> None:
        self.redis = RedisServer(tmp_path)
        self.replicas: list[Proxy] = [proxies.new() for _ in range(count)]

    def config(self, blue: FaultyUpstream, green: FaultyUpstream, i: int, **extra) -> dict:
        cfg = guard_config(blue, green, weight=50, guard=GUARD, **extra)
        if "rollout" in cfg:
            del cfg["routing"]["weight"]  # the rollout owns the weight
        cfg["state_file"] = f"state-{i}.json"
        cfg["state"] = {
            "backend": "redis",
            "redis": {"url": self.redis.url, "key_prefix": "turnout:test:", "lease": f"{LEASE}s"},
        }
        return cfg

    async def start(self, blue: FaultyUpstream, green: FaultyUpstream, **extra) -> RedisFleet:
        await self.redis.start()
        for i, replica in enumerate(self.replicas):
            replica.write_config(self.config(blue, green, i, **extra))
            await replica.start()
        return self

    async def statuses(self, replicas: list[Proxy] | None = None) -> list[dict]:
        return [await status(r) for r in replicas or self.replicas]

    async def fleet_events(self, replica: Proxy) -> list[dict]:
        code, doc = await admin(replica, "GET", "/events", body=None)
        assert code == 200, doc
        return doc["events"]

    async def stop(self) -> None:
        await self.redis.stop()


@pytest.fixture
async def redis_fleet(proxies: ProxyFactory, tmp_path: Path):
    made: list[RedisFleet] = []

    def make(count: int) -> RedisFleet:
        f = RedisFleet(proxies, tmp_path, count)
        made.append(f)
        return f

    yield make
    for f in made:
        for replica in f.replicas:  # before Redis: a replica that outlives it only logs
            await replica.stop()
        await f.stop()
        print(f"--- redis log ---\n{f.redis.log()}")


async def _all_stable(replica: Proxy, n: int = 40) -> bool:
    """`n` random users over fresh connections all served by blue."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        seen = await versions_seen(s, replica, n)
    return seen == Counter({"blue": n})


# ------------------------------------------------------------------------------ actions


async def test_a_rollback_sent_to_one_replica_is_in_force_in_every_replica(pair, redis_fleet):
    blue, green = pair
    fleet = await redis_fleet(2).start(blue, green)
    a, b = fleet.replicas
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        assert (await versions_seen(s, b, 200))["green"] > 0  # weight 50: green serves
    code, out, err = await run_cli("rollback", "--admin", a.admin_url, "--reason", "bad build")
    assert code == 0, (out, err)
    t0 = time.monotonic()
    await eventually(lambda: _all_stable(b), timeout=1.0)
    print(f"rollback sent to replica A: replica B all-stable after {time.monotonic() - t0:.2f} s")
    docs = await fleet.statuses()
    for doc in docs:
        assert doc["rollback"]["active"] is True
        assert doc["rollback"]["reason"] == "bad build"
        assert doc["state"]["backend"] == "redis" and doc["state"]["up"] is True
    assert docs[0]["rollback"] == docs[1]["rollback"]  # the same latch, evidence and all
    outs = []
    for replica in (a, b):
        code, out, err = await run_cli("status", "--admin", replica.admin_url)
        assert code == 0, err
        state = status_line(out, "state:")  # one line, however it wrapped at 80 columns
        assert state.startswith(f"state: redis {fleet.redis.url} prefix turnout:test: — up"), out
        outs.append(status_line(out, "rollback latch"))
    assert outs[0] == outs[1] and "bad build" in outs[0]
    # The latch keeps the first evidence: a second rollback, to B, records nothing new.
    code, doc = await admin(b, "POST", "/rollback", body={"reason": "second opinion"})
    assert code == 200 and "already latched" in doc["detail"]
    assert (await status(a))["rollback"]["reason"] == "bad build"
    events = await fleet.fleet_events(b)
    assert [e["kind"] for e in events].count("rollback") == 1


# ------------------------------------------------------------------------------ rollout


def _rollout_feed(events: list[dict]) -> list[tuple[str, int]]:
    """The rollout's moves in the fleet's feed, oldest first."""
    return [(e["phase"], e["step"]) for e in reversed(events) if e["kind"] == "rollout"]


@pytest.mark.timeout(90)
async def test_three_replicas_walk_one_rollout_and_an_approval_given_to_any_holds(
    pair, redis_fleet
):
    blue, green = pair
    steps = [5, {"weight": 20, "approve": "product"}, 50, 100]
    fleet = await redis_fleet(3).start(blue, green, rollout={"interval": "1s", "steps": steps})
    a, b, c = fleet.replicas
    async with (
        background_load(a, 60, limit=60),
        background_load(b, 60, limit=60),
        background_load(c, 60, limit=60),
    ):

        async def all_awaiting() -> bool:
            return all(d["rollout"]["state"] == "awaiting_approval" for d in await fleet.statuses())

        await eventually(all_awaiting, timeout=30)
        leader = [d["state"]["leader"] for d in await fleet.statuses()]
        assert leader.count(True) == 1, leader
        # Approved through a replica that does not lead: every replica steps.
        follower = fleet.replicas[leader.index(False)]
        code, doc = await admin(follower, "POST", "/promote")
        assert code == 200, doc

        async def all_complete() -> bool:
            return all(d["rollout"]["state"] == "complete" for d in await fleet.statuses())

        await eventually(all_complete, timeout=40)
    docs = await fleet.statuses()
    assert len({json.dumps(d["rollout"], sort_keys=True) for d in docs}) == 1
    assert all(d["weight"]["effective"] == 100 for d in docs)
    feed = _rollout_feed(await fleet.fleet_events(c))
    # One move per step for the fleet, each once: 3 steps up (the approval's wait and
    # its promote are two moves at step 1), then complete.
    assert feed == [
        ("awaiting_approval", 1), ("progressing", 1), ("progressing", 2), ("progressing", 3),
        ("complete", 3),
    ], feed  # fmt: skip
    promotes = [e for e in await fleet.fleet_events(a) if e["kind"] == "admin"]
    assert [e["action"] for e in promotes] == ["promote"]


@pytest.mark.timeout(90)
async def test_a_dead_lease_holder_is_replaced_and_the_rollout_goes_on(pair, redis_fleet):
    blue, green = pair
    steps = [5, 10, 20, 30, 50, 100]
    fleet = await redis_fleet(3).start(blue, green, rollout={"interval": "1s", "steps": steps})
    loads = [background_load(r, 60, limit=60) for r in fleet.replicas]
    async with loads[0], loads[1], loads[2]:

        async def stepped_once() -> list[dict] | None:
            docs = await fleet.statuses()
            return docs if all(d["rollout"]["step"] >= 1 for d in docs) else None

        docs = await eventually(stepped_once, timeout=20)
        holder = next(i for i, d in enumerate(docs) if d["state"]["leader"])
        dead = fleet.replicas[holder]
        step_at_kill = max(d["rollout"]["step"] for d in docs)
        dead.proc.kill()  # SIGKILL: no lease handed on
        await asyncio.to_thread(dead.proc.wait, 5)
        t0 = time.monotonic()
        alive = [r for i, r in enumerate(fleet.replicas) if i != holder]

        async def new_leader() -> bool:
            return any(d["state"]["leader"] for d in await fleet.statuses(alive))

        await eventually(new_leader, timeout=LEASE + 2.0)
        took = time.monotonic() - t0
        print(f"lease holder killed: a new one leads after {took:.2f} s (lease {LEASE} s)")

        async def moved_on() -> bool:
            return all(d["rollout"]["step"] > step_at_kill for d in await fleet.statuses(alive))

        await eventually(moved_on, timeout=20)
    feed = _rollout_feed(await fleet.fleet_events(alive[0]))
    assert len(feed) == len(set(feed)), feed  # no step taken twice, before or after


# --------------------------------------------------------------------------- Redis down


@pytest.mark.timeout(90)
async def test_redis_down_keeps_the_latch_refuses_promote_and_loses_nothing(pair, redis_fleet):
    blue, green = pair
    steps = [50, {"weight": 100, "approve": "product"}]  # step 0 holds weight 50 for 60 s
    fleet = await redis_fleet(2).start(blue, green, rollout={"interval": "60s", "steps": steps})
    a, b = fleet.replicas
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        assert (await versions_seen(s, b, 100))["green"] > 0
    code, doc = await admin(a, "POST", "/rollback", body={"reason": "before the outage"})
    assert code == 200, doc

    async def b_latched() -> bool:
        return (await status(b))["rollback"]["active"]

    await eventually(b_latched, timeout=2)
    await fleet.redis.stop()

    async def both_down() -> bool:
        return all(d["state"]["up"] is False for d in await fleet.statuses())

    await eventually(both_down, timeout=5)
    for replica in (a, b):
        assert await _all_stable(replica)
        assert (await status(replica))["rollback"]["active"] is True
        code, doc = await admin(replica, "POST", "/promote")
        assert code == 503, doc
        assert "redis is unreachable" in doc["error"]
        metrics = await replica.metrics()
        assert metrics.get("turnout_state_backend_up") == 0
    # Pause still works here (written when Redis is back), and is audited.
    code, doc = await admin(b, "POST", "/pause")
    assert code == 200, doc
    await fleet.redis.start()

    async def consistent() -> list[dict] | None:
        """Both reach Redis, have written what they did meanwhile, and show one state."""
        docs = await fleet.statuses()
        settled = all(d["state"]["up"] and not d["state"]["unwritten"] for d in docs)
        same = all(d["rollout"]["state"] == "paused" for d in docs)
        return docs if settled and same else None

    docs = await eventually(consistent, timeout=5)
    for doc in docs:
        assert doc["rollback"]["active"] is True
        assert doc["rollback"]["reason"] == "before the outage"
    for replica in (a, b):
        assert await _all_stable(replica)
    # Nothing lost from the fleet's audit log: the rollback, both refused promotes and
    # the pause (each replica's lines in its order; the two replicas' may interleave).
    entries = [json.loads(line) for line in await fleet.redis.lrange("turnout:test:audit")]
    got = [(e["action"], e["outcome"]) for e in entries]
    assert got[0] == ("rollback", "ok"), got
    assert Counter(got) == Counter(
        {("rollback", "ok"): 1, ("promote", "refused 503"): 2, ("pause", "ok"): 1}
    ), got


# ------------------------------------------------------------------------------- workers


@pytest.mark.timeout(60)
async def test_workers_on_one_host_share_the_fleet_state(pair, redis_fleet, proxies):
    """A replica run with `--workers 2` beside a plain one: the leading worker takes
    the fleet's state from Redis and pushes it to its follower, as with the file."""
    blue, green = pair
    fleet = redis_fleet(1)
    await fleet.start(blue, green)
    (plain,) = fleet.replicas
    workers = proxies.new()
    workers.write_config(fleet.config(blue, green, 9))
    await workers.start(env={"TURNOUT_WORKERS": "2"})

    async def both_workers() -> bool:
        return len((await status(workers))["workers"]["members"]) == 2

    await eventually(both_workers, timeout=10)
    code, doc = await admin(plain, "POST", "/rollback", body={"reason": "from the plain one"})
    assert code == 200, doc
    await all_latched(workers)
    await until_every_worker_served(workers, "blue")
    assert (await status(workers))["rollback"]["reason"] == "from the plain one"
    code, doc = await admin(workers, "POST", "/resume")
    assert code == 200, doc

    async def plain_resumed() -> bool:
        return (await status(plain))["rollback"]["active"] is False

    await eventually(plain_resumed, timeout=2)
    await all_latched(workers, False)
