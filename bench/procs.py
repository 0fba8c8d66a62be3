"""Child processes of the benchmark: start, wait for readiness, and always stop.

Rules: every server the harness starts goes through `Processes.start`, which
puts it in its own session (so a terminal Ctrl-C reaches only the harness,
which then stops children in order) and logs its output to a file in the work
directory. `Processes.stop_all` signals each child by its own PID (SIGTERM,
then SIGKILL after a grace period) and finally kills whatever is left in that
child's own process group (nginx workers, a proxy's worker processes). Nothing
is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class BenchError(Exception):
    """A failure with a message meant for the operator (no traceback needed)."""


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    last = text.strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in last) or "    (log is empty)"


class Processes:
    """The registry of started children; `stop_all` is safe to call twice."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children.append((name, proc))
        return proc, log

    def stop_all(self, grace: float = 5.0) -> None:
        # stop in reverse start order: proxies before the upstreams they use
        while self._children:
            _, proc = self._children.pop()
            stop(proc, grace)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` s, SIGKILL; then clear the child's own group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    # the child led its own session, so its group id is its PID: this reaches
    # only processes it started itself (e.g. nginx workers orphaned by a kill)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for_port(
    proc: subprocess.Popen[bytes], port: int, log: Path, what: str, timeout: float
) -> None:
    """Until 127.0.0.1:port accepts a connection; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive(proc, log, what)
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s; "
                f"its log ({log}):\n{tail(log)}"
            )
        time.sleep(0.05)


def wait_for_http_200(
    proc: subprocess.Popen[bytes], port: int, path: str, log: Path, what: str, timeout: float
) -> None:
    """Poll GET http://127.0.0.1:port{path} until 200; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        check_alive(proc, log, what)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what} was not ready within {timeout:g}s "
                f"(GET http://127.0.0.1:{port}{path}: {last}); its log ({log}):\n{tail(log)}"
            )
        time.sleep(0.1)


def check_alive(proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    code = proc.poll()
    if code is not None:
        raise BenchError(f"{what} exited with status {code}; its log ({log}):\n{tail(log)}")
