"""deploy/grafana/turnout.json against what Turnout exports: every PromQL expression in
the board names only metrics a live proxy serves on /metrics, and a real Prometheus
scraping that proxy parses each one (and answers the main panels with data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest

from .conftest import ROOT, Proxy, ProxyFactory, eventually, versions_config
from .fleet import PrometheusServer
from .live import versions_seen
from .support import LOOPBACK

pytestmark = pytest.mark.live

BOARD = ROOT / "deploy" / "grafana" / "turnout.json"
METRIC = re.compile(r"\bturnout_[a-z0-9_]+\b")
# Panels that must show data for a proxy that has answered requests.
MUST_ANSWER = ("Requests per second, by version", "p99 latency, by version",
               "Rollback latch", "Effective canary weight", "Guard source up")  # fmt: skip


def board() -> dict:
    return json.loads(BOARD.read_text())


def expressions(doc: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def test_the_board_uses_a_prometheus_datasource_variable() -> None:
    doc = board()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in doc["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], target["expr"]
    titles = [p["title"] for p in doc["panels"]]
    assert len(titles) == len(set(titles))
    assert len({p["id"] for p in doc["panels"]}) == len(titles)


async def _traffic(proxy: Proxy, n: int = 200) -> None:
    async with aiohttp.ClientSession() as s:
        seen = await versions_seen(s, proxy, n)
    assert seen["blue"] and seen["green"], seen


@pytest.mark.timeout(90)
async def test_every_expression_names_exported_metrics_and_parses(
    proxies: ProxyFactory, blue, green, tmp_path: Path
) -> None:
    proxy = proxies.new()
    prometheus = PrometheusServer(tmp_path, [f"{LOOPBACK}:{proxy.admin_port}"])
    cfg = versions_config(blue.url, green.url,
                          routing={"weight": 50, "sticky": {"key": "header:X-User-Id"}},
                          guard={"window": "10s"})  # fmt: skip
    proxy.write_config(cfg)
    await proxy.start()
    try:
        await _traffic(proxy)
        exported = {name for name, _, _ in (await proxy.metrics()).samples}
        doc = board()
        named = {m for _, expr in expressions(doc) for m in METRIC.findall(expr)}
        named |= set(METRIC.findall(doc["templating"]["list"][1]["definition"]))
        assert named, "no metric named in the board"
        assert named <= exported, f"not exported by Turnout: {sorted(named - exported)}"

        await prometheus.start()
        await eventually(lambda: prometheus.scraped(1), timeout=15)

        async def answered() -> bool:  # rate() over [1m] needs two scrapes with traffic
            await _traffic(proxy, 40)
            got = await prometheus.query(
                'sum by (version) (rate(turnout_requests_total{job="turnout"}[1m]))'
            )
            return {s["metric"].get("version") for s in got} >= {"blue", "green"}

        await eventually(answered, timeout=20, interval=0.5)
        empty = []
        for title, expr in expressions(doc):
            # Grafana puts the job variable in; "All" is the regex .*
            result = await prometheus.query(expr.replace("$job", ".*"))  # asserts it parsed
            if title in MUST_ANSWER and not result:
                empty.append((title, expr))
        assert not empty, f"panels without data for a serving proxy: {empty}"
    finally:
        await prometheus.stop()
