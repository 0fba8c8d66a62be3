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
  file. The others follow the leader, never the state file: on every change
  (and every controller tick) the leader pushes the state in force to each
  follower's Unix socket in the fleet's private folder, and the follower's
  answer says it is in force there and carries its counters. So a rollback is
  in force in every worker before it is reported done, whether or not the
  state file could be written.
- The private folder is the fleet's memory (`Ledger`): the leader writes the
  state in force there before pushing it, and the fleet's counters before it
  shows them; a worker started again takes the state from there, not from
  the state file (only the fleet's first start reads that), and a leader
  that takes over carries the counts on.
  A follower opens its socket before it reads the ledger, and the leader
  writes the ledger before it pushes: a change is either read or pushed.
- `/metrics` and `/status` on the admin port show the sum, so one scrape
  covers the fleet. Whatever worker restarts, leader or follower, what it had
  counted stays counted, so the exported counters never go down, and the
  guard's windows are handed over through the ledger too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientSession,
    ClientTimeout,
    UnixConnector,
    web,
)

from .metrics import Recorder

if TYPE_CHECKING:
    from .controller import Controller
    from .mirror import Mirroring
    from .runtime import Runtime

log = logging.getLogger("turnout.workers")

ENV_WORKER = "TURNOUT_WORKER"  # "i/N": this process is worker i of N
ENV_DIR = "TURNOUT_WORKER_DIR"  # the fleet's private folder (Unix sockets)
RESPAWN_DELAY = 1.0  # seconds before a dead worker is started again
STARTUP = 5.0  # a worker that dies sooner than this after starting "crashed at start"
CRASH_LIMIT = 3  # crashes at start in a row that stop the fleet
SYNC_PATH = "/worker/sync"
# A follower that has not taken a pushed state within this is reported as not
# confirming it: an action that sets the latch answers within a second.
PUSH_TIMEOUT = 0.8
LEDGER_STATE = "state.json"  # the state in force: {"mark": [epoch, seq], "state": ...}
LEDGER_COUNTS = "counts.json"  # what the fleet has counted
LEDGER_GUARD = "guard.json"  # the guard's windows at the last tick
# Counters only the leader counts (they are not summed over workers)
LEADER_COUNTERS = ("rollbacks", "breaches", "state_write_failures")


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


# -- the fleet's memory ----------------------------------------------------------------------


