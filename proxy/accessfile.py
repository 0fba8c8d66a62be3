"""The access log's writer: records from the event loop to a file, off the loop.

Rules:
- Every FLUSH_INTERVAL the loop takes the records waiting (proxy.accesslog)
  and formats them a slice per turn of the loop (SLICE records, more when
  far behind), so requests in between wait a quarter of a millisecond at
  most; one writer thread writes the text. The loop never waits on the file.
  (Formatting on the thread was measured worse: it competes with the loop for
  the interpreter lock, which cost more throughput and added milliseconds to
  p99.)
- The thread needs the interpreter lock only briefly, and waits for it each
  time the loop is busy: so each time it wakes it takes everything queued and
  writes it with one system call, and looks for a deleted file at most once a
  second.
- At most QUEUE_BYTES wait for the thread. While a writer is stuck on a slow
  or full disk, the records past that are dropped (unformatted) and counted
  in `turnout_access_log_dropped_total`; requests never wait for the log.
- A failed write (no space left, an I/O error) drops that write's unwritten
  lines, counts them, and says so once in the log until writes succeed again;
  a line it left unfinished is ended before the next one.
- The file is opened for appending (O_APPEND), so several workers may share
  it: each write is whole lines. To a pipe, writes are cut at line ends within
  PIPE_BUF bytes (a line is shorter, see proxy.accesslog), which the kernel
  keeps whole when several processes write.
- The path is the loop's (`target`); `reopen()` (SIGHUP after logrotate
  renamed the file, or a reload naming another path) asks the thread to open
  it: what came before goes to the old file. A file that cannot be opened
  keeps the old one in use, and the open is tried again at most once a
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
RETRY_EVERY = 1.0  # seconds between two tries to open a file, and between two checks
FILE_MODE = 0o640  # client addresses and query strings are not for every local user
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
    fd = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK, FILE_MODE)
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
        self.target = path  # the path the config names (the loop's)
        try:
            fd = open_log(path)
        except OSError as exc:
            why = exc.strerror or exc
            raise LogOpenError(f"cannot open the access log {path}: {why}") from None
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.lock = threading.Lock()  # guards want_open, which both threads change
        self.want_open: str | None = None  # a path the thread is to open before writing
        # Bytes handed to the writer, and bytes it is done with (each counter is written
        # by one thread only): their difference is what waits.
        self.handed = 0
        self.handled = 0
        self.formatter = Formatter()
        self.todo: deque[list[Record]] = deque()  # batches taken, not yet formatted
        self.at = 0  # where formatting is in todo[0]
        self.unformatted = 0  # records in todo past `at`
        self.formatting = False  # format_slice is scheduled
        self.task: asyncio.Task | None = None
        self.file = _File(fd, path, records)  # the thread's side
        self.thread = threading.Thread(target=self.run, name="turnout-access-log", daemon=True)

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
        """Format a slice and queue it for the writer; again next turn, until done."""
        if not self.todo:
            self.formatting = False
            return
        try:
            batch, at = self.todo[0], self.at
            stop = min(at + max(SLICE, self.unformatted // 8), len(batch))
            if self.handed - self.handled >= QUEUE_BYTES:  # the writer is stuck: drop
                self.records.dropped += stop - at
            else:
                data = self.formatter.lines(batch, at, stop, time.time() - time.monotonic())
                self.handed += len(data)
                self.queue.put(data)
            self.unformatted -= stop - at
            if stop == len(batch):
                self.todo.popleft()
                self.at = 0
            else:
                self.at = stop
        except Exception:  # a bug here must not stop the log for good
            log.exception("access log: formatting failed: %d lines dropped", self.unformatted)
            self.records.dropped += self.unformatted
            self.todo.clear()
            self.at = self.unformatted = 0
        asyncio.get_running_loop().call_soon(self.format_slice)

    def reopen(self, path: str | None = None) -> None:
        """Open the path afresh (`path`: a new one); what was recorded so far may go
        to either file, none is lost."""
        self.flush()
        if path is not None:
            self.target = path
        with self.lock:
            self.want_open = self.target
        self.queue.put(b"")  # wakes the thread

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
            data = self.formatter.lines(batch, first, len(batch), offset)
            self.handed += len(data)
            self.queue.put(data)
        self.todo.clear()
        self.unformatted = 0
        self.queue.put(_STOP)
        await asyncio.to_thread(self.thread.join, CLOSE_WAIT)
        if self.thread.is_alive():
            log.warning("access log: the writer is stuck writing to %s: %d bytes not written",
                        self.file.path, self.handed - self.handled)  # fmt: skip
            return
        lost = self.recorder.access_log_dropped = self.records.lost()
        if lost:
            log.warning("access log closed: %d lines dropped in all", lost)

    # -- the writer thread ----------------------------------------------------------------

    def run(self) -> None:
        stop = False
        while not stop:
            pieces = [self.queue.get()]
            while True:  # everything queued, in one write
                try:
                    pieces.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if pieces[-1] is _STOP:
                pieces.pop()
                stop = True
            chunks = [p for p in pieces if isinstance(p, bytes) and p]
            try:
                with self.lock:
                    want = self.want_open
                if self.file.open(want):
                    with self.lock:
                        if self.want_open == want:
                            self.want_open = None
                if chunks:
                    self.file.write(b"".join(chunks))
            except Exception:  # the thread must outlive any one failure
                log.exception("access log: the writer failed")
            finally:
                self.handled += sum(len(c) for c in chunks)
        self.file.close()


class _File:
    """The descriptor written to, and what happened to it: the writer thread's only."""

    def __init__(self, fd: int, path: str, records: AccessLog) -> None:
        self.fd = fd
        self.path = path
        self.records = records
        self.piped = is_pipe(fd)
        self.failing = False  # writes fail: said once, until one succeeds
        self.torn = False  # a failed write left a line unfinished
        self.open_failed_at = 0.0
        self.checked_at = time.monotonic()

    def removed(self) -> bool:
        """The file was deleted under us (no name links to it): lines would vanish."""
        if self.path == "-":
            return False
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def open(self, want: str | None) -> bool:
        """Open `want` (or the path again, if the file was deleted), at most once per
        RETRY_EVERY after a failure. True when `want` is done with (opened)."""
        now = time.monotonic()
        if want is None:
            if now - self.checked_at < RETRY_EVERY:
                return False
            self.checked_at = now
            if not self.removed():
                return False
            want = self.path
            log.warning("access log: %s was deleted: making it again", want)
        if now - self.open_failed_at < RETRY_EVERY:
            return False  # the last try failed a moment ago: the old file for now
        try:
            fd = open_log(want)
        except OSError as exc:
            if not self.open_failed_at:
                log.error("access log: cannot open %s (%s): still writing to %s", want,
                          exc.strerror or exc, self.path)  # fmt: skip
            self.open_failed_at = now
            return False
        if self.open_failed_at:
            log.warning("access log: %s is open", want)
            self.open_failed_at = 0.0
        self.close()
        self.fd, self.path, self.piped = fd, want, is_pipe(fd)
        return True

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as exc:  # an NFS close may report a late write error
            log.error("access log: closing %s: %s", self.path, exc.strerror or exc)

    def write(self, data: bytes) -> None:
        prefix = 0
        if self.torn:
            data = b"\n" + data  # the last write stopped mid-line: end that line first
            prefix = 1
        pos, total = 0, len(data)
        try:
            while pos < total:
                end = total
                if self.piped and total - pos > select.PIPE_BUF:
                    cut = data.rfind(b"\n", pos, pos + select.PIPE_BUF)
                    end = cut + 1 if cut >= pos else data.find(b"\n", pos) + 1
                pos += os.write(self.fd, data[pos:end])
        except OSError as exc:
            if pos:
                self.torn = data[pos - 1] != 0x0A
            lost = data.count(b"\n", max(pos, prefix))
            self.records.write_dropped += lost
            if not self.failing:
                self.failing = True
                why = exc.strerror or exc
                log.error("access log: writing to %s failed (%s): %d lines dropped, and more "
                          "until writes succeed", self.path, why, lost)  # fmt: skip
            return
        self.torn = False
        if self.failing:
            self.failing = False
            log.warning("access log: writing to %s succeeds again", self.path)
