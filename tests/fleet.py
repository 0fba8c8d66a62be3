"""Real servers a fleet of replicas shares in the tests: Prometheus (with a scrape
config for the replicas) and Redis, on loopback ports chosen here, stopped by PID.

The binaries are Debian's (`prometheus`, `redis-server`); `make test` installs them
when they are missing (the Makefile's `test-tools`). A test that needs one and cannot
find it fails with that hint: it is never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .support import LOOPBACK, free_ports


def binary(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: `make test` installs it as root (make test-tools), "
            f"or run `apt-get install {name}`"
        )
    return path


class Server:
    """A subprocess on a loopback port, its output in a log file, stopped by PID."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_ports(1)[0]
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def ready(self) -> bool:
        raise NotImplementedError

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if await self.ready():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log()}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class PrometheusServer(Server):
    """Prometheus scraping `targets` (host:port of admin listeners) every second."""

    def __init__(self, workdir: Path, targets: list[str], job: str = "turnout") -> None:
        super().__init__(workdir, "prometheus")
        self.job = job
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": job,
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": targets}],
            }],
        }))  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        return [
            binary("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]

    async def ready(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.get(self.url + "/-/ready") as r,
            ):
                return r.status == 200
        return False

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
            s.get(self.url + "/api/v1/query", params={"query": promql}) as r,
        ):
            doc = await r.json()
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    async def scraped(self, count: int) -> bool:
        """Whether `count` targets of the job are up (scraped successfully)."""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, AssertionError):
            up = await self.query(f'up{{job="{self.job}"}} == 1')
            return len(up) >= count
        return False


class RedisServer(Server):
    """redis-server on loopback, appending every write to its file (fsync always), so
    that a restart (same folder) finds everything that was acknowledged."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "redis")

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            binary("redis-server"),
            "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(self.workdir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--protected-mode", "no", "--loglevel", "warning",
        ]  # fmt: skip

    async def ready(self) -> bool:
        return await self.call("PING") == b"+PONG"

    async def call(self, *words: str) -> bytes | None:
        """One command in the inline protocol; the first line of the answer."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, self.port), 1.0
            )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write((" ".join(words) + "\r\n").encode())
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 2.0)).rstrip()
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()

    async def lrange(self, key: str) -> list[bytes]:
        """LRANGE key 0 -1, read from the protocol's array answer."""
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            writer.write(f"LRANGE {key} 0 -1\r\n".encode())
            await writer.drain()
            header = await asyncio.wait_for(reader.readline(), 2.0)
            assert header.startswith(b"*"), header
            items = []
            for _ in range(int(header[1:])):
                size = int((await reader.readline())[1:])
                items.append((await reader.readexactly(size + 2))[:-2])
            return items
        finally:
            writer.close()


# -- what a Prometheus query answers, for scripted servers and literal answers ----------


def sample(value: float, **labels: str) -> dict[str, Any]:
    """One element of an instant vector."""
    return {"metric": labels, "value": [1700000000.0, repr(float(value))]}


def bucket_samples(version: str, cumulative: dict[float, float]) -> list[dict[str, Any]]:
    """Cumulative histogram counts by bound (ms; inf for +Inf), as `sum by (version, le)`."""
    out = []
    for ms, n in cumulative.items():
        le = "+Inf" if ms == float("inf") else repr(ms / 1000.0)
        out.append(sample(n, version=version, le=le))
    return out
