"""Prometheus exposition of a Recorder: its counters as metric families, on scrape.

The only module that imports prometheus_client. Not compiled (setup.py): the
collector derives from prometheus_client's class, and nothing here runs per
request.

Rule: every labelled family has its series from the start (PRODUCT.md §13).
The versions are those the routing table in force can answer with
(`Recorder.decision_labels`); per version, the in-flight gauge, the duration
histogram and each upstream error kind are exported at 0 until something
happens, so dashboards and alerts see a 0, never a missing series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .guard import EXPORTED_MS, UPPER_MS
from .metrics import Histogram, Recorder

# The Prometheus bounds (s); each is one of the fine edges the Recorder counts in.
BUCKETS = tuple(ms / 1000.0 for ms in EXPORTED_MS)
_EXPORT = tuple(UPPER_MS.index(round(b * 1000.0, 6)) for b in BUCKETS)  # fine index per bound
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "protocol", "tls")  # PRODUCT.md §8


def registry(rec: Recorder) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(rec))
    return reg


class _Collector(Collector):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def collect(self) -> Iterator:
        rec = self.rec
        versions = {version for version, _ in rec.decision_labels}
        c = CounterMetricFamily(
            "turnout_requests", "Requests answered, by version and status code",
            labels=["version", "code"],
        )  # fmt: skip
        for (version, code), n in sorted(rec.requests.items()):
            c.add_metric([version, str(code)], n)
        yield c
        yield _histogram(
            "turnout_request_duration_seconds",
            "Time from request head to the end of the response, by version",
            dict.fromkeys(versions, _EMPTY) | rec.durations,
        )
        yield _histogram(
            "turnout_mirror_duration_seconds",
            "Duration of shadow copies sent to the canary, by version",
            rec.shadow_durations,
        )
        m = CounterMetricFamily(
            "turnout_mirror_requests", "Shadow copies, by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(rec.mirror.items()):
            m.add_metric([outcome], n)
        yield m
        cmp = CounterMetricFamily(
            "turnout_mirror_compared", "Shadow responses compared with the primary",
            labels=["result"],
        )  # fmt: skip
        for result, n in sorted(rec.comparisons.items()):
            cmp.add_metric([result], n)
        yield cmp
        e = CounterMetricFamily(
            "turnout_upstream_errors", "Upstream failures, by version and kind",
            labels=["version", "kind"],
        )  # fmt: skip
        kinds = {(version, kind) for version in versions for kind in UPSTREAM_ERROR_KINDS}
        for version, kind in sorted(kinds | set(rec.upstream_errors)):
            e.add_metric([version, kind], rec.upstream_errors.get((version, kind), 0))
        yield e
        d = CounterMetricFamily(
            "turnout_route_decisions", "Routing decisions, by version and reason",
            labels=["version", "reason"],
        )  # fmt: skip
        # Every label pair the routing table in force can produce is exported, at 0
        # until it happens, so rate() and alerts see the series from the start.
        for version, reason in sorted(set(rec.decisions) | set(rec.decision_labels)):
            d.add_metric([version, reason], rec.decisions.get((version, reason), 0))
        yield d
        g = GaugeMetricFamily(
            "turnout_in_flight_requests", "Exchanges in progress", labels=["version"]
        )
        in_flight = rec.in_flight()
        for version in sorted(versions | set(in_flight)):
            g.add_metric([version], in_flight.get(version, 0))
        yield g
        r = CounterMetricFamily(
            "turnout_config_reloads", "Config reloads, by result", labels=["result"]
        )
        for result, n in sorted(rec.reloads.items()):
            r.add_metric([result], n)
        yield r
        t = CounterMetricFamily(
            "turnout_tls_handshake_failures",
            "TLS handshakes on the listener that failed, by reason",
            labels=["reason"],
        )
        for reason, n in rec.tls_failures.items():
            t.add_metric([reason], n)
        yield t
        grpc = CounterMetricFamily(
            "turnout_grpc_responses", "gRPC answers, by version and grpc-status",
            labels=["version", "grpc_status"],
        )  # fmt: skip
        for (version, code), n in sorted(rec.grpc.items()):
            grpc.add_metric([version, str(code)], n)
        yield grpc
        for family, name, text, attr in _SCALARS:
            yield family(name, text, value=getattr(rec, attr))


# Families of one unlabelled value: (kind, name, help, the Recorder attribute).
_SCALARS = (
    (GaugeMetricFamily, "turnout_canary_weight", "Effective canary weight (%)", "canary_weight"),
    (GaugeMetricFamily, "turnout_config_generation", "Config generation in force", "generation"),
    (GaugeMetricFamily, "turnout_rollback_active", "1 while the rollback latch is set",
     "rollback_active"),
    (CounterMetricFamily, "turnout_rollbacks", "Rollbacks (guard or manual)", "rollbacks"),
    (GaugeMetricFamily, "turnout_rollout_step", "Current rollout step (0-based)", "rollout_step"),
    (GaugeMetricFamily, "turnout_guard_source_up",
     "1 while the guard's source of counts answers (local or Prometheus)", "guard_source_up"),
    (GaugeMetricFamily, "turnout_state_backend_up",
     "1 while the state backend answers (the file, or the fleet's Redis)", "state_backend_up"),
    (CounterMetricFamily, "turnout_guard_breaches",
     "Guard breaches reported without a rollback (on_breach pause or alert)", "breaches"),
    (CounterMetricFamily, "turnout_state_write_failures",
     "State file writes that failed (the state in force is not on disk until one succeeds)",
     "state_write_failures"),
    (CounterMetricFamily, "turnout_access_log_dropped",
     "Access log lines dropped (the writer fell behind, or a write failed)",
     "access_log_dropped"),
)  # fmt: skip


_EMPTY = Histogram()  # a version that has answered nothing yet


def _histogram(name: str, text: str, hists: dict[str, Histogram]) -> HistogramMetricFamily:
    """The fine histograms, exported at the coarser Prometheus bounds."""
    family = HistogramMetricFamily(name, text, labels=["version"])
    for version, hist in sorted(hists.items()):
        cumulative, buckets, fine = 0, [], 0
        for bound, index in zip(BUCKETS, _EXPORT, strict=True):
            cumulative += sum(hist.counts[fine : index + 1])
            fine = index + 1
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", hist.count))
        family.add_metric([version], buckets, hist.total)
    return family


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
