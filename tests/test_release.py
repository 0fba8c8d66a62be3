"""Rollouts over real loopback sockets: steps walked to `complete`, an approval step
with admin tokens and the audit log, pause and resume, the CLI, rings of cohorts as
steps (PRODUCT.md §3, §6, §7, §8, §13)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import aiohttp
import pytest

from proxy.routing import bucket

from .conftest import Proxy, ProxyFactory, eventually
from .live import (
    admin,
    audit_lines,
    background_load,
    guard_config,
    run_cli,
    state_doc,
    status,
    wait_latched,
    write_with_tokens,
)

pytestmark = pytest.mark.live

# A guard that judges a healthy canary healthy after a few requests: a step needs
# `min_requests` canary requests and evidence that the canary is under its budget; at
# 20% that takes 17 error-free canary requests (~2 s at weight 5 and 200 req/s), at
# the default 2% 189.
GUARD = {"window": "10s", "min_requests": 3, "max_error_rate": 0.2, "on_breach": "rollback"}
SECRETS = {
    "TURNOUT_TOKEN_ENG": "eng-5ecret-token",
    "TURNOUT_TOKEN_PAT": "pat-5ecret-token",
    "TURNOUT_TOKEN_VIEW": "view-5ecret-token",
}
TOKENS = [
    {"name": "ci-bot", "token_env": "TURNOUT_TOKEN_ENG", "roles": ["engineer"]},
    {"name": "pat", "token_env": "TURNOUT_TOKEN_PAT", "roles": ["product"]},
    {"name": "dashboard", "token_env": "TURNOUT_TOKEN_VIEW", "roles": []},
]
ENG, PAT, VIEW = (
    SECRETS["TURNOUT_TOKEN_ENG"],
    SECRETS["TURNOUT_TOKEN_PAT"],
    SECRETS["TURNOUT_TOKEN_VIEW"],
)


def rollout_config(blue, green, steps: list, interval: str) -> dict:
    cfg = guard_config(blue, green, guard=GUARD, rollout={"interval": interval, "steps": steps})
    del cfg["routing"]["weight"]  # the rollout owns the weight
    return cfg


async def start_with_tokens(proxies: ProxyFactory, cfg: dict) -> Proxy:
    proxy = proxies.new()
    write_with_tokens(proxy, cfg, TOKENS)
    return await proxy.start(env=SECRETS)


async def in_state(proxy: Proxy, state: str, token: str | None = None, **expect) -> dict | None:
    doc = await status(proxy, token)
    ro = doc["rollout"]
    ok = ro["state"] == state and all(ro[k] == v for k, v in expect.items())
    return doc if ok else None


# ----------------------------------------------------------------------- the walk


@pytest.mark.timeout(60)
async def test_healthy_canary_walks_every_step_to_complete(pair, proxies: ProxyFactory):
    blue, green = pair
    proxy = await proxies.start(rollout_config(blue, green, [5, 10, 50, 100], "1s"))
    observed: list[tuple[int, int, float, float]] = []  # step, weight, metric step, metric w
    async with background_load(proxy, 200, limit=30, seed=3) as load:

        async def walk():
            doc = await status(proxy)
            ro = doc["rollout"]
            if not observed or observed[-1][0] != ro["step"]:
                m = await proxy.metrics()
                assert doc["weight"]["effective"] == ro["weight"]
                observed.append((ro["step"], ro["weight"], m.get("turnout_rollout_step"),
                                 m.get("turnout_canary_weight")))  # fmt: skip
            return doc if ro["state"] == "complete" else None

        doc = await eventually(walk, timeout=25, interval=0.05)
    print(f"rollout walk: (step, weight, turnout_rollout_step, turnout_canary_weight) {observed}")
    assert [(s, w) for s, w, _, _ in observed] == [(0, 5), (1, 10), (2, 50), (3, 100)]
    assert [ms for _, _, ms, _ in observed] == [0, 1, 2, 3]
    # the metric can be read just after the status: the step's weight or the next one's
    assert all(mw in (w, nxt) for (_, w, _, mw), nxt in
               zip(observed, [10, 50, 100, 100], strict=True))  # fmt: skip
    assert doc["rollout"]["step"] == 3 and doc["weight"]["effective"] == 100
    assert state_doc(proxy)["rollout"]["phase"] == "complete"
    assert not doc["rollback"]["active"] and doc["guard"]["state"] == "healthy"
    assert all(s.status == 200 for s in load.samples)
    # complete: everyone on the canary
    versions = {s.version for s in load.samples[-50:]}
    assert versions == {"green"}
    _, body = await admin(proxy, "GET", "/events?limit=100")
    phases = [(e["phase"], e["step"]) for e in body["events"] if e["kind"] == "rollout"]
    assert phases[::-1] == [("progressing", 1), ("progressing", 2), ("progressing", 3),
                            ("complete", 3)]  # fmt: skip
    assert (await proxy.metrics()).get("turnout_rollout_step") == 3


@pytest.mark.timeout(60)
async def test_a_canary_too_quiet_to_judge_does_not_advance_and_status_says_why(
    pair, proxies: ProxyFactory
):
    """Weight 1 at 50 req/s: about one canary request in two seconds. The step's dwell
    (1 s) and min_requests (3) pass, but a handful of clean requests is not evidence
    that the canary is under a 2% budget: the rollout stays at step 0 and says so."""
    blue, green = pair
    cfg = rollout_config(blue, green, [1, 100], "1s")
    cfg["guard"] = {**GUARD, "max_error_rate": 0.02}
    proxy = await proxies.start(cfg)
    async with background_load(proxy, 50, limit=20, seed=4):

        async def enough_served():
            doc = await status(proxy)
            cum = (doc["guard"]["evidence"] or {}).get("cumulative") or {}
            served = cum.get("tests", {}).get("error_rate", {}).get("total", 0)
            return doc if served >= 4 else None

        doc = await eventually(enough_served, 20, interval=0.2)
    ro = doc["rollout"]
    assert (ro["state"], ro["step"], doc["weight"]["effective"]) == ("progressing", 0, 1)
    evidence = [w for w in ro["waiting_for"] if w.startswith("evidence")]
    assert len(evidence) == 1 and "more canary requests to promote" in evidence[0], ro
    assert not any(w.startswith("the step's dwell") for w in ro["waiting_for"]), ro
    assert not doc["rollback"]["active"]
    rc, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert rc == 0 and "waiting for evidence that the canary is under its limits" in out, out


# ------------------------------------------------------------------------ approval


@pytest.mark.timeout(60)
async def test_approval_step_needs_the_role_and_everything_is_audited(pair, proxies: ProxyFactory):
    blue, green = pair
    cfg = rollout_config(blue, green, [5, {"weight": 50, "approve": "product"}, 100], "500ms")
    proxy = await start_with_tokens(proxies, cfg)
    async with background_load(proxy, 200, limit=40, seed=5):
        doc = await eventually(lambda: in_state(proxy, "awaiting_approval", VIEW, step=1), 10)
        assert doc["rollout"]["awaiting"] == "product"
        assert doc["rollout"]["weight"] == 5 and doc["weight"]["effective"] == 5
        await asyncio.sleep(0.8)  # past the interval: it keeps waiting
        assert await in_state(proxy, "awaiting_approval", VIEW, step=1)

        # Refused: no token, a wrong token (401); a token without the role (403).
        refusals = [(None, 401), ("not-a-token", 401), (f"{ENG}x", 401), (ENG, 403), (VIEW, 403)]
        for token, expected in refusals:
            code, body = await admin(proxy, "POST", "/promote", token)
            assert code == expected, (token, body)
            assert isinstance(body, dict) and body["error"]
            assert await in_state(proxy, "awaiting_approval", VIEW, step=1), token
        assert state_doc(proxy)["rollout"]["phase"] == "awaiting_approval"
        code, body = await admin(proxy, "GET", "/status")
        assert code == 401 and body["error"]  # viewing needs a token too

        # The product token promotes, through the CLI.
        rc, out, err = await run_cli("promote", "--admin", proxy.admin_url, "--token", PAT)
        assert rc == 0, err
        assert "promote: ok (by pat)" in out and "rollout progressing step 1" in out
        doc = await status(proxy, VIEW)
        assert doc["rollout"]["weight"] == 50 and doc["weight"]["effective"] == 50
        # then on to 100 by itself
        doc = await eventually(lambda: in_state(proxy, "complete", VIEW, step=2), 10)
        assert doc["weight"]["effective"] == 100

    # The CLI without a token is refused like any caller.
    rc, out, err = await run_cli("pause", "--admin", proxy.admin_url)
    assert rc == 1 and "HTTP 401" in err and "TURNOUT_TOKEN" in err  # says how to pass one

    audit = [(a["actor"], a["action"], a["outcome"]) for a in audit_lines(proxy)]
    assert audit == [
        ("anonymous", "promote", "refused 401"),
        ("anonymous", "promote", "refused 401"),
        ("anonymous", "promote", "refused 401"),
        ("ci-bot", "promote", "refused 403"),
        ("dashboard", "promote", "refused 403"),
        ("anonymous", "GET /status", "refused 401"),  # refused reads are audited too
        ("pat", "promote", "ok"),
        ("anonymous", "pause", "refused 401"),
    ]
    assert all(a["at"] for a in audit_lines(proxy))
    code, body = await admin(proxy, "GET", "/events?limit=200", VIEW)
    assert code == 200
    actions = [(e["actor"], e["action"], e["outcome"]) for e in body["events"]
               if e["kind"] == "admin"]  # fmt: skip
    assert actions == [a for a in audit if not a[1].startswith("GET ")][::-1]  # newest first
    events = body["events"]
    done = next(i for i, e in enumerate(events) if e["kind"] == "rollout")
    approved = next(i for i, e in enumerate(events) if e.get("actor") == "pat")
    assert events[done]["phase"] == "complete" and done < approved  # newer: nearer the top
    stamps = [e["at"] for e in body["events"]]
    assert stamps == sorted(stamps, reverse=True)


# --------------------------------------------------------------------- pause/resume


@pytest.mark.timeout(60)
async def test_pause_freezes_and_resume_continues(pair, proxies: ProxyFactory):
    blue, green = pair
    proxy = await start_with_tokens(proxies, rollout_config(blue, green, [10, 50, 100], "1s"))
    async with background_load(proxy, 200, limit=40, seed=9) as load:
        # The brake: any token may pull it, a viewer's too (through the CLI).
        rc, out, err = await run_cli("pause", "--admin", proxy.admin_url, "--token", VIEW)
        assert rc == 0, err
        assert "pause: ok (by dashboard)" in out and "rollout paused step 0" in out
        sent = len(load.samples)
        await asyncio.sleep(2.0)  # twice the interval, with traffic: frozen
        # traffic enough to have moved it on (however fast the load goes here)
        await eventually(lambda: len(load.samples) - sent > 200, timeout=10)
        doc = await eventually(lambda: in_state(proxy, "paused", VIEW, step=0), 1)
        assert doc["weight"]["effective"] == 10
        recent = {s.version for s in load.samples[sent:]}
        assert recent == {"blue", "green"}  # still split at the paused step's weight
        assert state_doc(proxy)["rollout"]["phase"] == "paused"

        # Resuming needs a role other than viewer.
        code, _ = await admin(proxy, "POST", "/resume", VIEW)
        assert code == 403
        assert await in_state(proxy, "paused", VIEW, step=0)
        code, body = await admin(proxy, "POST", "/resume", ENG)
        assert code == 200 and body["status"]["rollout"]["state"] == "progressing"
        await eventually(lambda: in_state(proxy, "progressing", VIEW, step=1), 10)

        # Promote while progressing: the next step at once, skipping the dwell.
        code, body = await admin(proxy, "POST", "/promote", ENG)
        assert code == 200, body
        assert body["status"]["rollout"]["step"] == 2
        assert body["status"]["rollout"]["weight"] == 100
        await eventually(lambda: in_state(proxy, "complete", VIEW, step=2), 10)
        # Nothing left to promote or pause.
        code, body = await admin(proxy, "POST", "/promote", ENG)
        assert code == 409 and "complete" in body["error"]
        code, body = await admin(proxy, "POST", "/pause", ENG)
        assert code == 409
    outcomes = [(a["actor"], a["action"], a["outcome"]) for a in audit_lines(proxy)]
    assert outcomes == [
        ("dashboard", "pause", "ok"),
        ("dashboard", "resume", "refused 403"),
        ("ci-bot", "resume", "ok"),
        ("ci-bot", "promote", "ok"),
        ("ci-bot", "promote", "refused 409"),
        ("ci-bot", "pause", "refused 409"),
    ]


# ------------------------------------------------------------------------- restarts


@pytest.mark.timeout(60)
async def test_rollout_progress_survives_a_restart_and_keeps_moving(pair, proxies: ProxyFactory):
    """kill -9 mid-rollout: the new process resumes the same step (and says so in
    turnout_rollout_step), and the step's request count starts again in the new
    process rather than waiting for the dead process's counter to be matched."""
    blue, green = pair
    steps = [{"weight": 50, "interval": "4s"}, 60, 100]
    cfg = rollout_config(blue, green, steps, "1s")
    cfg["guard"] = {**GUARD, "min_requests": 20}
    proxy = await proxies.start(cfg)
    async with background_load(proxy, 200, limit=40, seed=11):
        await eventually(lambda: in_state(proxy, "progressing", step=1), 10)
        code, _ = await admin(proxy, "POST", "/pause")
        assert code == 200
        proxy.signal(9)
        assert await proxy.wait(5) is not None
        saved = state_doc(proxy)["rollout"]
        assert saved["phase"] == "paused" and saved["step"] == 1
        assert saved["step_base_requests"] > 300  # the dead process's canary count

        proxy = proxies.new(proxy.config_path)
        proxy.write_config(cfg)
        await proxy.start()
    doc = await status(proxy)
    assert doc["rollout"]["state"] == "paused" and doc["rollout"]["step"] == 1
    assert doc["weight"]["effective"] == 60
    m = await proxy.metrics()
    assert m.get("turnout_rollout_step") == 1 and m.get("turnout_canary_weight") == 60

    async with background_load(proxy, 200, limit=40, seed=12):
        code, _ = await admin(proxy, "POST", "/resume")
        assert code == 200
        # a 1 s dwell and 20 canary requests (~0.2 s at 120/s): well within 2.5 s
        doc = await eventually(lambda: in_state(proxy, "progressing", step=2), 2.5)
    assert doc["weight"]["effective"] == 100
    assert (await proxy.metrics()).get("turnout_rollout_step") == 2


