"""proxy.sources: the guard's two sources of counts, and the config that picks one.

What a Prometheus server answers is read here from literal answers; test_fleet.py
puts the source against a scripted query API and a real Prometheus on loopback.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy import config, sources
from proxy.guard import EXPORTED_MS, FleetCounts, Policy, Stats, Window, verdict

from .fleet import bucket_samples, sample
from .test_config import MINIMAL, write
from .test_config import problems as _problems

pytestmark = pytest.mark.unit


def _load(tmp_path: Path, text: str) -> config.Config:
    return config.load(write(tmp_path, text))


# ------------------------------------------------------------------------- the config


def test_prometheus_source_settings(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + textwrap.dedent("""\
        guard:
          source: prometheus
          max_p99_ms: 250
          prometheus: {url: "http://127.0.0.1:9090", job: edge, query_interval: 2s, timeout: 500ms}
        """))  # fmt: skip
    assert cfg.guard is not None
    assert cfg.guard.source == "prometheus"
    assert cfg.guard.prometheus == FleetCounts("http://127.0.0.1:9090", "edge", 2.0, 0.5)
    defaults = _load(
        tmp_path, MINIMAL + "guard: {source: prometheus, prometheus: {url: 'http://p:9090'}}\n"
    )
    assert defaults.guard is not None and defaults.guard.prometheus == FleetCounts("http://p:9090")
    assert (defaults.guard.prometheus.job, defaults.guard.prometheus.query_interval) == (
        "turnout",
        5.0,
    )
    assert _load(tmp_path, MINIMAL + "guard: {}\n").guard == Policy(source="local")


@pytest.mark.parametrize(
    ("guard", "expected"),
    [
        ("{source: prometheus}", "guard.prometheus: is required with source prometheus (line 8)"),
        (
            "{source: graphite}",
            "guard.source: must be 'local' or 'prometheus', got 'graphite' (line 8)",
        ),
        (
            "{source: prometheus, prometheus: {job: x}}",
            "guard.prometheus.url: is required (line 8)",
        ),
        (
            "{source: prometheus, prometheus: {url: 'ftp://p'}}",
            "guard.prometheus.url: must be an http:// or https:// URL with a host,"
            " got 'ftp://p' (line 8)",
        ),
        (
            "{source: prometheus, prometheus: {url: 'http://p', job: 'a b'}}",
            "guard.prometheus.job: must be a scrape job name ([A-Za-z0-9_.:-]{1,128}),"
            " got 'a b' (line 8)",
        ),
        (
            "{source: prometheus, prometheus: {url: 'http://p', query_intervall: 1s}}",
            "guard.prometheus.query_intervall: unknown key"
            " (did you mean 'query_interval'?) (line 8)",
        ),
        (
            "{source: prometheus, max_p99_ms: 300, prometheus: {url: 'http://p'}}",
            "guard.max_p99_ms: must be a bound of the exported histogram with source prometheus"
            " (Prometheus sees only those): one of 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500,"
            " 1000, 2500, 5000, 10000; got 300 (line 8)",
        ),
    ],
)
def test_bad_source_settings(tmp_path: Path, guard: str, expected: str) -> None:
    assert _problems(tmp_path, MINIMAL + f"guard: {guard}\n") == [expected]


def test_prometheus_settings_without_the_source_warn(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + "guard: {prometheus: {url: 'http://p:9090'}}\n")
    assert cfg.guard == Policy()
    assert [str(w) for w in cfg.warnings] == [
        "guard.prometheus: is unused unless source is prometheus (line 8)"
    ]


def test_a_local_guard_keeps_any_p99_bound(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + "guard: {max_p99_ms: 300}\n")
    assert cfg.guard is not None and cfg.guard.max_p99_ms == 300


# ------------------------------------------------------------------ reading the answers


def test_fleet_stats_from_the_two_answers() -> None:
    codes = [
        sample(400.2, version="blue", code="200"),
        sample(3.9, version="blue", code="404"),
        sample(90.0, version="green", code="200"),
        sample(7.6, version="green", code="500"),
        sample(2.4, version="green", code="503"),
    ]
    full = {ms: 0.0 for ms in EXPORTED_MS} | {float("inf"): 0.0}
    green = dict(full)
    for ms in EXPORTED_MS:  # 90 at or under 25 ms, 6 up to 250 ms, 4 slower than 10 s
        green[ms] = 90.0 if ms <= 25 else 96.0
    green[10000.0], green[float("inf")] = 96.0, 100.0
    blue = {ms: 404.1 for ms in full}
    got = sources.fleet_stats(
        codes, bucket_samples("green", green) + bucket_samples("blue", blue), "turnout"
    )
    assert (got["blue"].requests, got["blue"].errors) == (404, 0)
    assert (got["green"].requests, got["green"].errors) == (100, 10)
    g = got["green"]
    assert sum(g.latency) == 100
    assert g.slower_than(25.0) == 10  # exact at every exported bound
    assert g.slower_than(250.0) == 4
    assert g.slower_than(10000.0) == 4
    assert g.p99_ms is not None and g.p99_ms >= 10000.0
    # The same pure verdict judges them: 10 % errors against 0 % is a breach.
    assert verdict(g, got["blue"], Policy(min_requests=50)).state == "breach"


def test_answers_with_no_series_or_broken_samples_are_refused() -> None:
    with pytest.raises(
        sources.SourceError, match="no series of turnout_request_duration_seconds for job 'edge'"
    ):
        sources.fleet_stats([], [], "edge")
    with pytest.raises(sources.SourceError, match="without a value"):
        sources.fleet_stats([{"metric": {"version": "x"}}], bucket_samples("x", {1.0: 1.0}), "t")
    with pytest.raises(sources.SourceError, match="without a bound"):
        sources.fleet_stats([], [sample(1.0, version="x", le="soon")], "t")


def test_queries_name_the_job_and_the_window() -> None:
    assert sources.requests_query("edge", 30.0) == (
        'sum by (version, code) (increase(turnout_requests_total{job="edge"}[30000ms]))'
    )
    assert sources.buckets_query('we"ird', 1.5) == (
        "sum by (version, le) "
        '(increase(turnout_request_duration_seconds_bucket{job="we\\"ird"}[1500ms]))'
    )


def test_local_source_reads_the_windows() -> None:
    windows = {"blue": Window(10.0), "green": Window(10.0)}
    windows["green"].record_counts(100.0, 40, 4)
    local = sources.make(None, 10.0, lambda: windows)
    pair = local.stats(100.5, "green", "blue")
    assert pair is not None and (pair[0].requests, pair[0].errors, pair[1].requests) == (40, 4, 0)
    assert local.up() and local.doc() == {
        "kind": "local", "up": True, "last_error": None, "last_query_at": None,
    }  # fmt: skip


def test_a_version_missing_from_the_answer_has_no_outcomes() -> None:
    got = sources.fleet_stats([], bucket_samples("blue", {1.0: 5.0, float("inf"): 5.0}), "t")
    assert got["blue"].requests == 0 and sum(got["blue"].latency) == 5
    assert got.get("green", Stats()) == Stats()
