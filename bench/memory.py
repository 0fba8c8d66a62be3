"""The proxy's memory: idle RSS, and what each idle keep-alive connection adds to it.

    python -m bench.memory [--connections 256,5000]

It starts bench/upstream.py (blue and green) and one Turnout, sends a few
requests to warm it, reads its RSS (VmRSS), then for each count opens that
many client connections, sends one request on each (at most 64 in flight, so
the upstream pool stays as it would under steady load) and leaves them all
open and idle; once every answer is in, the RSS again: (RSS with them - RSS
before) / count is the cost of one keep-alive connection to the process (the
kernel's socket buffers are not in RSS). The connections are then closed and
the next count starts from a fresh proxy.

Then the interpreter's share: the RSS of a bare `python -c pass` equivalent
and of one that imports, cumulatively, what the proxy process imports.
Prints a markdown table of each; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.procs import Processes  # noqa: E402
from bench.soak import (  # noqa: E402
    UPSTREAM_PY,
    config,
    proxy_env,
    raise_nofile,
    rss_kib,
    wait_listening,  # noqa: E402
)
from tests.support import KEY_HEADER, LOOPBACK, REPO, ProxyProcess, free_ports  # noqa: E402

IN_FLIGHT = 64

# Cumulative imports: each row adds its module to those above it.
IMPORTS = [
    ("bare interpreter", "pass"),
    ("+ uvloop", "import uvloop"),
    ("+ yaml", "import yaml"),
    ("+ the data plane", "import proxy.http.downstream, proxy.mirror"),
    ("+ aiohttp (admin API)", "import aiohttp.web"),
    ("+ prometheus_client", "import prometheus_client"),
    ("proxy.server (what `turnout run` imports)", "import proxy.server, proxy.cli"),
    ("+ redis-py (only with `state.backend: redis`)", "import redis.asyncio"),
]


async def _one_request(port: int, i: int, gate: asyncio.Semaphore, held: list) -> bool:
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 15)
        writer.write(f"GET /m/{i} HTTP/1.1\r\nHost: m\r\n{KEY_HEADER}: u{i}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await asyncio.wait_for(reader.readexactly(length), 15)
    held.append(writer)
    return head.startswith(b"HTTP/1.1 200")


async def per_connection(count: int, blue: int, green: int, workdir: Path) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        proxy = ProxyProcess(workdir)
        limits = {"idle_timeout": "300s", "max_connections": max(10000, 2 * count)}
        cfg = config(
            f"http://{LOOPBACK}:{blue}", f"http://{LOOPBACK}:{green}", 10,
            workdir / "state.json", limits=limits,
        )  # fmt: skip
        proxy.write_config(cfg)
        await proxy.spawn(session, 20, proxy_env())
        assert proxy.proc is not None
        held: list[asyncio.StreamWriter] = []
        try:
            gate = asyncio.Semaphore(IN_FLIGHT)
            await asyncio.gather(*(_one_request(proxy.port, -i, gate, held) for i in range(200)))
            for w in held:
                w.close()
            held.clear()
            await asyncio.sleep(1.0)
            before = rss_kib(proxy.proc.pid) or 0
            oks = await asyncio.wait_for(
                asyncio.gather(*(_one_request(proxy.port, i, gate, held) for i in range(count))),
                300,
            )
            await asyncio.sleep(1.0)
            after = rss_kib(proxy.proc.pid) or 0
        finally:
            for w in held:
                w.close()
            await proxy.stop()
    return {
        "count": count,
        "ok": sum(oks),
        "idle_kib": before,
        "with_kib": after,
        "per_conn_kib": (after - before) / count,
    }


def import_rss() -> list[tuple[str, int]]:
    rows, code = [], []
    for name, stmt in IMPORTS:
        code.append(stmt)
        script = "; ".join(code) + "; print(open('/proc/self/status').read())"
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
        ).stdout
        kib = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmRSS:"))
        rows.append((name, kib))
    return rows


async def main_async(counts: list[int]) -> int:
    raise_nofile(max(counts) + 512)
    blue, green = free_ports(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="turnout-mem-") as tmp:
        procs = Processes(Path(tmp))
        try:
            argv = [
                sys.executable, str(UPSTREAM_PY),
                "--listen", f"blue={LOOPBACK}:{blue}", "--listen", f"green={LOOPBACK}:{green}",
            ]  # fmt: skip
            up, _ = procs.start("upstreams", argv, cwd=REPO)
            await wait_listening(blue, up, 10)
            await wait_listening(green, up, 10)
            for n in counts:
                workdir = Path(tmp) / f"proxy-{n}"
                workdir.mkdir()
                results.append(await per_connection(n, blue, green, workdir))
        finally:
            procs.stop_all()
    print(
        "| idle keep-alive connections | answered | RSS before | RSS with them | per connection |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['count']:,} | {r['ok']:,} | {r['idle_kib'] / 1024:.1f} MiB "
            f"| {r['with_kib'] / 1024:.1f} MiB | {r['per_conn_kib']:.2f} KiB |"
        )
    print()
    print("| the interpreter after | RSS | added |")
    print("|---|---:|---:|")
    last = 0
    for name, kib in import_rss():
        print(f"| {name} | {kib / 1024:.1f} MiB | {(kib - last) / 1024 if last else 0:+.1f} MiB |")
        last = kib
    return 0 if all(r["ok"] == r["count"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="256,5000", help="comma list of counts")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.connections.split(",") if c]
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(counts))
    return 130


if __name__ == "__main__":
    sys.exit(main())
