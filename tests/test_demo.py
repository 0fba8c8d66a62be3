"""`turnout demo`: plays the release, narrates it, keeps users sticky, stops cleanly on Ctrl-C.

The demo runs as `python -m proxy demo` in a subprocess on free ports
(TURNOUT_DEMO_PORTS="PROXY,ADMIN,BLUE,GREEN"), so it never collides with a
demo or proxy already running on the default ports.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from proxy import demo

from .support import free_ports

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[1]
SHARE_LINE = re.compile(
    r"^\s+(\d+)s\s+weight (\d+)%\s+blue\s+(\d+)% \S+\s+green\s+(\d+)% \S+"
    r"\s+\(req/s (\d+), errors (\d+)\)$",
    re.M,
)
ARROW = "(?:→|->)"


def demo_env(ports: list[int]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TURNOUT_DEMO_PORTS=",".join(map(str, ports)),
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
    )
    return env


def command(duration: float) -> list[str]:
    return [sys.executable, "-m", "proxy", "demo", "--duration", str(duration)]


def assert_ports_released(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # raises if the demo left a listener behind


# ------------------------------------------------------------------- the whole demo


def test_demo_plays_the_release_and_keeps_users_sticky() -> None:
    ports = free_ports(4)
    started = time.monotonic()
    result = subprocess.run(
        command(6),
        cwd=ROOT,
        env=demo_env(ports),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert elapsed < 120  # the whole demo ends by itself in under two minutes
    assert "Traceback" not in result.stderr, result.stderr

    # the header says what runs where
    assert f"http://127.0.0.1:{ports[0]}" in out
    assert f"http://127.0.0.1:{ports[1]}/status" in out
    assert f"http://127.0.0.1:{ports[1]}/metrics" in out

    # one live line a second, with each version's share; errors only once green fails
    shares = SHARE_LINE.findall(out)
    assert len(shares) >= 20, out
    fault_at = out.index("fault injected into green")
    for line in SHARE_LINE.finditer(out):
        _second, _weight, blue, green, rate, errors = line.groups()
        assert int(blue) + int(green) in (99, 100, 101)
        assert int(rate) > 20
        if line.start() < fault_at:
            assert int(errors) == 0, line.group(0)
    first, last = shares[0], shares[-1]
    assert first[1] == "10" and 3 <= int(first[3]) <= 20  # 4 of 40 users at weight 10
    assert last[1] == "100" and int(last[3]) == 100  # the fixed build completed

    # the weight changes, hot-applied through the file watcher
    for old, new in (("10", "30"), ("30", "50")):
        assert re.search(rf"routing\.weight {old} {ARROW} {new}", out), out
    applied = re.findall(r"applied: generation (\d+) in force after (\d+) ms", out)
    assert [g for g, _ in applied] == ["2", "3"], out
    assert all(int(ms) < 5000 for _, ms in applied)

    # the dark launch: copies compared, nobody served by green, a body change caught
    assert re.search(r"\d+ copies sent, \d+ matched, 0 mismatched; 0 users on green", out), out
    assert "mismatch caught: GET /hello — body differs at cart.total" in out, out

    # the guarded release: steps, an approval only role product may give, a rollback
    # within seconds with its evidence, then a fixed build that completes
    assert "rollout progressing: step 0, weight 0% plus ring internal" in out, out
    assert re.search(r"waiting for evidence that the canary is under its limits: needs ~\d+ "
                     r"more canary requests to promote", out), out  # fmt: skip
    assert "step 3, weight 25% plus ring internal, waiting for role product" in out, out
    assert re.search(r"promote by ci-bot \(role engineer\) refused: 403", out), out
    assert "promote by pat (role product): approved" in out, out
    took = re.search(r"guard rolled back to blue (\d+\.\d) s after the fault", out)
    assert took and float(took.group(1)) < 3.0, out
    window = r"test (relative|error_rate): \S+, p = \S+ < alpha"
    cumulative = r"cumulative evidence: .*; breach \((relative|error_rate)\): e-value"
    assert re.search(window, out) or re.search(cumulative, out), out
    assert "every user is on blue" in out, out
    assert "rollback latch cleared, rollout restarted at step 0" in out, out
    assert "rollout complete: green 2.0.1 serves 100% of users" in out, out

    # stickiness: nobody went from green back to blue
    assert re.search(r"\b0 flipped from green back to blue\b", out), out
    assert "misbehave" not in out
    assert_ports_released(ports)


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    ports = free_ports(4)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    with subprocess.Popen(
        command(30),
        cwd=ROOT,
        env=demo_env(ports),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
    ) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not any(SHARE_LINE.match(line.rstrip("\n")) for line in seen):
                assert time.monotonic() < deadline, "no live line within 30 s:\n" + "".join(seen)
                try:
                    seen.append(lines.get(timeout=1))
                except queue.Empty:
                    assert proc.poll() is None, "the demo exited early:\n" + "".join(seen)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            stopped_in = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert proc.returncode == 0, out
    assert stopped_in < 15, f"stopping took {stopped_in:.1f} s"
    assert out.rstrip().splitlines()[-1] == "stopped", out
    assert "Traceback" not in out, out
    assert_ports_released(ports)


def test_a_busy_port_is_one_line_and_exit_1() -> None:
    ports = free_ports(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        result = subprocess.run(
            command(5),
            cwd=ROOT,
            env=demo_env(ports),
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"{ports[0]} already in use" in result.stderr
    assert "TURNOUT_DEMO_PORTS" in result.stderr


def test_bad_port_override_is_rejected() -> None:
    env = demo_env([1, 2, 3, 4])
    env["TURNOUT_DEMO_PORTS"] = "8080,9901"
    result = subprocess.run(
        command(5), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "TURNOUT_DEMO_PORTS must be four ports" in result.stderr


# ------------------------------------------------------------------- its upstream


async def test_upstream_names_itself_and_injects_faults() -> None:
    port = free_ports(1)[0]
    green = demo.DemoUpstream("green", port)
    await green.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{green.url}/cart?x=1") as resp:
                assert resp.status == 200
                assert await resp.json() == {
                    "version": "green",
                    "path": "/cart?x=1",
                    "cart": {"items": 3, "total": 42.0},
                }
            green.quirk = True  # the behaviour change the dark launch catches
            async with session.get(f"{green.url}/cart") as resp:
                assert (await resp.json())["cart"]["total"] == 41.5
            green.fault_rate = 1.0
            async with session.get(f"{green.url}/") as resp:
                assert resp.status == 500
                assert (await resp.json())["version"] == "green"
        assert (green.served, green.faults) == (3, 1)
    finally:
        await green.stop()
