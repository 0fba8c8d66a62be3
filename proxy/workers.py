"""`turnout run --workers N`: N proxy processes on one port, one release state.

Rules:
- The supervisor (the process started as `turnout run`) checks the config,
  starts N workers (`python -m proxy run` with TURNOUT_WORKER=i/N), and owns
  them: SIGHUP is passed on to every worker, SIGTERM/SIGINT makes every
  worker drain and the supervisor exits 0 once they all have. A worker that
  dies on its own is started again after RESPAWN_DELAY; one that dies
  CRASH_LIMIT times in a row within STARTUP seconds of starting stops the
  whole fleet (exit 1): a port in use or a broken install does not heal. A
  worker whose supervisor is gone (killed outright) drains and exits within a
  second, so no orphan keeps the port.
- Every worker listens on `listen` with SO_REUSEPORT; the kernel spreads
  connections over them. Routing needs no coordination (buckets are pure).
- Worker 0 leads: it serves `admin.listen`, judges the canary from the counts
  of the whole fleet, drives the rollout, and is the only writer of the state
  file. The others follow: they read the state file when it changes (checked
  every controller tick) and route by it, so a rollback is in force in every
  worker within a second.
- Each follower answers its counters on a Unix socket in a private folder;
  the leader collects them every tick. `/metrics` and `/status` on the admin
  port show the sum, so one scrape covers the fleet. A follower that restarts
  counts from zero again: what it had counted is kept by the leader, so the
  exported counters never go down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

from .metrics import Recorder

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("turnout.workers")

ENV_WORKER = "TURNOUT_WORKER"  # "i/N": this process is worker i of N
ENV_DIR = "TURNOUT_WORKER_DIR"  # the fleet's private folder (Unix sockets)
RESPAWN_DELAY = 1.0  # seconds before a dead worker is started again
STARTUP = 5.0  # a worker that dies sooner than this after starting "crashed at start"
CRASH_LIMIT = 3  # crashes at start in a row that stop the fleet
COUNTS_PATH = "/worker/counts"
FETCH_TIMEOUT = 1.0


def parse_workers(value: str) -> int:
    """`--workers`: a positive number, or `auto` for one per core."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', got {value!r}") from None
    if not 1 <= n <= 256:
        raise ValueError(f"--workers must be between 1 and 256, got {n}")
    return n


@dataclass(frozen=True)
class Role:
    """Which worker this process is, when it is one."""

    index: int
    count: int
    folder: str
    supervisor: int  # its pid: a worker whose supervisor is gone stops

    def orphaned(self) -> bool:
        return os.getppid() != self.supervisor

    @property
    def leader(self) -> bool:
        return self.index == 0

    def socket(self, index: int) -> str:
        return os.path.join(self.folder, f"worker-{index}.sock")


def role_from_env() -> Role | None:
    spec = os.environ.get(ENV_WORKER)
    folder = os.environ.get(ENV_DIR)
    if not spec or not folder:
        return None
    index, _, count = spec.partition("/")
    return Role(int(index), int(count), folder, os.getppid())


# -- the supervisor -----------------------------------------------------------------------


class Supervisor:
    def __init__(self, config_path: str, count: int, log_level: str) -> None:
        self.config_path = config_path
        self.count = count
        self.log_level = log_level
        self.folder = ""
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.crashes: dict[int, int] = {}
        self.respawn_at: dict[int, float] = {}
        self.stopping = False
        self.failed = False

    def spawn(self, index: int) -> None:
        env = dict(os.environ)
        env[ENV_WORKER] = f"{index}/{self.count}"
        env[ENV_DIR] = self.folder
        cmd = [sys.executable, "-m", "proxy", "run", "-c", self.config_path,
               "--log-level", self.log_level]  # fmt: skip
        self.procs[index] = subprocess.Popen(cmd, env=env)
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, self.procs[index].pid)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def on_stop(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("stopping %d workers (signal %d)", len(self.procs), signum)
        self.stopping = True
        self.respawn_at.clear()
        self.signal_all(signal.SIGTERM)

    def on_reload(self, _signum: int, _frame: object) -> None:
        self.signal_all(signal.SIGHUP)

    def run(self) -> int:
        self.folder = tempfile.mkdtemp(prefix="turnout-workers-")
        os.chmod(self.folder, 0o700)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_reload)
        try:
            for i in range(self.count):
                self.spawn(i)
            while self.procs or self.respawn_at:
                self.reap()
                time.sleep(0.1)
        finally:
            if self.procs:  # leaving on an error of our own: take the workers along
                self.on_stop(signal.SIGTERM, None)
            for proc in self.procs.values():
                proc.wait()
            shutil.rmtree(self.folder, ignore_errors=True)
        log.info("all workers stopped")
        return 1 if self.failed else 0

    def reap(self) -> None:
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[index]
            if self.stopping:
                continue
            early = now - self.started[index] < STARTUP
            self.crashes[index] = self.crashes.get(index, 0) + 1 if early else 1
            log.error("worker %d (pid %d) exited with %s", index, proc.pid, code)
            if self.crashes[index] >= CRASH_LIMIT:
                log.error("worker %d keeps failing at start: stopping", index)
                self.failed = True
                self.on_stop(signal.SIGTERM, None)
                return
            self.respawn_at[index] = now + RESPAWN_DELAY
        for index, at in list(self.respawn_at.items()):
            if at <= now and not self.stopping:
                del self.respawn_at[index]
                self.spawn(index)