# ---------------------------------------------------------------------------- rings

INTERNAL = [f"staff-{i}" for i in range(8)]
BETA = [f"beta-{i}" for i in range(8)]
EVERYONE = [f"user-{i}" for i in range(160)]


def ring_config(blue, green) -> dict:
    steps = [{"cohorts": ["internal"]}, {"cohorts": ["internal", "beta"]}, 10, 100]
    cfg = rollout_config(blue, green, steps, "5s")
    cfg["routing"]["cohorts"] = {"internal": {"keys": INTERNAL}, "beta": {"keys": BETA}}
    return cfg


class UserLoad:
    """Named users in a shuffled round, `rate` requests a second in all; for each request
    the time it went out, its user, status and the version that answered."""

    def __init__(self, proxy: Proxy, rate: float, seed: int) -> None:
        self.proxy, self.rate = proxy, rate
        users = INTERNAL + BETA + EVERYONE
        random.Random(seed).shuffle(users)
        self.users = users
        self.samples: list[tuple[float, str, int, str | None]] = []

    async def run(self, stop: asyncio.Event, limit: float) -> None:
        loop = asyncio.get_running_loop()
        t0, tasks = loop.time(), set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for i in range(int(limit * self.rate)):  # bounded in count and so in time
                if stop.is_set():
                    break
                await asyncio.sleep(max(0.0, t0 + i / self.rate - loop.time()))
                task = loop.create_task(self.one(session, self.users[i % len(self.users)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=5)

    async def one(self, session: aiohttp.ClientSession, user: str) -> None:
        sent = time.monotonic()
        try:
            async with session.get(self.proxy.url + "/", headers={"X-User-Id": user}) as r:
                await r.read()
                self.samples.append((sent, user, r.status, r.headers.get("X-Turnout-Version")))
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.samples.append((sent, user, 0, None))

    def on_canary(self, since: float) -> set[str]:
        return {u for sent, u, _, v in self.samples if sent > since and v == "green"}

    def seen(self, since: float) -> set[str]:
        return {u for sent, u, _, v in self.samples if sent > since and v is not None}


@contextlib.asynccontextmanager
async def user_load(proxy: Proxy, rate: float, seed: int, limit: float = 80.0):
    load, stop = UserLoad(proxy, rate, seed), asyncio.Event()
    task = asyncio.get_running_loop().create_task(load.run(stop, limit))
    try:
        yield load
    finally:
        stop.set()
        await task


async def paused_at(proxy: Proxy, step: int) -> float:
    """Wait for the rollout to enter `step`, pause it there (a step dwells 5 s, so the
    pause lands in it), and return the time after which requests see that step only."""
    await eventually(lambda: in_state(proxy, "progressing", step=step), 30, interval=0.05)
    code, body = await admin(proxy, "POST", "/pause")
    assert code == 200 and body["status"]["rollout"]["step"] == step, body
    return time.monotonic()


async def served_everyone(load: UserLoad, since: float) -> None:
    total = len(load.users)
    await eventually(lambda: len(load.seen(since)) == total, 15)


@pytest.mark.timeout(120)
async def test_a_rollout_walks_its_rings_then_its_weights(pair, proxies: ProxyFactory):
    """[{cohorts: [internal]}, {cohorts: [internal, beta]}, 10, 100]: step 0 puts exactly
    the internal users on the canary, step 1 beta as well, step 2 10% of everyone on top
    of both rings; each step advances on its own evidence."""
    blue, green = pair
    proxy = await proxies.start(ring_config(blue, green))
    explain = {}
    async with user_load(proxy, 150, seed=21) as load:
        since = await paused_at(proxy, 0)
        doc = await status(proxy)
        assert doc["rollout"]["rings"] == ["internal"] and doc["rollout"]["weight"] == 0
        assert doc["rollout"]["step_rings"] == [["internal"], ["internal", "beta"], [], []]
        await served_everyone(load, since)
        assert load.on_canary(since) == set(INTERNAL)
        explain[0] = [await proxy.explain(key=k) for k in (INTERNAL[0], BETA[0])]
        rc, out, err = await run_cli("status", "--admin", proxy.admin_url)
        assert rc == 0 and "weight 0% plus ring internal" in out, (out, err)

        code, _ = await admin(proxy, "POST", "/resume")
        assert code == 200
        since = await paused_at(proxy, 1)
        assert (await status(proxy))["rollout"]["rings"] == ["internal", "beta"]
        await served_everyone(load, since)
        assert load.on_canary(since) == set(INTERNAL + BETA)
        explain[1] = [await proxy.explain(key=k) for k in (INTERNAL[0], BETA[0])]

        code, _ = await admin(proxy, "POST", "/resume")
        since = await paused_at(proxy, 2)
        await served_everyone(load, since)
        weighted = {u for u in EVERYONE if bucket("green", u) <= 10}
        assert 0 < len(weighted) < len(EVERYONE)
        assert load.on_canary(since) == set(INTERNAL + BETA) | weighted
        code, _ = await admin(proxy, "POST", "/resume")
        await eventually(lambda: in_state(proxy, "complete", step=3), 30)
    reasons = [[(e["version"], e["reason"]) for e in pair_] for pair_ in explain.values()]
    assert reasons == [
        [("green", "ring:internal"), ("blue", "weight")],
        [("green", "ring:internal"), ("green", "ring:beta")],
    ]
    m = await proxy.metrics()
    assert m.get("turnout_route_decisions_total", version="green", reason="ring:internal") > 0
    assert m.get("turnout_route_decisions_total", version="green", reason="ring:beta") > 0
    assert all(status_ == 200 for _, _, status_, _ in load.samples)


@pytest.mark.timeout(60)
async def test_a_failing_canary_in_the_first_ring_latches_before_anyone_else_sees_it(
    pair, proxies: ProxyFactory
):
    blue, green = pair
    green.fault_rate = 0.5
    proxy = await proxies.start(ring_config(blue, green))
    async with user_load(proxy, 150, seed=22) as load:
        doc = await wait_latched(proxy, timeout=20)
        latched_at = time.monotonic()
        await asyncio.sleep(0.5)
    assert doc["rollback"]["actor"] == "guard" and doc["rollout"]["step"] == 0
    on_canary = {u for _, u, _, v in load.samples if v == "green"}
    assert on_canary and on_canary <= set(INTERNAL)  # no one outside the first ring
    failed = {u for _, u, s, v in load.samples if s >= 500}
    assert failed <= set(INTERNAL)
    after = [v for sent, _, _, v in load.samples if sent > latched_at + 0.2]
    assert after and set(after) == {"blue"}
    rc, out, err = await run_cli("status", "--admin", proxy.admin_url)
    assert rc == 0 and "rollback latch: SET" in out, (out, err)
    assert "weight 0%," in out and "plus ring" not in out  # the latch holds the ring too
