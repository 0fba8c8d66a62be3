"""Run wrk once and turn its text report into numbers.

`wrk --latency` prints latencies with a unit chosen per value (us, ms, s, m,
h); everything is converted to milliseconds here. A run with any non-2xx/3xx
response or any socket error (connect, read, write, timeout) is a failed run:
its numbers are kept in the raw results but never enter a median.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

USERS_LUA = Path(__file__).resolve().parent / "users.lua"

_MS_PER_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_P50 = re.compile(r"^\s+50(?:\.000)?%\s+" + _TIME, re.M)
_P99 = re.compile(r"^\s+99(?:\.000)?%\s+" + _TIME, re.M)
_MAX = re.compile(r"^\s+Latency\s+\S+\s+\S+\s+" + _TIME, re.M)  # avg, stdev, max
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass
class WrkRun:
    target: str
    connections: int
    threads: int
    duration_s: float
    round: int
    ok: bool = False
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None  # the slowest request of the run
    requests: int | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    output: str = ""
    user_us: float | None = None  # the target's user CPU per request (its process tree)
    sys_us: float | None = None  # and its kernel CPU per request

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def find_wrk() -> str | None:
    return shutil.which("wrk")


def to_ms(value: str, unit: str) -> float:
    return float(value) * _MS_PER_UNIT[unit]


def parse(run: WrkRun, text: str) -> WrkRun:
    """Fill `run` from wrk's report; `run.ok` only if it is complete and clean."""
    run.output = text
    rps, p50, p99, total = (r.search(text) for r in (_RPS, _P50, _P99, _TOTAL))
    if not (rps and p50 and p99 and total):
        run.error = "could not parse wrk output (missing Requests/sec or latency percentiles)"
        return run
    run.rps = float(rps.group(1))
    run.p50_ms = to_ms(*p50.groups())
    run.p99_ms = to_ms(*p99.groups())
    if m := _MAX.search(text):
        run.max_ms = to_ms(*m.groups())
    run.requests = int(total.group(1))
    if m := _NON2XX.search(text):
        run.non_2xx = int(m.group(1))
    if m := _SOCKET.search(text):
        names = ("connect", "read", "write", "timeout")
        run.socket_errors = {k: int(v) for k, v in zip(names, m.groups(), strict=True)}
    problems = []
    if run.non_2xx:
        problems.append(f"{run.non_2xx} non-2xx/3xx responses")
    if any(run.socket_errors.values()):
        detail = ", ".join(f"{k} {v}" for k, v in run.socket_errors.items() if v)
        problems.append(f"socket errors: {detail}")
    if run.requests == 0:
        problems.append("no requests completed")
    run.error = "; ".join(problems) or None
    run.ok = not problems
    return run


def command(
    wrk: str,
    url: str,
    connections: int,
    threads: int,
    duration: float,
    users: int,
    headers: tuple[str, ...] = (),
) -> list[str]:
    """`headers` ("Name: value") go on every request (bench/users.lua keeps them)."""
    return [
        wrk,
        *(arg for h in headers for arg in ("-H", h)),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "2s",
        "--latency",
        "-s",
        str(USERS_LUA),
        url,
        "--",
        str(users),
    ]


def execute(
    wrk: str, url: str, result: WrkRun, users: int, headers: tuple[str, ...] = ()
) -> WrkRun:
    """One wrk run against `url`; a failed run is recorded in `result`, never raised."""
    argv = command(wrk, url, result.connections, result.threads, result.duration_s, users, headers)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=result.duration_s + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        result.output = out
        result.error = "wrk did not finish in time"
        return result
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): do not leave wrk running
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        result.output = out
        result.error = f"wrk exited with status {proc.returncode}: {out.strip()[-300:]}"
        return result
    return parse(result, out)
