"""The guarded release that `turnout demo` plays after its hot-reload phases.

Script (each phase waits for what it announces, with a deadline):
1. A new build of green ("2.0") with a `guard` and a `rollout` is written into
   the config file: the rollout walks its steps on its own, each on evidence that
   green is under its budget, starting with a ring (the internal users only).
2. It stops at the step that needs role `product`: an `engineer` token is
   refused (403), the `product` token approves it.
3. A fault is injected into green (half its answers are 500): the guard
   latches the rollback; the demo prints the seconds it took and the evidence.
4. A fixed build ("2.0.1") is written into the file: the new release clears
   the latch and the rollout starts over, gets approved and completes.
Everything goes through the same paths an operator uses: the config file,
the admin API with bearer tokens, and /status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from typing import Any

import aiohttp

from .demo import (
    ARROW,
    BAD,
    DEFAULT_DURATION,
    HOST,
    OK,
    PHASES,
    Demo,
    DemoError,
    Phase,
    main,
    ports_from_env,
    say,
)

PRODUCT_ENV, ENGINEER_ENV = "TURNOUT_DEMO_TOKEN_PRODUCT", "TURNOUT_DEMO_TOKEN_ENGINEER"
# A ring of internal users first; the 50% step dwells a minute: the fault arrives there;
# the fixed build is promoted past it.
INTERNAL = [f"user-{n}" for n in range(1, 5)]  # four of the demo's users: the employees
STEPS: list[Any] = [
    {"cohorts": ["internal"]},
    10,
    25,
    {"weight": 50, "approve": "product", "interval": "1m"},
    100,
]
WAIT = 30.0  # seconds any one expected change may take before the demo reports a failure
# A 5% budget: a step needs 75 error-free canary requests as evidence that the canary is
# under it (~5 s at weight 10 and the demo's 200 req/s), where 2% would need 189.
GUARD = {
    "window": "10s",
    "min_requests": 20,
    "max_error_rate": 0.05,
    "relative_to_stable": True,
    "on_breach": "rollback",
}


def release_phases() -> list[Phase]:
    """Phases with share 0: each runs until what it waits for has happened."""
    return [
        Phase("a dark launch: weight 0, every GET copied to green and compared", 0, dark_launch),
        Phase("a guarded release of green 2.0: the rollout steps up on its own", 0, step_up),
        Phase("an approval step: only role product may promote", 0, approve),
        Phase("a fault in green: half its answers are 500", 0, fault),
        Phase("a fixed build, 2.0.1: the latch clears, the rollout completes", 0, fixed),
    ]


def tokens() -> dict[str, str]:
    """Bearer tokens for the demo, put where the config's token_env points."""
    for env in (PRODUCT_ENV, ENGINEER_ENV):
        os.environ.setdefault(env, secrets.token_urlsafe(18))
    return {"product": os.environ[PRODUCT_ENV], "engineer": os.environ[ENGINEER_ENV]}


async def post(demo: Demo, action: str, token: str, body: dict | None = None) -> tuple[int, Any]:
    assert demo.session is not None
    url = f"http://{HOST}:{demo.ports.admin}/{action}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with demo.session.post(url, json=body or {}, headers=headers) as resp:
            return resp.status, await resp.json()
    except (TimeoutError, aiohttp.ClientError, ValueError) as err:
        return 0, {"error": str(err)}