class Ledger:
    """Files in the fleet's private folder, which outlives every worker.

    Each name has two slots written in turn, each copy numbered: a reader takes
    the newest copy that parses, so a copy cut short by a worker's death (or
    read while it is written) costs one step of age, never a wrong value. A
    copy is written in place (no new file, no rename: this runs several times
    a tick) and not fsynced: it outlives a worker's death, not the machine's,
    and the supervisor removes the folder when the fleet stops.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.numbers: dict[str, int] = {}  # name -> number of the last copy written
        self.fds: dict[str, int] = {}  # slot path -> open file
        self.error: str | None = None  # the last write error, logged once

    def slot(self, name: str, n: int) -> str:
        return os.path.join(self.folder, f"{name}.{n % 2}")

    def write(self, name: str, doc: dict) -> bool:
        n = self.numbers[name] + 1 if name in self.numbers else self.newest(name)[0] + 1
        path = self.slot(name, n)
        try:
            data = json.dumps({"n": n, "doc": doc}, separators=(",", ":")).encode()
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except (OSError, ValueError) as err:
            message = f"cannot write {path}: {err}"
            if message != self.error:  # once per distinct error: this runs every tick
                log.error("%s (a worker that starts now reads an older copy)", message)
            self.error = message
            return False
        self.numbers[name] = n
        self.error = None
        return True

    def read(self, name: str) -> dict | None:
        """The newest copy written, or None when there is none."""
        return self.newest(name)[1]

    def newest(self, name: str) -> tuple[int, dict | None]:
        best: tuple[int, dict | None] = (0, None)
        for n in (0, 1):
            try:
                with open(self.slot(name, n), "rb") as f:
                    copy = json.loads(f.read())
                number, doc = int(copy["n"]), copy["doc"]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # cut short, or being written: the other slot stands
            if number > best[0] and isinstance(doc, dict):
                best = (number, doc)
        return best


# -- the leader <-> follower channel ---------------------------------------------------------


class Channel:
    """A follower's side: takes the state the leader pushes, answers its counters."""

    def __init__(
        self, role: Role, controller: Controller, runtime: Runtime, mirroring: Mirroring
    ) -> None:
        self.role = role
        self.controller = controller
        self.runtime = runtime
        self.mirroring = mirroring
        self.runner: web.AppRunner | None = None

    async def sync(self, request: web.Request) -> web.Response:
        try:
            self.controller.adopt(await request.json())
        except (ValueError, KeyError, TypeError) as err:
            return web.json_response({"error": f"bad state: {err}"}, status=400)
        ctl = self.controller
        doc = {
            "pid": os.getpid(),
            "at": time.monotonic_ns(),  # orders answers that cross on the way
            "counts": self.runtime.recorder.counts(),
            "mismatches": list(self.mirroring.mismatches),
            "mark": list(ctl.mark) if ctl.mark is not None else None,
            "latched": self.runtime.latch.active,
        }
        return web.json_response(doc)

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.add_routes([web.post(SYNC_PATH, self.sync)])
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
    """The leader's side: pushes the state, keeps every follower's latest counters, sums them.

    What the fleet has counted is written to the ledger each time the sum is
    taken (before anything shows it), so a leader that takes over starts from
    it: the dead leader's own counts and what dead followers had counted are
    carried, and the exported counters never go down.
    """

    def __init__(self, role: Role, own: Recorder, ledger: Ledger) -> None:
        self.role = role
        self.own = own
        self.ledger = ledger
        self.state: Callable[[], dict] = dict  # the state doc to push (the controller's)
        self.latest: dict[int, tuple[int, dict]] = {}  # index -> (pid, counts)
        self.stamps: dict[int, int] = {}  # index -> `at` of the answer in `latest`
        self.marks: dict[int, tuple[int, int] | None] = {}  # index -> the state it has in force
        self.latched: dict[int, bool] = {}
        self.mismatches: dict[int, list[dict]] = {}  # index -> its latest mismatch events
        self.gone = Recorder()  # what dead workers counted (followers, earlier leaders)
        self.sessions: dict[int, ClientSession] = {}
        self.carry(ledger.read(LEDGER_COUNTS))

    def carry(self, doc: dict | None) -> None:
        """Take over from a dead leader: what the fleet had counted stays counted."""
        if doc is None:
            return
        try:
            gone = Recorder()
            gone.add_counts(doc["gone"])
            gone.add_counts(doc["own"])  # the dead leader's own counts
            latest = {int(i): (int(pid), counts) for i, (pid, counts) in doc["latest"].items()}
            scalars = {name: int(doc["scalars"].get(name, 0)) for name in LEADER_COUNTERS}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            log.error("cannot carry the fleet's counts over (%s): they start from zero", err)
            return
        self.gone, self.latest = gone, latest
        for name, n in scalars.items():
            setattr(self.own, name, getattr(self.own, name) + n)
        log.info("took over the fleet's counts (%d workers' latest)", len(latest))

    def members(self) -> list[dict]:
        """Each worker's pid, the requests it has answered since it started, its latch."""
        rt_latched = bool(self.own.rollback_active)
        out: list[dict[str, Any]] = [{"index": 0, "pid": os.getpid(),
                "requests": sum(self.own.requests.values()), "latched": rt_latched}]  # fmt: skip
        for index, (pid, counts) in sorted(self.latest.items()):
            answered = sum(n for _, _, n in counts.get("requests", ()))
            latched = self.latched.get(index)
            out.append({"index": index, "pid": pid, "requests": answered, "latched": latched})
        return out

    async def sync(self) -> dict[int, str]:
        """Push the state in force to every follower and take its counters.

        Per follower: "ok" (the state is in force there), "down" (nothing listens
        on its socket: it reads the state from the ledger when it starts), or why not.
        """
        doc = self.state()
        indexes = range(1, self.role.count)
        results = await asyncio.gather(*(self.sync_one(i, doc) for i in indexes))
        return dict(zip(indexes, results, strict=True))

    async def sync_one(self, index: int, doc: dict) -> str:
        session = self.sessions.get(index)
        if session is None or session.closed:
            session = self.sessions[index] = ClientSession(
                connector=UnixConnector(path=self.role.socket(index)),
                timeout=ClientTimeout(total=PUSH_TIMEOUT),
            )
        try:
            async with session.post(f"http://worker{SYNC_PATH}", json=doc) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    return f"refused the state: {answer.get('error')}"
        except ClientConnectorError:
            return "down"  # starting or restarting: its last counts stand
        except TimeoutError:
            return f"no answer within {PUSH_TIMEOUT} s"
        except (ClientError, OSError, ValueError) as err:
            return f"no answer ({err.__class__.__name__})"
        self.take(index, answer)
        mark = answer.get("mark")
        return "ok" if mark is not None and tuple(mark) >= tuple(doc["mark"]) else "stale"

    def take(self, index: int, answer: dict) -> None:
        """Keep a follower's answer unless a newer one has arrived already."""
        pid, at = int(answer["pid"]), int(answer["at"])
        before = self.latest.get(index)
        if before is not None and before[0] == pid and at <= self.stamps.get(index, 0):
            return  # two pushes crossed: counters never go back
        if before is not None and before[0] != pid:
            self.gone.add_counts(before[1])  # a new process counts from zero
        self.latest[index] = (pid, answer["counts"])
        self.stamps[index] = at
        self.mismatches[index] = answer.get("mismatches", [])
        self.latched[index] = bool(answer.get("latched"))

    def merged(self) -> Recorder:
        """The whole fleet's counters, with the leader's gauges; written to the ledger first."""
        rec = self.own.copy()
        rec.add_counts(self.gone.counts())
        in_flight = dict(self.own.in_flight())
        for _, counts in self.latest.values():
            rec.add_counts(counts)
            for version, n in counts.get("in_flight", {}).items():
                in_flight[version] = in_flight.get(version, 0) + n
        rec.in_flight = lambda: in_flight
        self.ledger.write(LEDGER_COUNTS, {
            "own": self.own.counts(), "gone": self.gone.counts(),
            "latest": {str(i): [pid, counts] for i, (pid, counts) in self.latest.items()},
            "scalars": {name: getattr(self.own, name) for name in LEADER_COUNTERS},
        })  # fmt: skip
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
