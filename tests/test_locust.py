"""A short headless locust run through the proxy: users stay on their version."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from .conftest import AppUpstream, ProxyFactory, versions_config

pytestmark = pytest.mark.live

LOCUSTFILE = Path(__file__).resolve().parent.parent / "bench" / "locustfile.py"


@pytest.mark.timeout(90)
async def test_headless_locust_users_are_sticky_and_shares_follow_the_weight(
    proxies: ProxyFactory, blue: AppUpstream, green: AppUpstream
):
    cfg = versions_config(
        blue.url, green.url, routing={"weight": 30, "sticky": {"key": "header:X-User-Id"}}
    )
    proxy = await proxies.start(cfg)
    locust = os.path.join(os.path.dirname(sys.executable), "locust")
    proc = await asyncio.create_subprocess_exec(
        locust, "-f", str(LOCUSTFILE), "--headless", "-u", "60", "-r", "60", "-t", "6s",
        "--host", proxy.url, "--only-summary", "--stop-timeout", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    m = re.search(r"flips\s+(\d+) in \d+ of (\d+) users: ok", text)
    assert m, text[-3000:]
    assert int(m.group(1)) == 0 and int(m.group(2)) == 60
    users = re.search(r"users\s+blue ([\d,]+) \([\d.]+%\), green ([\d,]+)", text)
    assert users, text[-3000:]
    on_green = int(users.group(2).replace(",", ""))
    # 60 users at weight 30: the exact count is the bucket function's, not chance.
    expected = await _canary_users(proxy, 60)
    assert on_green == expected
    assert len(blue.requests) > 60 and len(green.requests) > 10


async def _canary_users(proxy, n: int) -> int:
    green = 0
    for i in range(n):
        # the locustfile numbers its users from 1 and names them user-N
        status, doc = await proxy.admin_get("/explain", key=f"user-{i + 1}")
        assert status == 200
        green += doc["version"] == "green"
    return green
