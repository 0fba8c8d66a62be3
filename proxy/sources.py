"""Where the guard reads the outcomes it judges: this process's counts, or the fleet's.

Job: give the controller, each tick, the canary's and the stable's `Stats` over the
guard's window, from one of two sources behind one interface (`Source`):

- `Local` (`guard.source: local`, the default): the sliding windows the controller
  fills from this process's Recorder (under `--workers`, from all its workers).
- `Prometheus` (`guard.source: prometheus`): the fleet's counts, read with PromQL
  from a Prometheus server that scrapes every replica. Every replica that reads the
  same server judges the same counts with the same pure `guard.verdict`, so they
  reach the same verdict, and a canary's slice of traffic is judged whole however
  the replicas shared it.

Rules:
- A source that cannot answer gives None, and the verdict is *inconclusive*: never
  healthy (a rollout does not step on it), never a breach. For Prometheus that is a
  failed or slow query (`timeout`), an answer that is not a PromQL vector, no series
  of `turnout_request_duration_seconds` for the job at all, or a last answer older
  than two query intervals plus the timeout.
- `doc()` is what `/status.guard.source` shows: kind, up, last_error, last_query_at.
- After a resume or a new release the canary is judged afresh (`restart`): the
  Prometheus source then counts only what happened since, with a range that grows
  from 1 s to the whole window, so the breach that caused the rollback is not
  judged again.
- The Prometheus source queries on its own task every `query_interval`, never on
  the controller's tick: a slow server delays nothing but its own answer.
- What Prometheus holds are counters: `increase()` over the guard's window, summed
  by version over the job's instances. Requests and errors (5xx) come from
  `turnout_requests_total`; latency from `turnout_request_duration_seconds_bucket`,
  whose bounds are `guard.EXPORTED_MS` (a `max_p99_ms` must be one of them, which
  the config checks). Shadow copies are not in these series: a dark launch's copies
  are judged by the local source only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from .guard import EXPORTED_MS, LATENCY_BUCKETS, UPPER_MS, FleetCounts, Stats, Window, quantile_ms

log = logging.getLogger("turnout")

_FINE_INDEX = tuple(UPPER_MS.index(ms) for ms in EXPORTED_MS)  # latency slot per bound
_OVERFLOW = len(UPPER_MS)  # the slot of what is slower than the last edge


class Source(Protocol):
    """What the controller asks of a guard source."""

    kind: str
    since: float  # wall-clock s: nothing before it is judged (0: the whole window)

    def stats(self, now: float, canary: str, stable: str) -> tuple[Stats, Stats] | None:
        """(canary, stable) over the window ending at `now` (monotonic s); None: unusable."""
        ...

    def up(self) -> bool: ...

    def doc(self) -> dict[str, Any]: ...

    def restart(self, at: float) -> None:
        """Judge afresh: count nothing from before `at` (wall-clock s), as after a resume."""
        ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class Local:
    """The controller's own windows (it feeds them from the Recorder each tick)."""

    kind = "local"

    def __init__(self, windows: Callable[[], dict[str, Window]]) -> None:
        self.windows = windows
        self.since = 0.0

    def stats(self, now: float, canary: str, stable: str) -> tuple[Stats, Stats] | None:
        w = self.windows()
        return w[canary].stats(now), w[stable].stats(now)

    def up(self) -> bool:
        return True

    def doc(self) -> dict[str, Any]:
        return {"kind": self.kind, "up": True, "last_error": None, "last_query_at": None}

    def restart(self, at: float) -> None:
        self.since = at  # the controller starts its windows afresh

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class SourceError(Exception):
    """A query that gave nothing the guard can use; the message says why."""


