"""The dashboard at GET / on the admin listener, driven in real headless Chromium
(Debian's, through playwright) against a real proxy with real upstreams and load.

Screenshots of the three moments a release has (progressing, awaiting approval,
latched) are written to TURNOUT_SCREENSHOTS (default: the test's own folder); the
README's are in docs/.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from playwright import async_api as playwright_api

from .conftest import ProxyFactory, eventually
from .live import admin, background_load, guard_config, status, write_with_tokens

pytestmark = pytest.mark.live

SECRETS = {
    "TURNOUT_TOKEN_ENG": "eng-dash-5ecret",
    "TURNOUT_TOKEN_PAT": "pat-dash-5ecret",
    "TURNOUT_TOKEN_VIEW": "view-dash-5ecret",
}
TOKENS = [
    {"name": "oncall", "token_env": "TURNOUT_TOKEN_ENG", "roles": ["engineer"]},
    {"name": "pat", "token_env": "TURNOUT_TOKEN_PAT", "roles": ["product"]},
    {"name": "wallboard", "token_env": "TURNOUT_TOKEN_VIEW", "roles": []},
]
GUARD = {"window": "10s", "min_requests": 3, "max_error_rate": 0.2, "on_breach": "rollback"}
STEPS = [5, {"weight": 20, "approve": "product"}, 50, 100]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        raise RuntimeError("chromium is not installed: `make test` installs it as root "
                           "(make test-tools), or run `apt-get install chromium`")  # fmt: skip
    return path


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TURNOUT_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browser():
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def release(pair, proxies: ProxyFactory):
    """A proxy walking a rollout with an approval step, under load, with three tokens."""
    blue, green = pair
    cfg = guard_config(blue, green, guard=GUARD, rollout={"interval": "1s", "steps": STEPS})
    del cfg["routing"]["weight"]
    proxy = proxies.new()
    write_with_tokens(proxy, cfg, TOKENS)
    await proxy.start(env=SECRETS)
    async with background_load(proxy, 80, limit=80):
        yield proxy, green


async def page_with_token(browser, proxy, token: str | None, width: int = 1280, height: int = 800):
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    await page.goto(proxy.admin_url + "/")
    if token is not None:
        await page.fill("#token-input", token)
        await page.click("#token-form button[type=submit]")
    return page


async def test_the_page_shows_the_release_and_charts_fill(browser, release, tmp_path):
    proxy, _ = release
    page = await page_with_token(browser, proxy, SECRETS["TURNOUT_TOKEN_ENG"])
    await page.wait_for_selector("body[data-auth='ok']", state="attached", timeout=5000)
    assert await page.text_content("#stable-name") == "blue"
    assert await page.text_content("#canary-name") == "green"
    assert await page.text_content("#canary-release") == "2.0.0"
    steps = await page.locator("#steps li").all_text_contents()
    assert [s.split("%")[0] for s in steps] == ["5", "20", "50", "100"]
    assert "approval: product" in steps[1]
    assert await page.locator("#steps li.current").count() == 1

    # the charts get points within a few seconds (a point a second per version)
    async def charted() -> bool:
        return int(await page.get_attribute("#chart-rps", "data-points") or 0) >= 4

    await eventually(charted, timeout=8, interval=0.2)
    weight = int(await page.text_content("#weight-effective"))
    assert weight == (await status(proxy, SECRETS["TURNOUT_TOKEN_ENG"]))["weight"]["effective"]
    await page.screenshot(path=str(shots(tmp_path) / "dashboard-progressing.png"), full_page=True)
    # a phone-width screen shows the same, stacked
    phone = await page_with_token(browser, proxy, SECRETS["TURNOUT_TOKEN_ENG"], 390, 844)
    await phone.wait_for_selector("body[data-auth='ok']", state="attached", timeout=5000)
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone: {width}px"


async def test_rollback_from_the_page_latches_and_shows_the_banner(browser, release, tmp_path):
    proxy, _ = release
    eng = SECRETS["TURNOUT_TOKEN_ENG"]
    page = await page_with_token(browser, proxy, eng)
    await page.wait_for_selector("body[data-auth='ok']", state="attached", timeout=5000)

    async def awaiting() -> bool:
        return (await status(proxy, eng))["rollout"]["state"] == "awaiting_approval"

    await eventually(awaiting, timeout=20)
    await page.locator("#rollout-state", has_text="awaiting_approval").wait_for(timeout=3000)
    # oncall holds no product role: promote into the approval step is not offered
    assert await page.is_disabled("#btn-promote")
    await page.screenshot(path=str(shots(tmp_path) / "dashboard-awaiting.png"), full_page=True)
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept("checkout errors in green")))
    await page.click("#btn-rollback")
    doc = await eventually(
        lambda: _latched(proxy, eng), timeout=3
    )  # the proxy itself, through /status
    assert doc["rollback"]["reason"] == "checkout errors in green"
    assert doc["rollback"]["actor"] == "oncall"
    await page.wait_for_selector("#banner:not([hidden])", timeout=1000)
    banner = await page.text_content("#banner")
    assert "ROLLED BACK" in banner and "checkout errors in green" in banner and "oncall" in banner
    await page.screenshot(path=str(shots(tmp_path) / "dashboard-latched.png"), full_page=True)


async def _latched(proxy, token) -> dict | None:
    doc = await status(proxy, token)
    return doc if doc["rollback"]["active"] else None


async def test_a_viewer_token_sees_what_it_cannot_do_and_a_forced_call_is_refused(browser, release):
    proxy, _ = release
    view = SECRETS["TURNOUT_TOKEN_VIEW"]
    page = await page_with_token(browser, proxy, view)
    await page.wait_for_selector("body[data-auth='ok']", state="attached", timeout=5000)
    assert "wallboard" in await page.text_content("#who")
    assert await page.is_disabled("#btn-promote")
    assert await page.is_disabled("#btn-resume")
    # forced anyway, from the page with its token: the proxy says no, and why
    answer = await page.evaluate(
        """async (t) => { const r = await fetch('/promote', {method: 'POST',
             headers: {'Authorization': 'Bearer ' + t, 'Content-Type': 'application/json'},
             body: '{}'}); return [r.status, await r.json()]; }""",
        view,
    )
    assert answer[0] == 403, answer
    assert "needs a role other than viewer" in answer[1]["error"]
    code, doc = await admin(proxy, "GET", "/status", view)
    assert code == 200 and doc["rollback"]["active"] is False


async def test_a_bad_token_gets_a_plain_message(browser, release):
    proxy, _ = release
    page = await page_with_token(browser, proxy, None)
    await page.wait_for_selector("body[data-auth='needed']", state="attached", timeout=5000)
    assert "needs a token" in await page.text_content("#token-why")
    await page.fill("#token-input", "not-a-real-token")
    await page.click("#token-form button[type=submit]")
    await page.wait_for_selector("body[data-auth='refused']", state="attached", timeout=5000)
    message = await page.text_content("#token-why")
    assert "That token was refused" in message and "unknown" in message.lower(), message
    assert await page.is_visible("#token-form")


async def test_the_page_reconnects_after_a_proxy_restart(browser, pair, proxies: ProxyFactory):
    blue, green = pair
    proxy = await proxies.start(guard_config(blue, green, weight=30))
    page = await page_with_token(browser, proxy, None)
    await page.wait_for_selector("body[data-connected='yes']", state="attached", timeout=5000)
    await proxy.stop()
    await page.wait_for_selector("body[data-connected='no']", state="attached", timeout=5000)
    assert "cannot reach the proxy" in await page.text_content("#conn")
    await proxy.start()
    await page.wait_for_selector("body[data-connected='yes']", state="attached", timeout=8000)
    assert await page.is_hidden("#conn")
    assert await page.text_content("#weight-effective") == "30"
