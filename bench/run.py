"""Benchmark harness: the upstream direct vs Turnout vs NGINX, interleaved, on loopback.

    python -m bench.run [--targets direct,turnout,turnout-guard,nginx,nginx-stock]
                        [--connections 64,1]
                        [--duration 5] [--rounds 3] [--body-bytes 100]
    python -m bench.run --targets mirror --connections 64          # the cost of mirroring
    python -m bench.run --targets tls --connections 64             # the cost of TLS
    python -m bench.run --targets slow-canary --slow-canary 10     # a 10 s canary, mirrored

It starts a fast upstream (nginx with one worker, or bench/upstream.py when
nginx is absent) serving "blue" and "green" on two ports, then every target
(see TARGETS), and drives each with wrk and bench/users.lua (10,000 user ids in
X-User-Id, so the proxies really route by sticky key). Rounds are interleaved
— round 1 runs every target at every connection count, then round 2 — so
machine noise hits all targets alike. Medians go to a markdown table, raw runs
to results.json, and a chart to chart.png (in bench/results/ by default).

`--targets` also takes preset names (TARGET_PRESETS: default, mirror,
slow-canary, all). `--slow-canary N` makes the green upstream a separate
bench/upstream.py that answers every request N seconds late (blue stays fast)
and sets the default weight to 0, so users only reach blue and green only sees
shadow copies.

Every process it starts is stopped by its PID on exit, Ctrl-C or error.
Exit status: 0 all runs clean; 1 a target failed to start or a run failed;
130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

if not __package__:  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import nginx as ngx  # noqa: E402
from bench import report, wrk  # noqa: E402
from bench.certs import self_signed  # noqa: E402
from bench.procs import (  # noqa: E402
    BenchError,
    Processes,
    check_alive,
    tail,
    wait_for_http_200,
    wait_for_port,
)
from bench.upstream import make_body  # noqa: E402
from tests.support import free_ports  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
STABLE, CANARY = "blue", "green"


@dataclass
class Bench:
    """What the start functions share: options, work dir, processes, upstream ports."""

    args: argparse.Namespace
    workdir: Path
    procs: Processes
    nginx: str | None
    upstream_ports: dict[str, int] = field(default_factory=dict)
    upstream_proc: subprocess.Popen[bytes] | None = None
    upstream_log: Path | None = None
    upstream_desc: str = ""
    upstream_extra: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    admin_ports: dict[str, int] = field(default_factory=dict)  # Turnout target → admin port
    # target name → (process, log) to check before each run
    watched: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def endpoint(self, version: str) -> str:
        return f"http://127.0.0.1:{self.upstream_ports[version]}"

    def certificate(self) -> tuple[Path, Path]:
        """The TLS targets' certificate and key (made once per run)."""
        folder = self.workdir / "tls"
        if not (folder / "cert.pem").exists():
            self_signed(folder)
        return folder / "cert.pem", folder / "key.pem"


# ---------------------------------------------------------------- the targets


@dataclass(frozen=True)
class Target:
    start: Callable[[Bench], str]  # starts what the target needs; returns the URL to drive
    needs_nginx: bool = False
    routed: bool = False  # its responses should carry X-Turnout-Version
    # wrk's extra headers: ("Connection: close",) makes every request a new connection
    # (over TLS, a full handshake: wrk resumes no session)
    headers: tuple[str, ...] = ()


def start_direct(b: Bench) -> str:
    return b.endpoint(STABLE) + "/"


def nginx_target(
    name: str, keepalive: bool, workers: bool = False, tls: bool = False, close: bool = False
) -> Target:
    """`workers`: one worker process per `--workers` (else one); `tls`: listen with TLS
    (the certificate Turnout's TLS targets serve); `close`: a new connection a request."""

    def start(b: Bench) -> str:
        assert b.nginx is not None
        (port,) = free_ports(1)
        prefix = b.workdir / name
        n = b.args.workers if workers else 1
        pair = b.certificate() if tls else None
        conf = ngx.proxy_conf(
            prefix, port, b.upstream_ports, CANARY, b.args.weight, keepalive, n, pair
        )
        ngx.write_conf(prefix, conf)
        proc, log = b.procs.start(name, ngx.command(b.nginx, prefix))
        b.watched[name] = (proc, log)
        wait_for_port(proc, port, log, f"{name} (proxy)", 10)
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}/"

    return Target(start, needs_nginx=True, routed=True, headers=CLOSE if close else ())


