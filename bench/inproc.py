"""The data plane's own cost a request, with no socket: the compiled build and the pure one.

    python -m bench.inproc [--requests 50000] [--rounds 5]

It drives the real core in this process, as tests/core_harness.py does: 64
ClientConnections, and 64 pooled UpstreamConnections of each version, on fake
transports (what is written is counted, not kept). A turn of the loop is played
as a busy proxy's is: a request read on every client connection, the turn's
writes made (proxy.http.outbox), then every upstream's answer read and those
writes made. Each request is a GET with one of 10,000 user ids in X-User-Id (so
the sticky hash is computed), routed 10 % to green, answered by a 100-byte
response in one read, as for the `turnout` target of bench/run.py. What it
times is everything Turnout's code does for a request between the reads and the
writes: the system calls, uvloop's reads and the kernel are not in it, so the
figure is steady where wrk's are not, and the two builds' difference is the
cost of interpreting the layers.

Each build runs in a process of its own (`TURNOUT_PURE=1` for the pure one);
the best of `--rounds` rounds is reported, in µs a request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: python bench/inproc.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
USERS = 10_000
CONFIG = """
listen: 127.0.0.1:1
stable: blue
canary: green
versions:
  blue: {endpoints: ["http://10.0.0.1:80"]}
  green: {endpoints: ["http://10.0.0.2:80"]}
routing: {weight: 10, sticky: {key: "header:X-User-Id"}}
"""
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 21:39:07 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
) + b"b" * 100
CONNECTIONS = 64  # client connections, each with a request in every turn of the loop


async def measure(requests: int, rounds: int) -> tuple[float, dict]:
    """Best µs a request over `rounds` rounds of `requests`, and what was counted."""
    from proxy.http import outbox
    from proxy.http.downstream import ClientConnection
    from tests.core_harness import FakeTransport, Harness

    class CountingTransport(FakeTransport):
        """Keeps no bytes (a FakeTransport keeps every one, and millions of requests
        would fill the memory); counts the answers written to it."""

        answers = 0

        def write(self, data: bytes) -> None:
            self.answers += data.count(b"HTTP/1.1 200 OK\r\n")

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # as proxy.server sets them
    h = Harness(CONFIG)
    upstreams = [h.seed(key) for key in ("10.0.0.1:80", "10.0.0.2:80") for _ in range(CONNECTIONS)]
    clients = []
    for up in upstreams:
        up.transport.__class__ = CountingTransport  # seeded by the harness as FakeTransports
    for i in range(CONNECTIONS):
        conn = ClientConnection(h.shared, h.tap, h.registry, False)
        transport = CountingTransport(conn, ("127.0.0.1", 40000 + i))
        conn.connection_made(transport)
        clients.append((conn, transport))
    heads = [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-User-Id: user-%d\r\n\r\n" % i
        for i in range(USERS)
    ]

    def turn(first: int) -> None:
        """What one busy turn of the loop does: a request read on every connection, the
        writes of the turn made, then every answer read, and those writes made."""
        for i, (conn, _) in enumerate(clients):
            conn.data_received(heads[(first + i) % USERS])
        outbox.flush()
        for up in upstreams:
            if up.conn.exchange is not None:
                up.conn.data_received(RESPONSE)
        outbox.flush()

    async def run(n: int) -> float:
        """µs a request over `n` turns."""
        start = time.perf_counter()
        for t in range(n):
            turn(t * CONNECTIONS)
            await asyncio.sleep(0)  # the turn's end: the handles it scheduled run
        return (time.perf_counter() - start) / (n * CONNECTIONS) * 1e6

    turns = max(1, requests // CONNECTIONS)
    await run(50)  # warm: spellings, sized heads, the adaptive interpreter
    best = min([await run(turns) for _ in range(rounds)])
    done = (50 + turns * rounds) * CONNECTIONS
    answered = sum(t.answers for _, t in clients)
    return best, {"requests": dict(h.requests()), "answered": answered, "expected": done}


def child(requests: int, rounds: int) -> None:
    import uvloop

    best, counted = uvloop.run(measure(requests, rounds))
    expected = counted["expected"]
    total = sum(counted["requests"].values())
    if total != expected or counted["answered"] != expected:
        raise SystemExit(f"inproc: {total} exchanges counted, {expected} expected: {counted}")
    print(f"{best:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.requests, args.rounds)
        return 0
    rows = []
    for name, pure in (("compiled", False), ("pure", True)):
        env = {k: v for k, v in os.environ.items() if k != "TURNOUT_PURE"}
        if pure:
            env["TURNOUT_PURE"] = "1"
        argv2 = [sys.executable, "-m", "bench.inproc", "--child"]
        argv2 += ["--requests", str(args.requests), "--rounds", str(args.rounds)]
        out = subprocess.run(argv2, cwd=REPO, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"inproc: the {name} build failed:\n{out.stderr or out.stdout}", file=sys.stderr)
            return 1
        rows.append((name, float(out.stdout.split()[-1])))
    runs = f"{args.requests:,} requests × {args.rounds} rounds"
    print(f"\nThe data plane in-process, {runs}, the best round:\n")
    print("| build | µs a request | × compiled |")
    print("|---|---:|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} | {us / rows[0][1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
