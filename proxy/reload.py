"""Hot reload: notice a changed config, validate it whole, swap it in or keep the old one.

Rules:
- The config file's folder is watched, not the file: a Kubernetes ConfigMap
  swaps a `..data` symlink and never writes the file in place. Cohort files'
  folders are watched too.
- A change is applied when the bytes of the config or of a cohort file differ
  from those in force (a fingerprint), so editors that write twice or touch
  files cause no spurious generation. SIGHUP and POST /reload always reload.
- An invalid config changes nothing in force: the error (key path and line)
  is logged, counted and kept for /status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable

from watchfiles import awatch

from .config import Config, ConfigError, load
from .runtime import Runtime

log = logging.getLogger("turnout.reload")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every event at INFO

POLL_INTERVAL = 2.0  # a backstop for filesystems where change events are lost


def fingerprint(config: Config) -> str:
    h = hashlib.sha256()
    for path in (config.path, *config.routing.cohort_files):
        h.update(path.encode())
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(repr(exc).encode())
    return h.hexdigest()


class Reloader:
    def __init__(self, runtime: Runtime, on_swap: Callable[[Config, Config], None] | None = None):
        self.runtime = runtime
        self.on_swap = on_swap
        self.path = runtime.config.path
        self.seen = fingerprint(runtime.config)
        self.tasks: list[asyncio.Task] = []
        self.stop_event: asyncio.Event | None = None

    def reload(self, reason: str) -> tuple[bool, str | None]:
        """Load the file now; swap it in if valid. Returns (ok, error text)."""
        old = self.runtime.config
        try:
            new = load(self.path)
        except ConfigError as err:
            text = str(err)
            self.runtime.reject(text)
            self.seen = fingerprint(old)  # the bad bytes on disk: do not retry them
            log.error("reload (%s) rejected, keeping generation %d:\n%s",
                      reason, self.runtime.snapshot.generation, text)  # fmt: skip
            return False, text
        snap = self.runtime.swap(new)
        self.seen = fingerprint(new)
        if self.on_swap is not None:
            self.on_swap(old, new)
        log.info("reload (%s): generation %d in force, weight %d",
                 reason, snap.generation, snap.table.weight)  # fmt: skip
        return True, None

    def start(self) -> None:
        self.stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._watch()), loop.create_task(self._poll())]

    async def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.tasks = []

    def _check(self, reason: str) -> None:
        if fingerprint(self.runtime.config) != self.seen:
            self.reload(reason)

    def _relevant(self, change: object, path: str) -> bool:
        """Only the config, its ConfigMap `..` entries and cohort files matter."""
        cfg = self.runtime.config
        name = os.path.basename(path)
        return (
            name == os.path.basename(cfg.path)
            or name.startswith("..")
            or path in cfg.routing.cohort_files
            or any(name == os.path.basename(p) for p in cfg.routing.cohort_files)
        )

    def _folders(self) -> list[str]:
        cfg = self.runtime.config
        folders = {os.path.dirname(cfg.path)}
        folders.update(os.path.dirname(p) for p in cfg.routing.cohort_files)
        return sorted(f for f in folders if os.path.isdir(f))

    async def _watch(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            folders = self._folders()
            try:
                async for _ in awatch(
                    *folders, watch_filter=self._relevant, stop_event=self.stop_event,
                    debounce=100, step=250, recursive=False, yield_on_timeout=False,
                ):  # fmt: skip
                    self._check("file change")
                    if self._folders() != folders:
                        break  # cohort files moved: watch the new folders
            except (OSError, RuntimeError) as exc:
                log.warning("file watch failed (%s); falling back to polling", exc)
                return

    async def _poll(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            await asyncio.sleep(POLL_INTERVAL)
            self._check("poll")