CLOSE = ("Connection: close",)


def turnout_config(b: Bench, port: int, admin: int, state_dir: Path) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "state_file": str(state_dir / "state.json"),
        "stable": STABLE,
        "canary": CANARY,
        "versions": {v: {"endpoints": [b.endpoint(v)]} for v in (STABLE, CANARY)},
        "routing": {"weight": b.args.weight, "sticky": {"key": "header:X-User-Id"}},
    }


def merged(base: dict[str, object], extra: dict[str, object]) -> dict[str, object]:
    """`extra` laid over `base`, recursively for nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        both_dicts = isinstance(old, dict) and isinstance(value, dict)
        out[key] = merged(old, value) if both_dicts else value  # type: ignore[arg-type]
    return out


def dump_yaml(doc: dict[str, object]) -> str:
    try:
        import yaml
    except ImportError:  # JSON is valid YAML
        return json.dumps(doc, indent=2)
    return yaml.safe_dump(doc, sort_keys=False)


def scenario_extra(b: Bench, extra: dict[str, object]) -> dict[str, object]:
    """What the run's options add to a variant: with --slow-canary, a mirror's
    copies may live N + 5 s, so the slow canary really answers them."""
    if b.args.slow_canary and isinstance(extra.get("mirror"), dict):
        return {"mirror": {"timeout": f"{b.args.slow_canary + 5:g}s"}}
    return {}


def turnout_target(
    name: str,
    extra: dict[str, object],
    workers: bool = False,
    pure: bool = False,
    tls: bool = False,
    close: bool = False,
) -> Target:
    """Turnout as a subprocess (`python -m proxy run -c FILE`), `extra` YAML merged in;
    `workers`: with `--workers` processes (else one); `pure`: the pure Python build
    (TURNOUT_PURE=1: the sources run, not the compiled modules); `tls`: TLS on the
    listener (the certificate NGINX's TLS targets serve); `close`: a new connection
    a request."""

    def start(b: Bench) -> str:
        port, admin = free_ports(2)
        folder = b.workdir / name
        folder.mkdir()
        path = folder / "turnout.yaml"
        doc = merged(turnout_config(b, port, admin, folder), extra)
        if tls:
            cert, key = b.certificate()
            doc["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
        doc = merged(doc, scenario_extra(b, extra))
        path.write_text(dump_yaml(doc))
        b.admin_ports[name] = admin
        argv = [b.args.python, "-m", "proxy", "run", "-c", str(path)]
        if workers:
            argv += ["--workers", str(b.args.workers)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if pure:
            env["TURNOUT_PURE"] = "1"
        proc, log = b.procs.start(name, argv, cwd=REPO, env=env)
        b.watched[name] = (proc, log)
        wait_for_http_200(proc, admin, "/readyz", log, name, b.args.ready_timeout)
        wait_for_port(proc, port, log, name, 2)
        if workers:
            wait_for_workers(proc, admin, b.args.workers, log, name, b.args.ready_timeout)
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}/"

    return Target(start, routed=True, headers=CLOSE if close else ())


def wait_for_workers(
    proc: subprocess.Popen[bytes], admin: int, count: int, log: Path, what: str, timeout: float
) -> None:
    """Poll the leader's /status until all `count` workers have reported."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive(proc, log, what)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=1.0) as r:
                workers = json.load(r).get("workers") or {}
            if len(workers.get("members", ())) >= count:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            missing = f"not all {count} workers up within {timeout:g}s"
            raise BenchError(f"{what}: {missing}:\n{tail(log)}")
        time.sleep(0.1)


# Turnout configurations worth comparing; each is a target of its own. The mirror
# variants copy every GET that blue serves to green (GET is mirrored by default);
# at most 64 copies are outstanding, the rest are dropped (and counted).
MIRROR: dict[str, object] = {"percent": 100, "max_in_flight": 64}
TURNOUT_VARIANTS: dict[str, dict[str, object]] = {
    "turnout": {},
    "turnout-mirror": {"mirror": MIRROR},
    "turnout-mirror-compare": {"mirror": {**MIRROR, "compare": {}}},
    # one JSON line per request to a file beside the config (PRODUCT.md section 15)
    "turnout-access-log": {"access_log": {"path": "access.log"}},
    "turnout-guard": {
        "guard": {
            "window": "30s",
            "min_requests": 50,
            "max_error_rate": 0.02,
            "on_breach": "rollback",
        }
    },
}

TARGETS: dict[str, Target] = {
    "direct": Target(start_direct),
    **{name: turnout_target(name, extra) for name, extra in TURNOUT_VARIANTS.items()},
    "nginx": nginx_target("nginx", keepalive=True),  # tuned: pooled upstream connections
    "nginx-stock": nginx_target("nginx-stock", keepalive=False),  # NGINX's proxy defaults
    # one process per core each (--workers): how both are deployed on a whole machine
    "turnout-workers": turnout_target("turnout-workers", {}, workers=True),
    "turnout-pure": turnout_target("turnout-pure", {}, pure=True),  # TURNOUT_PURE=1
    "nginx-workers": nginx_target("nginx-workers", keepalive=True, workers=True),
    # TLS on the listener (cleartext to the upstream), keep-alive, and a new connection
    # (a full handshake) for every request
    "turnout-tls": turnout_target("turnout-tls", {}, tls=True),
    "nginx-tls": nginx_target("nginx-tls", keepalive=True, tls=True),
    "turnout-tls-handshake": turnout_target("turnout-tls-handshake", {}, tls=True, close=True),
    "nginx-tls-handshake": nginx_target(
        "nginx-tls-handshake", keepalive=True, tls=True, close=True
    ),
}

# names `--targets` accepts for a whole list
TARGET_PRESETS: dict[str, list[str]] = {
    "default": [
        "direct",
        "turnout",
        "turnout-access-log",
        "turnout-guard",
        "turnout-pure",
        "nginx",
        "nginx-stock",
        "turnout-workers",
        "nginx-workers",
    ],  # fmt: skip
    "mirror": ["turnout", "turnout-mirror", "turnout-mirror-compare"],  # the cost of mirroring
    "slow-canary": ["turnout", "turnout-mirror"],  # with --slow-canary N: mirror off vs on
    # the cost of TLS on the listener, against NGINX doing the same
    "tls": [
        "turnout",
        "turnout-tls",
        "nginx",
        "nginx-tls",
        "turnout-tls-handshake",
        "nginx-tls-handshake",
    ],
    "all": list(TARGETS),
}


# ---------------------------------------------------------------- the upstream


def python_upstream(b: Bench, ports: dict[str, int], delay: float = 0.0) -> list[str]:
    argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--body-bytes", str(b.args.body_bytes)]
    for version, port in ports.items():
        argv += ["--listen", f"{version}=127.0.0.1:{port}"]
    if b.args.same_body:
        argv += ["--body-name", STABLE]
    if delay > 0:
        argv += ["--delay", f"{delay:g}"]
    return argv


def start_upstream(b: Bench) -> None:
    """Blue and green on two ports of one process: nginx if allowed and found.

    With --slow-canary N, green is a process of its own (bench/upstream.py
    --delay N) and the fast upstream serves blue only."""
    ports = dict(zip((STABLE, CANARY), free_ports(2), strict=True))
    slow = b.args.slow_canary
    fast = {v: p for v, p in ports.items() if not (slow and v == CANARY)}
    name = STABLE if b.args.same_body else None
    bodies = {v: make_body(b.args.body_bytes, name or v) for v in fast}
    use_nginx = b.args.upstream == "nginx" or (b.args.upstream == "auto" and b.nginx)
    if use_nginx:
        if not b.nginx:
            raise BenchError("--upstream nginx: nginx is not installed (apt-get install nginx)")
        prefix = b.workdir / "nginx-upstream"
        ngx.write_conf(prefix, ngx.upstream_conf(prefix, fast, bodies))
        proc, log = b.procs.start("upstream-nginx", ngx.command(b.nginx, prefix))
        b.upstream_desc = f"{ngx.version(b.nginx)} (1 worker)"
    else:
        proc, log = b.procs.start("upstream-python", python_upstream(b, fast))
        b.upstream_desc = "bench/upstream.py (uvloop + httptools, 1 process)"
    for port in fast.values():
        wait_for_port(proc, port, log, "the upstream", 10)
    b.upstream_ports, b.upstream_proc, b.upstream_log = ports, proc, log
    if slow:
        argv = python_upstream(b, {CANARY: ports[CANARY]}, delay=slow)
        sproc, slog = b.procs.start("upstream-slow-canary", argv)
        wait_for_port(sproc, ports[CANARY], slog, "the slow canary", 10)
        b.upstream_extra.append(("the slow canary", sproc, slog))
        b.upstream_desc += f" for {STABLE}, bench/upstream.py --delay {slow:g} for {CANARY}"


def mirror_counts(admin: int) -> dict[str, object] | None:
    """Turnout's mirror counters from GET /status on its admin port (None: no mirror)."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    try:
        conn.request("GET", "/status")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        doc = json.loads(body)
    except (OSError, ValueError):
        return None
    finally:
        conn.close()
    mirror = doc.get("mirror") if isinstance(doc, dict) else None
    return mirror if isinstance(mirror, dict) else None


def probe(url: str, routed: bool, users: int = 200) -> str:
    """A few requests with distinct user ids: all must be 200; returns the version split."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=5
    )
    if parts.scheme == "https":  # the run's own self-signed certificate
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=5, context=unverified
        )
    seen: Counter[str] = Counter()
    try:
        for n in range(users):
            conn.request("GET", parts.path or "/", headers={"X-User-Id": f"probe-{n}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise BenchError(f"GET {url} with X-User-Id: probe-{n} answered {resp.status}")
            seen[resp.getheader("X-Turnout-Version") or "none"] += 1
    except OSError as exc:
        raise BenchError(f"GET {url} failed: {exc}") from exc
    finally:
        conn.close()
    split = ", ".join(f"{v} {c}" for v, c in sorted(seen.items()))
    warn = " (no X-Turnout-Version header!)" if routed and set(seen) == {"none"} else ""
    return f"{users} probe users → {split}{warn}"


# ---------------------------------------------------------------- the session


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(user, kernel) clock ticks of `pid` and every live process below it."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        ticks[child] = (int(fields[11]), int(fields[12]))  # utime, stime
    if pid not in ticks:
        return None
    user = kernel = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        u, k = ticks.get(p, (0, 0))
        user, kernel = user + u, kernel + k
        todo.extend(children.get(p, ()))
    return user, kernel


class Session:
    def __init__(self, args: argparse.Namespace, wrk_bin: str, b: Bench) -> None:
        self.args, self.wrk, self.b = args, wrk_bin, b
        self.urls: dict[str, str] = {}
        self.notes: list[str] = []
        self.failed_targets: dict[str, str] = {}
        self.runs: list[wrk.WrkRun] = []
        self.mirror: dict[str, dict[str, object]] = {}  # target → its /status mirror counters
        self.started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def start_targets(self) -> None:
        for name in self.args.targets:
            target = TARGETS[name]
            if target.needs_nginx and not self.b.nginx:
                self.notes.append(f"{name}: skipped, nginx is not installed")
                print(f"- {name}: skipped (nginx is not installed)")
                continue
            try:
                url = target.start(self.b)
                print(f"+ {name}: {url}  {probe(url, target.routed)}")
            except BenchError as exc:
                self.failed_targets[name] = str(exc)
                reason = str(exc).splitlines()[0].split("; its log (")[0]
                log = self.b.workdir / f"{name}.log"
                if log.exists():  # the work dir is removed on exit: keep the evidence
                    self.args.out.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(log, self.args.out / log.name)
                    reason += f" (log: {self.args.out / log.name})"
                self.notes.append(f"{name}: FAILED to start: {reason}")
                print(f"! {name}: FAILED to start: {exc}", file=sys.stderr)
                continue
            self.urls[name] = url
        if not self.urls:
            raise BenchError("no target could be started")

    def measure(self, name: str, connections: int, duration: float, rnd: int) -> wrk.WrkRun:
        run = wrk.WrkRun(name, connections, self.args.threads, duration, rnd)
        run.threads = min(self.args.threads, connections)
        check_alive(self.b.upstream_proc, self.b.upstream_log, "the upstream")  # type: ignore[arg-type]
        for what, proc, log in self.b.upstream_extra:
            check_alive(proc, log, what)
        pid = None
        if name in self.b.watched:
            proc, log = self.b.watched[name]
            if proc.poll() is not None:
                run.error = f"{name} is no longer running (status {proc.poll()}); log:\n{tail(log)}"
                return run
            pid = proc.pid
        before = cpu_ticks(pid) if pid else None
        headers = TARGETS[name].headers
        run = wrk.execute(self.wrk, self.urls[name], run, self.args.users, headers)
        after = cpu_ticks(pid) if pid else None
        if before and after and run.ok and run.requests:
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            run.user_us = (after[0] - before[0]) * tick_us / run.requests
            run.sys_us = (after[1] - before[1]) * tick_us / run.requests
        return run

    def warm_up(self) -> None:
        if self.args.warmup <= 0:
            return
        print(f"warm-up: {self.args.warmup:g} s per target")
        for name in self.urls:
            run = self.measure(name, max(self.args.connections), self.args.warmup, 0)
            if not run.ok:
                print(f"  warm-up {name}: {run.error}", file=sys.stderr)

    def rounds(self) -> None:
        a = self.args
        width = max(15, *map(len, self.urls))
        for rnd in range(1, a.rounds + 1):
            # every other round runs the targets in reverse, so a drift of the
            # machine over the session favours no position in the list
            order = list(self.urls) if rnd % 2 else list(reversed(self.urls))
            for c in a.connections:
                for name in order:
                    run = self.measure(name, c, a.duration, rnd)
                    self.runs.append(run)
                    print(f"  round {rnd}/{a.rounds}  c={c:<4} {name:<{width}} {describe(run)}")
                    if not run.ok and run.output:
                        print(indent(run.output.strip()), file=sys.stderr)

    def mirror_notes(self) -> None:
        """What each mirroring Turnout did with its copies over the whole session."""
        for name in self.urls:
            admin = self.b.admin_ports.get(name)
            counts = mirror_counts(admin) if admin else None
            if not counts:
                continue
            self.mirror[name] = counts
            keys = ("sent", "dropped", "failed", "in_flight")
            if counts.get("compare"):
                keys += ("matched", "mismatched")
            text = ", ".join(f"{k} {counts.get(k, 0):,}" for k in keys)
            self.notes.append(f"{name}: shadow copies over the session (warm-up included): {text}")

    def meta(self, interrupted: bool = False) -> dict[str, object]:
        a, b = self.args, self.b
        return {
            "started_at": self.started_at,
            "cpu_count": os.cpu_count(),
            "platform": platform_line(),
            "wrk": wrk_version(self.wrk),
            "nginx": ngx.version(b.nginx) if b.nginx else None,
            "upstream": b.upstream_desc,
            "body_bytes": a.body_bytes,
            "users": a.users,
            "weight": a.weight,
            "slow_canary_s": a.slow_canary,
            "same_body": a.same_body,
            "mirror": self.mirror,
            "threads": a.threads,
            "rounds": a.rounds,
            "duration_s": a.duration,
            "connections": a.connections,
            "targets": a.targets,
            "failed_targets": self.failed_targets,
            "interrupted": interrupted,
        }

    def write(self, interrupted: bool = False) -> int:
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        names = [t for t in self.args.targets if t in self.urls]
        rows = report.summarize(self.runs, names, self.args.connections)
        notes = list(self.notes)
        bad = [r for r in self.runs if not r.ok]
        notes += [f"{r.target} c={r.connections} round {r.round}: {r.error}" for r in bad]
        if interrupted:
            notes.append("interrupted: partial results")
        meta = self.meta(interrupted)
        table = report.markdown(rows, meta, notes)
        (out / "results.md").write_text(table)
        report.write_json(out / "results.json", meta, rows, self.runs)
        problem = report.chart(out / "chart.png", rows, meta)
        print()
        print(table)
        print(f"wrote {out / 'results.md'}, {out / 'results.json'}", end="")
        print(f" ({problem})" if problem else f", {out / 'chart.png'}")
        return 1 if (bad or self.failed_targets) else 0


def describe(run: wrk.WrkRun) -> str:
    if not run.ok:
        return f"FAILED: {run.error}"
    return f"{run.rps:>10,.0f} req/s   p50 {run.p50_ms:7.3f} ms   p99 {run.p99_ms:7.3f} ms"


def indent(text: str) -> str:
    return "\n".join("      | " + line for line in text.splitlines())


def platform_line() -> str:
    return f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"


def wrk_version(wrk_bin: str) -> str:
    out = subprocess.run([wrk_bin, "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


# ---------------------------------------------------------------- the command


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark Turnout against the direct upstream and NGINX (loopback only).",
        epilog=f"targets: {', '.join(TARGETS)}; presets: "
        + "; ".join(f"{k} = {','.join(v)}" for k, v in TARGET_PRESETS.items()),
    )
    p.add_argument(
        "--targets",
        type=csv_list,
        default=["default"],
        help="comma list of targets and presets, in run order (default: the preset 'default')",
    )
    p.add_argument("--connections", type=csv_list, default=["64", "1"], help="default 64,1")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per target, 0 = none")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1, see README)")
    p.add_argument("--body-bytes", type=int, default=100, help="upstream body size (default 100)")
    p.add_argument("--users", type=int, default=10_000, help="distinct X-User-Id values")
    p.add_argument(
        "--weight",
        type=int,
        default=None,
        help="canary %% in Turnout and nginx (default 10; 0 with --slow-canary)",
    )
    p.add_argument(
        "--slow-canary",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="green answers every request this late (its own bench/upstream.py); blue stays fast",
    )
    p.add_argument(
        "--same-body",
        action="store_true",
        help="green serves blue's body, so `compare` sees matches (default: bodies differ)",
    )
    p.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx when installed, else bench/upstream.py",
    )
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results folder")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes of the *-workers targets (default: one per core)",
    )
    p.add_argument("--ready-timeout", type=float, default=20.0, help="seconds to wait for /readyz")
    p.add_argument("--python", default=sys.executable, help="interpreter for Turnout")
    p.add_argument("--keep-tmp", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    args.targets = list(dict.fromkeys(t for x in args.targets for t in TARGET_PRESETS.get(x, [x])))
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        p.error(f"unknown target(s) {', '.join(unknown) or '(none)'}; known: {', '.join(TARGETS)}")
    try:
        args.connections = [int(c) for c in args.connections]
    except ValueError:
        p.error("--connections takes integers, e.g. 64,1")
    if not args.connections or min(args.connections) < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--connections, --rounds and --threads must be at least 1")
    if args.weight is None:
        args.weight = 0 if args.slow_canary else 10
    if args.duration <= 0 or not 0 <= args.weight <= 100 or args.slow_canary < 0:
        p.error("--duration must be positive, --weight within 0..100, --slow-canary >= 0")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_bin = wrk.find_wrk()
    if not wrk_bin:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="turnout-bench-"))
    workdir.chmod(0o755)  # nginx workers may run as another user
    procs = Processes(workdir)
    b = Bench(args, workdir, procs, ngx.find_nginx())
    session = Session(args, wrk_bin, b)
    print(f"turnout bench: {os.cpu_count()} cores, work dir {workdir}")
    try:
        start_upstream(b)
        print(f"upstream: {b.upstream_desc} blue={b.endpoint(STABLE)} green={b.endpoint(CANARY)}")
        session.start_targets()
        session.warm_up()
        session.rounds()
        session.mirror_notes()
        return session.write()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return session.write() if session.runs else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        if session.runs:
            session.write(interrupted=True)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        procs.stop_all()
        if args.keep_tmp:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