async def watch(demo: Demo, want, what: str) -> dict | None:
    """Poll /status (with the product token) until `want(doc)`; report rollout moves."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        doc = await demo.status()
        if doc is not None:
            ro = doc["rollout"]
            now = (ro["state"], ro["step"], doc["weight"]["effective"])
            if now != demo.rollout_seen and ro["state"] != "none":
                demo.rollout_seen = now
                waiting = f", waiting for role {ro['awaiting']}" if ro.get("awaiting") else ""
                rings = ", ".join(ro.get("rings") or ())
                in_force = rings and now[2] < 100 and not doc["rollback"]["active"]
                ring = f" plus ring {rings}" if in_force else ""
                demo.event(f"rollout {ro['state']}: step {ro['step']}, weight {now[2]}%"
                           f"{ring}{waiting}")  # fmt: skip
            evidence = [w for w in ro.get("waiting_for") or () if w.startswith("evidence")]
            if evidence and demo.evidence_seen != now:
                demo.evidence_seen = now  # once per step: what it waits for before it moves on
                say(f"           waiting for {evidence[0]}")
            if want(doc):
                return doc
        await asyncio.sleep(0.1)
    demo.problem(f"{what} did not happen within {WAIT:.0f} s")
    return None


def write_release(demo: Demo, release: str) -> None:
    cfg = demo.cfg
    cfg["versions"][demo.canary]["release"] = release
    cfg["guard"] = dict(GUARD)
    cfg["rollout"] = {"interval": "2s", "steps": STEPS}
    cfg["admin"]["tokens"] = [
        {"name": "pat", "token_env": PRODUCT_ENV, "roles": ["product"]},
        {"name": "ci-bot", "token_env": ENGINEER_ENV, "roles": ["engineer"]},
    ]
    cfg["routing"].pop("weight", None)  # the rollout owns the weight now
    cfg["routing"]["cohorts"] = {"internal": {"keys": INTERNAL}}
    cfg.pop("mirror", None)  # users see green now; the dark launch is over
    demo.write_config()


def describe(step: Any) -> str:
    """A step as people say it: 10%, ring internal, 50% (approve: product)."""
    if isinstance(step, int):
        return f"{step}%"
    parts = [f"ring {'+'.join(step['cohorts'])}"] if step.get("cohorts") else []
    if "weight" in step:
        parts.append(f"{step['weight']}%")
    text = " + ".join(parts)
    return f"{text} (approve: {step['approve']})" if step.get("approve") else text


async def dark_launch(demo: Demo, seconds: float) -> None:
    cfg = demo.cfg
    cfg["routing"]["weight"] = 0
    cfg["mirror"] = {"percent": 100, "compare": {"ignore_json_fields": ["version"]}}
    demo.write_config()
    demo.event("config file rewritten: weight 0, mirror 100% of GETs to green, compare answers "
               "(ignoring the field `version`)")  # fmt: skip
    doc = await watch(demo, lambda d: (d.get("mirror") or {}).get("matched", 0) >= 50, "matches")
    await asyncio.sleep(1.0)
    demo.load.forget_moves()  # weight 0 sent everyone back to blue on purpose
    if doc is None:
        return
    on = demo.load.on(demo.canary)
    m = doc["mirror"]
    demo.event(f"{OK} {m['sent']} copies sent, {m['matched']} matched, {m['mismatched']} "
               f"mismatched; {on} users on {demo.canary} (none should be)")  # fmt: skip
    if on:
        demo.problem(f"{on} users were served by {demo.canary} during the dark launch")
    green = demo.upstreams[demo.canary]
    green.quirk = True
    demo.event(f"{BAD} green 2.0-rc changes the cart total it answers (a bug only a diff shows)")
    doc = await watch(demo, lambda d: d["mirror"]["mismatched"] > 0, "a mismatch")
    green.quirk = False
    if doc is not None:
        x = doc["mirror"]["latest_mismatches"][0]
        paths = ", ".join(x["detail"].get("paths", [])) or x["difference"]
        demo.event(f"{OK} mismatch caught: {x['request']} — {x['difference']} differs at {paths} "
                   f"(status {x['primary_status']} vs {x['shadow_status']})")  # fmt: skip
        demo.event("green fixed; users never saw it. Now the real release:")


async def step_up(demo: Demo, seconds: float) -> None:
    demo.bearer = tokens()["product"]
    write_release(demo, "2.0")
    demo.event(f"config file rewritten: {demo.canary} release 2.0, guard and rollout "
               f"steps {', '.join(map(describe, STEPS))}")  # fmt: skip
    if await watch(demo, lambda d: d["rollout"]["state"] != "none", "the rollout's start"):
        demo.event(f"a new release starts with a ring: only the internal users "
                   f"({', '.join(INTERNAL)}) are on {demo.canary}")  # fmt: skip
        await asyncio.sleep(1.0)
        demo.load.forget_moves()
    await watch(demo, lambda d: d["rollout"]["state"] == "awaiting_approval", "the approval step")


async def approve(demo: Demo, seconds: float) -> None:
    keys = tokens()
    status, doc = await post(demo, "promote", keys["engineer"])
    if status == 403:
        demo.event(f"{OK} promote by ci-bot (role engineer) refused: 403 {doc.get('error')}")
    else:
        demo.problem(f"promote by a token without role product answered {status}")
    await asyncio.sleep(1.0)
    status, doc = await post(demo, "promote", keys["product"])
    if status != 200:
        demo.problem(f"promote by pat (role product) answered {status}: {doc.get('error')}")
        return
    demo.event(f"{OK} promote by pat (role product): approved")
    step = next(i for i, s in enumerate(STEPS) if isinstance(s, dict) and s.get("approve"))
    await watch(demo, lambda d: d["rollout"]["step"] == step and d["weight"]["effective"] == 50,
                "weight 50%")  # fmt: skip
    await asyncio.sleep(2.0)  # let users settle on 50%; the step dwells a minute


async def fault(demo: Demo, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    green = demo.upstreams[demo.canary]
    green.fault_rate = 0.5
    started, served_before = loop.time(), green.faults
    demo.event(f"{BAD} fault injected into {demo.canary}: 50% of its answers are now 500")
    doc = await watch(demo, lambda d: d["rollback"]["active"], "the rollback")
    if doc is None:
        return
    took, failed = loop.time() - started, green.faults - served_before
    demo.event(
        f"{OK} guard rolled back to {demo.stable} {took:.1f} s after the fault; "
        f"{failed} user requests failed on {demo.canary} meanwhile"
    )
    for line in evidence_lines(doc["rollback"]):
        say(f"           {line}")
    await asyncio.sleep(2.0)
    demo.load.forget_moves()  # everyone is back on blue: that is the rollback, not a flip
    on = demo.load.on(demo.canary)
    if on:
        demo.problem(f"{on} users still on {demo.canary} 2 s after the rollback")
    else:
        demo.event(f"{OK} every user is on {demo.stable}; weight 0% while the latch is set")


def evidence_lines(rollback: dict) -> list[str]:
    ev = rollback.get("evidence") or {}
    c, s = ev.get("canary", {}), ev.get("stable", {})
    lines = [f"reason: {rollback.get('reason')}"]
    if c and s:
        lines.append(
            f"window: canary {c['errors']}/{c['requests']} errors ({100 * c['error_rate']:.1f}%), "
            f"stable {s['errors']}/{s['requests']} ({100 * s['error_rate']:.1f}%)"
        )
    if ev.get("speed") == "cumulative":  # the slow speed fired first: its summary says why
        lines.append(str((ev.get("cumulative") or {}).get("summary")))
        return lines
    for name, test in (ev.get("tests") or {}).items():
        if test.get("breach"):
            lines.append(f"test {name}: {test['test']}, p = {test['p_value']:.2g} "
                         f"< alpha {ev.get('thresholds', {}).get('alpha')}")  # fmt: skip
    return lines


async def fixed(demo: Demo, seconds: float) -> None:
    demo.upstreams[demo.canary].fault_rate = 0.0
    write_release(demo, "2.0.1")
    demo.event(f"config file rewritten: {demo.canary} release 2.0 {ARROW} 2.0.1 (the fix)")
    doc = await watch(demo, lambda d: not d["rollback"]["active"], "the latch clearing")
    if doc is None:
        return
    demo.event(f"{OK} new release: rollback latch cleared, rollout restarted at step 0")
    if await watch(demo, lambda d: d["rollout"]["state"] == "awaiting_approval", "approval"):
        status, _ = await post(demo, "promote", tokens()["product"])
        demo.event(f"promote by pat: {'approved' if status == 200 else status}")
    if await watch(demo, lambda d: d["weight"]["effective"] == 50, "weight 50%"):
        await asyncio.sleep(1.5)
        status, _ = await post(demo, "promote", tokens()["product"])
        demo.event(f"promote by pat again: skip the minute's dwell ({status})")
    doc = await watch(demo, lambda d: d["rollout"]["state"] == "complete", "completion")
    if doc is not None:
        demo.event(f"{OK} rollout complete: {demo.canary} 2.0.1 serves "
                   f"{doc['weight']['effective']}% of users")  # fmt: skip
    await asyncio.sleep(1.5)


def run_demo(duration: float | None = None) -> int:
    """`turnout demo`: exit status 0, or 1 when it cannot run or saw something wrong."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="proxy %(levelname)s: %(message)s")
    try:
        ports = ports_from_env()
        phases = PHASES + release_phases()
        return uvloop.run(main(duration or DEFAULT_DURATION, ports, phases))
    except DemoError as err:
        print(f"turnout demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's handler was in place, or after
        print("stopped", flush=True)
        return 0
