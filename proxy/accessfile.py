"""The access log's writer: records from the event loop to a file, off the loop.

Rules:
- Every FLUSH_INTERVAL the loop takes the records waiting (proxy.accesslog)
  and formats them SLICE at a time, one slice per turn of the loop, so the
  requests in between wait for a quarter of a millisecond at most; one writer thread
  writes the slices. The loop never waits on the file. (Formatting on the
  thread was measured worse: it competes with the loop for the interpreter
  lock, which cost more throughput and added milliseconds to p99.)
- At most QUEUE_BYTES wait for the thread. A writer stuck on a slow
  or full disk makes the next ones be dropped and counted
  (`turnout_access_log_dropped_total`); requests never wait for the log.
- A failed write (no space left, an I/O error) drops that batch's unwritten
  lines, counts them, and says so once in the log until writes succeed again.
- The file is opened for appending (O_APPEND), so several workers may share
  it: each write is whole lines. To a pipe, writes are cut at line ends within
  PIPE_BUF bytes, which the kernel keeps whole when several processes write.
- `reopen()` (SIGHUP, after logrotate renamed the file) writes what came
  before to the old file, then opens the path afresh. A file that cannot be
  opened keeps the old one in use, and the open is tried again at most once a
  second. A file deleted under the writer is made again at its path.
- `close()` (drain, or the log turned off) writes everything recorded, then
  stops the thread; a thread stuck in a write is given up after CLOSE_WAIT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import select
import stat
import threading
import time
from collections import deque

from .accesslog import PENDING_MAX, AccessLog, Formatter, Record
from .metrics import Recorder

log = logging.getLogger("turnout.access")

FLUSH_INTERVAL = 0.1  # seconds between two takes of the records (the contract: <= 1 s)
SLICE = 256  # records formatted per turn of the loop: about a quarter of a millisecond
QUEUE_BYTES = 16 << 20  # formatted bytes waiting for the writer; beyond, dropped
CLOSE_WAIT = 5.0  # seconds close() waits for the writer to finish
REOPEN_EVERY = 1.0  # seconds between two tries to open a file that would not open
_WAKE = object()  # an item that only wakes the thread (to reopen)
_STOP = object()
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class LogOpenError(Exception):
    """The access log's file cannot be opened."""


def open_log(path: str) -> int:
    """A descriptor to append to; "-" is standard output. Raises OSError.

    Opened without blocking (a FIFO nobody reads is refused, ENXIO, instead of
    hanging the open), then set to block: the writer thread waits, not the loop.
    """
    if path == "-":
        return os.dup(1)
    fd = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK, 0o644)
    os.set_blocking(fd, True)
    return fd