class Prometheus:
    """The fleet's counts over the window, from a Prometheus server's query API."""

    kind = "prometheus"

    def __init__(self, settings: FleetCounts, window: float) -> None:
        self.settings = settings
        self.window = window
        self.by_version: dict[str, Stats] | None = None  # the last usable answer
        self.answered_at = 0.0  # monotonic s of the last usable answer
        self.last_error: str | None = "no query yet"
        self.last_query_at: float | None = None  # wall-clock s of the last query made
        self.since = 0.0  # wall-clock s: nothing before it is judged (see `restart`)
        self.generation = 0  # one more at each restart: older answers are dropped
        self.queries = 0
        self.task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None

    # -- what the controller reads ---------------------------------------------------------

    def stats(self, now: float, canary: str, stable: str) -> tuple[Stats, Stats] | None:
        if not self.up(now):
            return None
        got = self.by_version or {}
        return got.get(canary, Stats()), got.get(stable, Stats())

    def up(self, now: float | None = None) -> bool:
        if self.by_version is None or self.last_error is not None:
            return False
        now = time.monotonic() if now is None else now
        s = self.settings
        return now - self.answered_at <= 2 * s.query_interval + s.timeout

    def restart(self, at: float) -> None:
        # The fleet's counters hold the past; the window is shortened until it lies
        # wholly after `at`, and the answer held now is no longer usable.
        self.since = at
        self.generation += 1
        self.by_version = None
        self.last_error = "judging afresh: no answer since the restart yet"

    def doc(self) -> dict[str, Any]:
        up = self.up()
        error = self.last_error
        if error is None and not up:
            error = "the last answer is too old (the query loop is behind)"
        at = self.last_query_at
        return {
            "kind": self.kind,
            "up": up,
            "last_error": error,
            "last_query_at": None if at is None else _iso(at),
            "url": self.settings.url,
            "job": self.settings.job,
        }

    # -- the query loop --------------------------------------------------------------------

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # the loop outlives any one strange answer
                log.exception("guard source prometheus: query failed")
                self.failed(f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.settings.query_interval)

    async def refresh(self) -> None:
        """One round of queries; the outcome is kept for `stats` and `doc`."""
        self.last_query_at = time.time()
        self.queries += 1
        generation = self.generation
        try:
            by_version = await asyncio.wait_for(self.query(), self.settings.timeout)
        except TimeoutError:
            self.failed(f"no answer within {self.settings.timeout:g}s")
        except (aiohttp.ClientError, OSError) as e:
            self.failed(f"unreachable: {e}" if str(e) else f"unreachable: {type(e).__name__}")
        except SourceError as e:
            self.failed(str(e))
        else:
            if generation != self.generation:
                return  # asked before a restart: about what is no longer judged
            if self.last_error is not None:
                log.warning("guard source prometheus is answering again (%s)", self.settings.url)
            self.by_version, self.answered_at, self.last_error = by_version, time.monotonic(), None

    def failed(self, why: str) -> None:
        if self.last_error is None:  # log a change of state, not every failed query
            log.warning("guard source prometheus is down (%s): %s", self.settings.url, why)
        self.last_error = why

    async def query(self) -> dict[str, Stats]:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        window = self.window
        if self.since:
            window = min(window, max(1.0, time.time() - self.since))
        codes, buckets = await asyncio.gather(
            self.vector(requests_query(self.settings.job, window)),
            self.vector(buckets_query(self.settings.job, window)),
        )
        if not buckets and window < self.window:
            return {}  # too short a range for two scrapes yet: nothing to judge
        return fleet_stats(codes, buckets, self.settings.job)

    async def vector(self, promql: str) -> list[dict[str, Any]]:
        assert self.session is not None
        url = self.settings.url.rstrip("/") + "/api/v1/query"
        async with self.session.get(url, params={"query": promql}) as r:
            try:
                body = await r.json(content_type=None)
            except ValueError:
                body = None
            if r.status != 200 or not isinstance(body, dict) or body.get("status") != "success":
                why = body.get("error") if isinstance(body, dict) else None
                raise SourceError(f"query answered {r.status}: {why or 'not a PromQL answer'}")
        data = body.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "vector":
            raise SourceError("query answered something other than an instant vector")
        result = data.get("result")
        if not isinstance(result, list):
            raise SourceError("query answered no result list")
        return result


