"""HTTP/2 and gRPC: Turnout against NGINX doing the same, driven by h2load, interleaved.

    python -m bench.h2 [--rounds 3] [--duration 5] [--clients 4] [--streams 16]

Two scenarios, each a few targets measured in turn, round after round (every other
round in reverse order), so machine noise hits them alike:

- h2: HTTP/2 clients (h2load: `--clients` connections of `--streams` concurrent
  streams each, 64 by default) to the benchmark's HTTP/1.1 upstream (nginx, one
  worker, as bench.run uses), over TLS with ALPN h2 (turnout-h2, nginx-h2) and
  in cleartext with prior knowledge (turnout-h2c, nginx-h2c).
- grpc: gRPC unary calls (h2load posting one gRPC message to demo.Echo/Unary
  with `te: trailers`) to grpcio servers (bench/grpc_upstream.py): direct,
  through Turnout (h2c on both sides), through NGINX (`grpc_pass`, pooled).

Every target routes by a sticky key (x-user-id) with the canary at 50 %. For
each target: the median requests per second, the mean request time, and for the
proxies their CPU (user and kernel) per request. The table goes to
bench/results/h2.md, raw runs to bench/results/h2.json. Every process started
is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import nginx as ngx  # noqa: E402
from bench.certs import self_signed  # noqa: E402
from bench.procs import BenchError, Processes, wait_for_http_200, wait_for_port  # noqa: E402
from bench.run import cpu_ticks, dump_yaml  # noqa: E402
from bench.upstream import make_body  # noqa: E402
from tests.support import free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VERSIONS = ("blue", "green")


@dataclass
class Run:
    target: str
    round: int
    rps: float = 0.0
    mean_ms: float = 0.0
    succeeded: int = 0
    failed: int = 0
    user_us: float | None = None
    sys_us: float | None = None
    error: str | None = None


@dataclass
class Target:
    name: str
    scenario: str
    url: str
    pid: int | None = None  # the proxy's, for its CPU per request
    runs: list[Run] = field(default_factory=list)


_FINISHED = re.compile(r"finished in [0-9.]+s, ([0-9.]+) req/s")
_REQUESTS = re.compile(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed")
_TIME = re.compile(r"time for request:\s+\S+\s+\S+\s+([0-9.]+)(us|ms|s)")


def h2load(target: Target, args: argparse.Namespace, rnd: int, body: Path | None) -> Run:
    run = Run(target.name, rnd)
    argv = ["h2load", "-D", f"{args.duration:g}", "-c", str(args.clients), "-m", str(args.streams),
            "-t", "1", "-H", "x-user-id: u-1"]  # fmt: skip
    if body is not None:  # a gRPC unary call
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    before = cpu_ticks(target.pid) if target.pid else None
    out = subprocess.run([*argv, target.url], capture_output=True, text=True, timeout=120)
    after = cpu_ticks(target.pid) if target.pid else None
    text = out.stdout + out.stderr
    rps, requests, mean = _FINISHED.search(text), _REQUESTS.search(text), _TIME.search(text)
    if out.returncode != 0 or rps is None or requests is None:
        run.error = text.strip()[-400:]
        return run
    run.rps = float(rps.group(1))
    run.succeeded, run.failed = int(requests.group(1)), int(requests.group(2))
    if mean is not None:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[mean.group(2)]
        run.mean_ms = float(mean.group(1)) * scale
    if before and after and run.succeeded:
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        run.user_us = (after[0] - before[0]) * tick_us / run.succeeded
        run.sys_us = (after[1] - before[1]) * tick_us / run.succeeded
    if run.failed:
        run.error = f"{run.failed} requests failed"
    return run


def grpc_body(folder: Path) -> Path:
    """One gRPC message (uncompressed, 16 bytes) as h2load posts it."""
    message = b"0123456789abcdef"
    path = folder / "unary.bin"
    path.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    return path


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.nginx = ngx.find_nginx()
        self.targets: list[Target] = []
        self.notes: list[str] = []

    def turnout(self, name: str, scenario: str, doc: dict, tls: bool) -> None:
        port, admin = free_ports(2)
        folder = self.workdir / name
        folder.mkdir()
        doc = {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "state_file": str(folder / "state.json"),
            "stable": "blue",
            "canary": "green",
            "routing": {"weight": 50, "sticky": {"key": "header:x-user-id"}},
            **doc,
        }
        path = folder / "turnout.yaml"
        path.write_text(dump_yaml(doc))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
        proc, log = self.procs.start(name, argv, cwd=REPO, env=env)
        wait_for_http_200(proc, admin, "/readyz", log, name, 30)
        scheme = "https" if tls else "http"
        self.targets.append(Target(name, scenario, f"{scheme}://127.0.0.1:{port}/", proc.pid))

    def nginx_proxy(self, name: str, scenario: str, conf: str, port: int, tls: bool) -> None:
        assert self.nginx is not None
        prefix = self.workdir / name
        ngx.write_conf(prefix, conf)
        proc, log = self.procs.start(name, ngx.command(self.nginx, prefix))
        wait_for_port(proc, port, log, name, 10)
        scheme = "https" if tls else "http"
        self.targets.append(Target(name, scenario, f"{scheme}://127.0.0.1:{port}/", proc.pid))

    def start(self) -> None:
        if self.nginx is None:
            raise BenchError("nginx is not installed (apt-get install nginx-light)")
        if shutil.which("h2load") is None:
            raise BenchError("h2load is not installed (apt-get install nghttp2-client)")
        cert, key = self_signed(self.workdir / "tls")
        # the HTTP/1.1 upstream of the h2 scenario
        http_ports = dict(zip(VERSIONS, free_ports(2), strict=True))
        bodies = {v: make_body(100, v) for v in VERSIONS}
        prefix = self.workdir / "nginx-upstream"
        ngx.write_conf(prefix, ngx.upstream_conf(prefix, http_ports, bodies))
        proc, log = self.procs.start("upstream-nginx", ngx.command(self.nginx, prefix))
        for port in http_ports.values():
            wait_for_port(proc, port, log, "the upstream", 10)
        # the gRPC servers of the grpc scenario
        grpc_ports = dict(zip(VERSIONS, free_ports(2), strict=True))
        argv = [sys.executable, "-m", "bench.grpc_upstream"]
        argv += [f"{v}={p}" for v, p in grpc_ports.items()]
        gproc, glog = self.procs.start("upstream-grpc", argv, cwd=REPO)
        for port in grpc_ports.values():
            wait_for_port(gproc, port, glog, "the gRPC upstream", 20)

        http = {v: {"endpoints": [f"http://127.0.0.1:{p}"]} for v, p in http_ports.items()}
        tls = {"certificates": [{"cert": str(cert), "key": str(key)}], "alpn": ["h2", "http/1.1"]}
        self.turnout("turnout-h2", "h2", {"versions": http, "tls": tls}, True)
        port = free_ports(1)[0]
        conf = ngx.proxy_conf(self.workdir / "nginx-h2", port, http_ports, "green", 50,
                              tls=(cert, key), http2=True)  # fmt: skip
        self.nginx_proxy("nginx-h2", "h2", conf, port, True)
        h2c = {"versions": http, "http2": {"cleartext": True}}
        self.turnout("turnout-h2c", "h2", h2c, False)
        port = free_ports(1)[0]
        conf = ngx.proxy_conf(self.workdir / "nginx-h2c", port, http_ports, "green", 50,
                              http2=True)  # fmt: skip
        self.nginx_proxy("nginx-h2c", "h2", conf, port, False)

        url = f"http://127.0.0.1:{grpc_ports['blue']}/"
        self.targets.append(Target("grpc-direct", "grpc", url))
        grpc = {v: {"endpoints": [f"h2c://127.0.0.1:{p}"]} for v, p in grpc_ports.items()}
        self.turnout("turnout-grpc", "grpc", {"versions": grpc, "http2": {"cleartext": True}},
                     False)  # fmt: skip
        port = free_ports(1)[0]
        conf = ngx.grpc_conf(self.workdir / "nginx-grpc", port, grpc_ports, "green", 50)
        self.nginx_proxy("nginx-grpc", "grpc", conf, port, False)

    def rounds(self) -> None:
        body = grpc_body(self.workdir)
        for rnd in range(1, self.args.rounds + 1):
            order = self.targets if rnd % 2 else list(reversed(self.targets))
            for target in order:
                grpc_path = target.url + "demo.Echo/Unary"
                if target.scenario == "grpc":
                    run = h2load(Target(target.name, "grpc", grpc_path, target.pid), self.args,
                                 rnd, body)  # fmt: skip
                else:
                    run = h2load(target, self.args, rnd, None)
                target.runs.append(run)
                print(f"  round {rnd}/{self.args.rounds}  {target.name:<13} " + describe(run))


def describe(run: Run) -> str:
    if run.error and not run.rps:
        return f"FAILED: {run.error}"
    cpu = f"  cpu {run.user_us:.1f}+{run.sys_us:.1f} us/req" if run.user_us is not None else ""
    return f"{run.rps:>9.0f} req/s  mean {run.mean_ms:.2f} ms{cpu}" + (
        f"  ({run.error})" if run.error else ""
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def table(targets: list[Target], args: argparse.Namespace) -> str:
    """The medians, as markdown, with each proxy's ratio to NGINX in its scenario."""
    by_name = {t.name: t for t in targets}
    lines = [
        f"h2load: {args.clients} connections x {args.streams} streams, {args.duration:g} s runs, "
        f"{args.rounds} interleaved rounds, medians; {os.cpu_count()} cores",
        "",
        "| target | req/s | mean ms | vs NGINX | proxy CPU us/req (user + kernel) |",
        "|---|---:|---:|---:|---|",
    ]
    rivals = {"turnout-h2": "nginx-h2", "turnout-h2c": "nginx-h2c", "turnout-grpc": "nginx-grpc"}
    for t in targets:
        ok = [r for r in t.runs if r.rps and not r.failed]
        rps = median([r.rps for r in ok])
        mean = median([r.mean_ms for r in ok])
        ratio = ""
        rival = by_name.get(rivals.get(t.name, ""))
        if rival is not None:
            theirs = median([r.rps for r in rival.runs if r.rps and not r.failed])
            ratio = f"{rps / theirs:.2f}x" if theirs else ""
        cpus = [(r.user_us, r.sys_us) for r in ok if r.user_us is not None]
        cpu = ""
        if cpus:
            user = median([u for u, _ in cpus if u is not None])
            kernel = median([k for _, k in cpus if k is not None])
            cpu = f"{user:.1f} + {kernel:.1f}"
        failed = sum(1 for r in t.runs if r.error)
        note = f" ({failed} runs with errors)" if failed else ""
        lines.append(f"| {t.name}{note} | {rps:.0f} | {mean:.2f} | {ratio} | {cpu} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="turnout-bench-h2-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.start()
            print("targets: " + ", ".join(f"{t.name} {t.url}" for t in bench.targets))
            bench.rounds()
        except BenchError as exc:
            print(f"bench.h2: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.procs.stop_all()
        text = table(bench.targets, args)
        print("\n" + text)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (args.out / "h2.md").write_text(f"# HTTP/2 and gRPC ({stamp})\n\n{text}")
        runs = [asdict(r) for t in bench.targets for r in t.runs]
        (args.out / "h2.json").write_text(json.dumps(runs, indent=1))
    failed = any(r.error for t in bench.targets for r in t.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