def is_pipe(fd: int) -> bool:
    """A FIFO or a socket: where writes from several processes may interleave."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class AccessWriter:
    """One per process while access_log is on; made with the records' list and the
    recorder whose `access_log_dropped` it keeps up to date."""

    def __init__(self, records: AccessLog, recorder: Recorder, path: str) -> None:
        self.records = records
        self.recorder = recorder
        self.path = path
        try:
            self.fd = open_log(path)
        except OSError as exc:
            why = exc.strerror or exc
            raise LogOpenError(f"cannot open the access log {path}: {why}") from None
        self.piped = is_pipe(self.fd)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Bytes handed to the writer, and bytes it is done with (each counter is written
        # by one thread only): their difference is what waits.
        self.handed = 0
        self.handled = 0
        self.want_open: str | None = None  # a path to open before the next write
        self.open_failed_at = 0.0
        self.failing = False  # writes fail: said once, until one succeeds
        self.torn = False  # a failed write left a line unfinished
        self.formatter = Formatter()
        self.todo: deque[list[Record]] = deque()  # batches taken, not yet formatted
        self.at = 0  # where formatting is in todo[0]
        self.unformatted = 0  # records in todo past `at`
        self.formatting = False  # format_slice is scheduled
        self.thread = threading.Thread(target=self.run, name="turnout-access-log", daemon=True)
        self.task: asyncio.Task | None = None

    # -- the loop's side ----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.task = asyncio.get_running_loop().create_task(self.flushing())

    async def flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        """Take what was recorded, to be formatted a slice per turn of the loop."""
        batch = self.records.take()
        if batch:
            if self.unformatted > PENDING_MAX:  # the loop is that far behind: drop
                self.records.dropped += len(batch)
            else:
                self.todo.append(batch)
                self.unformatted += len(batch)
                if not self.formatting:
                    self.formatting = True
                    asyncio.get_running_loop().call_soon(self.format_slice)
        self.recorder.access_log_dropped = self.records.lost()

    def format_slice(self) -> None:
        """Format up to SLICE records and queue them for the writer; again next turn."""
        if not self.todo:
            self.formatting = False
            return
        batch, at = self.todo[0], self.at
        stop = min(at + SLICE, len(batch))
        data = self.formatter.lines(batch, at, stop, time.time() - time.monotonic())
        self.unformatted -= stop - at
        if stop == len(batch):
            self.todo.popleft()
            self.at = 0
        else:
            self.at = stop
        if self.handed - self.handled >= QUEUE_BYTES:  # the writer is stuck: drop
            self.records.dropped += stop - at
        else:
            self.handed += len(data)
            self.queue.put(data)
        asyncio.get_running_loop().call_soon(self.format_slice)

    def reopen(self, path: str | None = None) -> None:
        """Open the file afresh (`path`: a new one); what was recorded so far may go
        to either file, none is lost."""
        self.flush()
        self.want_open = path or self.path
        self.queue.put(_WAKE)  # the writer also looks at want_open before each write

    async def close(self) -> None:
        """Write everything recorded (the loop formats it now: the proxy is stopping
        or the log is turned off), then stop the writer."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.flush()
        offset = time.time() - time.monotonic()
        for i, batch in enumerate(self.todo):
            first = self.at if i == 0 else 0
            self.queue.put(self.formatter.lines(batch, first, len(batch), offset))
        self.todo.clear()
        self.unformatted = 0
        self.queue.put(_STOP)
        await asyncio.to_thread(self.thread.join, CLOSE_WAIT)
        if self.thread.is_alive():
            log.warning("access log: the writer is stuck writing to %s: lines lost", self.path)
            return
        lost = self.recorder.access_log_dropped = self.records.lost()
        if lost:
            log.warning("access log closed: %d lines dropped in all", lost)

    # -- the writer thread ----------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    break
                if isinstance(item, bytes):
                    self.write(item)
                    self.handled += len(item)
                elif self.want_open is not None:
                    self.open_now()
        finally:
            os.close(self.fd)

    def open_now(self) -> None:
        path = self.want_open
        if path is None or time.monotonic() - self.open_failed_at < REOPEN_EVERY:
            return  # the last try failed a moment ago: go on with the old file for now
        try:
            fd = open_log(path)
        except OSError as exc:
            if not self.open_failed_at:
                log.error("access log: cannot open %s (%s): still writing to %s", path,
                          exc.strerror or exc, self.path)  # fmt: skip
            self.open_failed_at = time.monotonic()
            return
        if self.open_failed_at:
            log.warning("access log: %s is open again", path)
        os.close(self.fd)
        self.fd = fd
        self.piped = is_pipe(fd)
        self.path = path
        if self.want_open == path:
            self.want_open = None
        self.open_failed_at = 0.0

    def removed(self) -> bool:
        """The file was deleted under us (no name links to it): lines would vanish."""
        if self.path == "-":
            return False
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def write(self, data: bytes) -> None:
        if self.want_open is None and self.removed():
            self.want_open = self.path  # made again where the operator looks for it
        if self.want_open is not None:
            self.open_now()
        if self.torn:
            data = b"\n" + data  # the last write stopped mid-line: end that line first
            self.torn = False
        pos, total = 0, len(data)
        try:
            while pos < total:
                end = total
                if self.piped and total - pos > select.PIPE_BUF:
                    cut = data.rfind(b"\n", pos, pos + select.PIPE_BUF)
                    end = cut + 1 if cut >= pos else data.find(b"\n", pos) + 1
                pos += os.write(self.fd, data[pos:end])
        except OSError as exc:
            lost = data.count(b"\n", pos)
            self.torn = pos > 0 and data[pos - 1] != 0x0A
            self.records.write_dropped += lost
            if not self.failing:
                self.failing = True
                why = exc.strerror or exc
                log.error("access log: writing to %s failed (%s): %d lines dropped, and more "
                          "until writes succeed", self.path, why, lost)  # fmt: skip
            return
        if self.failing:
            self.failing = False
            log.warning("access log: writing to %s succeeds again", self.path)