# -- PromQL and what its answers mean -----------------------------------------------------


def _range(window: float) -> str:
    return f"{max(1, round(window * 1000))}ms"


def _selector(job: str) -> str:
    escaped = job.replace("\\", "\\\\").replace('"', '\\"')
    return f'{{job="{escaped}"}}'


def requests_query(job: str, window: float) -> str:
    """Answers by version and status code over the window, summed over the replicas."""
    return (
        f"sum by (version, code) "
        f"(increase(turnout_requests_total{_selector(job)}[{_range(window)}]))"
    )


def buckets_query(job: str, window: float) -> str:
    """The duration histogram's cumulative buckets by version over the window."""
    return (
        f"sum by (version, le) "
        f"(increase(turnout_request_duration_seconds_bucket{_selector(job)}[{_range(window)}]))"
    )


def _value(sample: Any) -> float:
    try:
        v = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SourceError(f"a sample without a value: {sample!r:.200}") from e
    return v if math.isfinite(v) and v > 0 else 0.0


def _labels(sample: Any) -> dict[str, str]:
    labels = sample.get("metric") if isinstance(sample, dict) else None
    if not isinstance(labels, dict):
        raise SourceError(f"a sample without labels: {sample!r:.200}")
    return labels


def fleet_stats(codes: list[Any], buckets: list[Any], job: str) -> dict[str, Stats]:
    """Each version's Stats from the two answers (counts rounded: `increase` extrapolates).

    The cumulative buckets become the guard's histogram: what fell in (b[i-1], b[i]] is
    put in the fine slot whose upper edge is b[i], so `Stats.slower_than(b)` is exact for
    every exported bound b; what is above the last bound goes to the overflow slot.
    """
    if not buckets:
        raise SourceError(f"no series of turnout_request_duration_seconds for job {job!r}")
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    for sample in codes:
        labels = _labels(sample)
        version, code, n = labels.get("version", ""), labels.get("code", ""), _value(sample)
        requests[version] = requests.get(version, 0.0) + n
        if code.startswith("5"):
            errors[version] = errors.get(version, 0.0) + n
    cumulative: dict[str, dict[float, float]] = {}  # version -> bound (ms) -> count
    for sample in buckets:
        labels = _labels(sample)
        try:
            le_ms = round(float(labels.get("le", "")) * 1000.0, 6)
        except (TypeError, ValueError) as e:
            raise SourceError(f"a bucket without a bound: {labels!r:.200}") from e
        cumulative.setdefault(labels.get("version", ""), {})[le_ms] = _value(sample)
    out: dict[str, Stats] = {}
    for version in set(requests) | set(cumulative):
        latency = _histogram(cumulative.get(version, {}))
        n = round(requests.get(version, 0.0))
        failed = min(n, round(errors.get(version, 0.0)))
        p99 = quantile_ms(latency, 0.99) if any(latency) else None
        out[version] = Stats(n, failed, p99, 0, 0, latency if any(latency) else ())
    return out


def _histogram(cumulative: dict[float, float]) -> tuple[int, ...]:
    latency = [0] * LATENCY_BUCKETS
    below = 0
    for ms, slot in zip(EXPORTED_MS, _FINE_INDEX, strict=True):
        upto = max(below, round(cumulative.get(ms, below)))
        latency[slot] = upto - below
        below = upto
    latency[_OVERFLOW] = max(0, round(cumulative.get(math.inf, below)) - below)
    return tuple(latency)


def make(
    settings: FleetCounts | None, window: float, windows: Callable[[], dict[str, Window]]
) -> Source:
    """The source a guard policy names (`settings` None: local)."""
    return Local(windows) if settings is None else Prometheus(settings, window)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
