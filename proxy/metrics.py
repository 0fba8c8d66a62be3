"""The one owner of metrics: a Recorder with methods named for what they record.

Rules:
- The hot path only bumps plain ints in dicts and lists (no locks, no label
  lookups in prometheus_client); a custom collector (exposition.py) turns them
  into Prometheus families when `/metrics` is scraped.
- Label values are bounded: versions and reasons come from the config, codes
  are HTTP status codes, kinds are a fixed set, `grpc_status` a gRPC code
  (0 to 16; a value outside them is counted as 2, UNKNOWN).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Final

from .guard import LATENCY_BUCKETS, UPPER_MS, quantile_ms

# Durations are counted in the guard's fine histogram (UPPER_MS: 1, 1.5, 2, 2.5, 3,
# 4, 5, 6, 8 per decade), so the guard reads the same counts the metrics export and
# the hot path records each request once (exposition.py exports coarser bounds).
_FINE_S: Final = tuple(ms / 1000.0 for ms in UPPER_MS)

# Why a TLS handshake on the listener failed (proxy.tls.failure_reason), a fixed set:
# timeout (handshake_timeout), closed (the client went away), http_request (plain
# HTTP to the TLS port), protocol_version (no version both accept, or not TLS at all),
# no_shared_cipher, certificate_rejected (the client refused the certificate served),
# client_alert (any other alert from the client), max_connections (refused before the
# handshake: limits.max_connections), other.
TLS_FAILURE_REASONS: Final = (
    "timeout", "closed", "http_request", "protocol_version", "no_shared_cipher",
    "certificate_rejected", "client_alert", "max_connections", "other",
)  # fmt: skip


# The gRPC status codes that count as errors for the guard (PRODUCT.md §14): UNKNOWN,
# DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS. The others (NOT_FOUND,
# INVALID_ARGUMENT, PERMISSION_DENIED, ...) are the caller's, as a 4xx is.
GRPC_ERRORS: Final = frozenset({2, 4, 13, 14, 15})


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * LATENCY_BUCKETS  # indexed like guard.UPPER_MS, plus overflow
        self.total = 0.0
        self.count = 0

    def add(self, counts: list[int], total: float, count: int) -> None:
        """Add another histogram's figures (another worker's) to these."""
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total
        self.count += count


class Tally:
    """What one version's exchanges came to: the hot path's counters, kept apart per
    version so that counting one is lookups by a string and by an int."""

    __slots__ = ("reasons", "codes", "hist", "failures")

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}  # routing reason -> exchanges
        self.codes: dict[int, int] = {}  # status -> exchanges
        self.hist = Histogram()
        self.failures = 0  # answers >= 500 and failed exchanges (the guard's errors)


class Recorder:
    """Per-version counters for the proxy; cheap enough for every request.

    `requests`, `decisions`, `durations` and `failures` are flat views of the
    per-version tallies, made when read (at a scrape or a controller tick).
    """

    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}  # version ("none": refused before routing)
        self.upstream_errors: dict[tuple[str, str], int] = {}
        # shadow copies (dark launch): outcomes per version, like the live ones
        self.shadow_requests: dict[str, int] = {}
        self.shadow_failures: dict[str, int] = {}
        self.shadow_durations: dict[str, Histogram] = {}
        self.mirror = {"sent": 0, "dropped": 0, "failed": 0}
        self.comparisons = {"match": 0, "mismatch": 0}
        # Exchanges in progress per version, counted when asked (at scrape time)
        # rather than kept up to date on every request.
        self.in_flight: Callable[[], dict[str, int]] = dict
        self.reloads = {"success": 0, "failure": 0}
        self.generation = 0
        self.canary_weight = 0
        self.decision_labels: tuple[tuple[str, str], ...] = ()  # the table in force
        self.rollback_active = 0
        self.rollbacks = 0
        self.rollout_step = 0
        self.breaches = 0
        self.state_write_failures = 0  # state file writes that failed (the leader writes)
        self.guard_source_up = 1  # 0 while the guard's source cannot answer (sources.py)
        self.state_backend_up = 1  # 0 while the state backend (Redis) cannot be reached
        self.access_log_dropped = 0  # access log lines lost (proxy.accessfile keeps it)
        self.tls_failures = dict.fromkeys(TLS_FAILURE_REASONS, 0)  # handshakes, by reason
        self.grpc: dict[tuple[str, int], int] = {}  # (version, grpc-status) -> gRPC answers

    # -- hot path -----------------------------------------------------------------

    def finished(
        self, label: tuple[str, str], status: int, seconds: float, error: str | None
    ) -> None:
        """One exchange is over: count its decision and its answer, and time it.

        `label` is the routing decision's (version, reason).
        """
        version, reason = label
        t = self.tallies.get(version)  # self.tally(version), without the call
        if t is None:
            t = self.tallies[version] = Tally()
        r = t.reasons
        r[reason] = r.get(reason, 0) + 1
        c = t.codes
        c[status] = c.get(status, 0) + 1
        h = t.hist
        h.counts[bisect_left(_FINE_S, seconds)] += 1
        h.total += seconds
        h.count += 1
        if error is not None:
            ek = (version, error)
            e = self.upstream_errors
            e[ek] = e.get(ek, 0) + 1
            t.failures += 1
        elif status >= 500:
            t.failures += 1

    def grpc_finished(self, version: str, code: int, counted: bool) -> None:
        """A gRPC exchange's outcome, its `grpc-status` (PRODUCT.md §14). `counted`: the
        exchange was already a failure (a proxy-made error, a 5xx): not counted twice."""
        key = (version, code)
        self.grpc[key] = self.grpc.get(key, 0) + 1
        if code in GRPC_ERRORS and not counted:
            self.tally(version).failures += 1

    def rejected(self, status: int) -> None:
        """A request refused before routing (400, 431): no version served it."""
        c = self.tally("none").codes
        c[status] = c.get(status, 0) + 1

    def tally(self, version: str) -> Tally:
        t = self.tallies.get(version)
        if t is None:
            t = self.tallies[version] = Tally()
        return t

    # -- flat views ---------------------------------------------------------------

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """(version, status) -> exchanges."""
        return {(v, code): n for v, t in self.tallies.items() for code, n in t.codes.items()}

    @property
    def decisions(self) -> dict[tuple[str, str], int]:
        """(version, routing reason) -> exchanges."""
        return {(v, why): n for v, t in self.tallies.items() for why, n in t.reasons.items()}

    @property
    def durations(self) -> dict[str, Histogram]:
        """version -> the histogram of its exchanges' durations (versions timed)."""
        return {v: t.hist for v, t in self.tallies.items() if t.hist.count}

    @property
    def failures(self) -> dict[str, int]:
        """version -> its guard errors (versions with any)."""
        return {v: t.failures for v, t in self.tallies.items() if t.failures}

    # -- control plane ------------------------------------------------------------

    def reloaded(self, ok: bool, generation: int) -> None:
        self.reloads["success" if ok else "failure"] += 1
        self.generation = generation

    def shadow_finished(self, version: str, status: int, seconds: float, error: str | None) -> None:
        """A shadow copy is over (status 0 when it failed before an answer)."""
        self.shadow_requests[version] = self.shadow_requests.get(version, 0) + 1
        if error is not None or status >= 500:
            self.shadow_failures[version] = self.shadow_failures.get(version, 0) + 1
        h = self.shadow_durations.get(version)
        if h is None:
            h = self.shadow_durations[version] = Histogram()
        h.counts[bisect_left(_FINE_S, seconds)] += 1
        h.total += seconds
        h.count += 1

    def mirrored(self, outcome: str) -> None:
        self.mirror[outcome] += 1

    def compared(self, result: str) -> None:
        self.comparisons[result] += 1

    def shadow_totals(self, version: str) -> tuple[int, int, list[int]]:
        """Cumulative shadow requests, errors and latency counts of one version."""
        h = self.shadow_durations.get(version)
        latency = list(h.counts) if h is not None else [0] * LATENCY_BUCKETS
        requests = self.shadow_requests.get(version, 0)
        return requests, self.shadow_failures.get(version, 0), latency

    def rolled_back(self) -> None:
        self.rollbacks += 1

    def breach_alerted(self) -> None:
        self.breaches += 1

    def state_write_failed(self) -> None:
        self.state_write_failures += 1

    def version_totals(self) -> dict[str, dict[str, int]]:
        """Requests and errors (status >= 500) per version, for /status."""
        out: dict[str, dict[str, int]] = {}
        for (version, code), n in self.requests.items():
            if version == "none":
                continue
            v = out.setdefault(version, {"requests": 0, "errors": 0})
            v["requests"] += n
            if code >= 500:
                v["errors"] += n
        return out

    def p99_ms(self, version: str) -> float | None:
        """The 99th percentile since start (interpolated within its bucket)."""
        t = self.tallies.get(version)
        if t is None or not t.hist.count:
            return None
        return quantile_ms(tuple(t.hist.counts), 0.99)

    def totals(self, version: str) -> tuple[int, int, list[int]]:
        """Cumulative requests, guard errors and latency counts of one version."""
        t = self.tallies.get(version)
        if t is None:
            return 0, 0, [0] * LATENCY_BUCKETS
        return sum(t.codes.values()), t.failures, list(t.hist.counts)

    # -- several workers (see workers.py) -------------------------------------------

    def counts(self) -> dict:
        """The counters (not the gauges) as plain JSON, for the leading worker."""
        return {
            "requests": [[v, code, n] for (v, code), n in self.requests.items()],
            "decisions": [[v, reason, n] for (v, reason), n in self.decisions.items()],
            "upstream_errors": [[v, kind, n] for (v, kind), n in self.upstream_errors.items()],
            "durations": {v: [h.counts, h.total, h.count] for v, h in self.durations.items()},
            "shadow_durations": {
                v: [h.counts, h.total, h.count] for v, h in self.shadow_durations.items()
            },
            "failures": self.failures,
            "shadow_requests": self.shadow_requests,
            "shadow_failures": self.shadow_failures,
            "mirror": self.mirror,
            "comparisons": self.comparisons,
            "reloads": self.reloads,
            "in_flight": self.in_flight(),
            "access_log_dropped": self.access_log_dropped,
            "tls_failures": self.tls_failures,
            "grpc": [[v, code, n] for (v, code), n in self.grpc.items()],
        }

    def add_counts(self, doc: dict) -> None:
        """Add another worker's `counts()` to these (its in-flight gauge is not added)."""
        for version, code, n in doc.get("requests", ()):
            codes = self.tally(version).codes
            codes[int(code)] = codes.get(int(code), 0) + n
        for version, reason, n in doc.get("decisions", ()):
            reasons = self.tally(version).reasons
            reasons[reason] = reasons.get(reason, 0) + n
        for version, kind, n in doc.get("upstream_errors", ()):
            key = (version, kind)
            self.upstream_errors[key] = self.upstream_errors.get(key, 0) + n
        for version, code, n in doc.get("grpc", ()):
            key = (version, int(code))
            self.grpc[key] = self.grpc.get(key, 0) + n
        for version, n in doc.get("failures", {}).items():
            self.tally(version).failures += n
        for version, (counts, total, count) in doc.get("durations", {}).items():
            self.tally(version).hist.add(counts, total, count)
        for version, (counts, total, count) in doc.get("shadow_durations", {}).items():
            self.shadow_durations.setdefault(version, Histogram()).add(counts, total, count)
        self.access_log_dropped += doc.get("access_log_dropped", 0)
        fields = ("shadow_requests", "shadow_failures", "mirror", "comparisons", "reloads",
                  "tls_failures")  # fmt: skip
        for field in fields:
            counts = getattr(self, field)
            for name, n in doc.get(field, {}).items():
                counts[name] = counts.get(name, 0) + n

    def copy(self) -> Recorder:
        """A new Recorder with these counters and gauges."""
        rec = Recorder()
        rec.add_counts(self.counts())
        for gauge in ("canary_weight", "generation", "decision_labels", "rollback_active",
                      "rollbacks", "rollout_step", "breaches", "state_write_failures",
                      "guard_source_up", "state_backend_up", "in_flight"):  # fmt: skip
            setattr(rec, gauge, getattr(self, gauge))
        return rec