# -- counts across the fleet ------------------------------------------------------------------


class CountsListener:
    """A follower's side: its counters, on its Unix socket, for the leader."""

    def __init__(self, role: Role, server: Server) -> None:
        self.role = role
        self.server = server
        self.runner: web.AppRunner | None = None

    async def counts(self, request: web.Request) -> web.Response:
        doc = {
            "pid": os.getpid(),
            "counts": self.server.runtime.recorder.counts(),
            "mismatches": list(self.server.mirroring.mismatches),
        }
        return web.json_response(doc)

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get(COUNTS_PATH, self.counts)])
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        path = self.role.socket(self.role.index)
        if os.path.exists(path):
            os.unlink(path)  # left by this worker's previous life
        await web.UnixSite(self.runner, path).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Fleet:
    """The leader's side: the latest counters of every follower, and their sum."""

    def __init__(self, role: Role, own: Recorder) -> None:
        self.role = role
        self.own = own
        self.latest: dict[int, tuple[int, dict]] = {}  # index -> (pid, counts)
        self.mismatches: dict[int, list[dict]] = {}  # index -> its latest mismatch events
        self.gone = Recorder()  # what followers counted before they restarted
        self.sessions: dict[int, ClientSession] = {}

    def members(self) -> list[dict]:
        """Each worker's pid and the requests it has answered since it started."""
        out = [{"index": 0, "pid": os.getpid(), "requests": sum(self.own.requests.values())}]
        for index, (pid, counts) in sorted(self.latest.items()):
            answered = sum(n for _, _, n in counts.get("requests", ()))
            out.append({"index": index, "pid": pid, "requests": answered})
        return out

    async def collect(self) -> None:
        """Fetch every follower's counters (a missing one keeps its last answer)."""
        await asyncio.gather(*(self.fetch(i) for i in range(1, self.role.count)))

    async def fetch(self, index: int) -> None:
        session = self.sessions.get(index)
        if session is None or session.closed:
            session = self.sessions[index] = ClientSession(
                connector=UnixConnector(path=self.role.socket(index)),
                timeout=ClientTimeout(total=FETCH_TIMEOUT),
            )
        try:
            async with session.get(f"http://worker{COUNTS_PATH}") as resp:
                doc = await resp.json()
        except (ClientError, OSError, TimeoutError, ValueError):
            return  # starting, restarting or busy: its last counts stand
        pid, counts = int(doc["pid"]), doc["counts"]
        self.mismatches[index] = doc.get("mismatches", [])
        before = self.latest.get(index)
        if before is not None and before[0] != pid:
            self.gone.add_counts(before[1])  # a new process counts from zero
        self.latest[index] = (pid, counts)

    def merged(self) -> Recorder:
        """The whole fleet's counters, with the leader's gauges."""
        rec = self.own.copy()
        rec.add_counts(self.gone.counts())
        in_flight = dict(self.own.in_flight())
        for _, counts in self.latest.values():
            rec.add_counts(counts)
            for version, n in counts.get("in_flight", {}).items():
                in_flight[version] = in_flight.get(version, 0) + n
        rec.in_flight = lambda: in_flight
        return rec

    def reload_followers(self) -> None:
        """The leader reloaded on request: the followers reload too."""
        for pid, _ in self.latest.values():
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass  # restarting: it reads the file when it starts

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()
