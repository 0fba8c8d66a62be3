"""Hot reload: notice a changed config, validate it whole, swap it in or keep the old one.

Rules:
- The config file's folder is watched, not the file: a Kubernetes ConfigMap
  swaps a `..data` symlink and never writes the file in place. Cohort files'
  folders are watched too. A change event is acted on after at most
  `WATCH_STEP` to `2 * WATCH_STEP` ms (watchfiles polls its event queue every
  step and yields once a step brings nothing new), then the file is parsed.
- A change is applied when the bytes of the config or of a cohort file differ
  from those of the last load *attempt*, compared by digest (`Config.sources`):
  the digests are of the exact bytes that load parsed, never of a second read,
  so a write landing just after a rejected load is still seen as new. Editors
  that write twice or touch files cause no spurious generation. SIGHUP and
  POST /reload always reload.
- Reading and parsing run in a worker thread (a million-line cohort file must
  not stall proxying); the swap itself happens on the event loop. One load at
  a time: reloads queue on a lock.
- Nothing stops the watcher or the poll loop: any failure of a load is a
  rejected config (logged, counted in turnout_config_reloads_total{result=
  "failure"}, kept for /status config.last_error, the old config stays); any
  failure of the watching itself is logged and the watch restarts after a
  pause, while the poll loop (every POLL_INTERVAL) keeps checking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping

from watchfiles import awatch

from .config import MAX_COHORT_BYTES, MAX_CONFIG_BYTES, Config, ConfigError, file_digest, load
from .runtime import Runtime

log = logging.getLogger("turnout.reload")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every event at INFO

POLL_INTERVAL = 2.0  # a backstop for filesystems where change events are lost
WATCH_STEP = 50  # ms between watchfiles' looks at its event queue (the latency floor)
WATCH_DEBOUNCE = 200  # ms: a burst of events is cut into batches no longer than this
WATCH_RETRY = 1.0  # seconds before watching again after the watcher failed


class Reloader:
    def __init__(
        self,
        runtime: Runtime,
        on_swap: Callable[[Config, Config], None] | None = None,
        prepare: Callable[[Config], None] | None = None,
    ):
        self.runtime = runtime
        self.on_swap = on_swap
        self.prepare = prepare  # readies what a config needs besides the snapshot; may raise
        self.path = runtime.config.path
        self.seen: dict[str, str] = dict(runtime.config.sources)  # file -> digest last parsed
        self.lock = asyncio.Lock()
        self.tasks: list[asyncio.Task] = []
        self.requests: set[asyncio.Task] = set()  # SIGHUP reloads in progress
        self.stop_event: asyncio.Event | None = None

    def reload(self, reason: str) -> asyncio.Task:
        """Start a reload in the background (for signal handlers); the task says how it went."""
        task = asyncio.get_running_loop().create_task(self.reload_now(reason))
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)
        return task

    async def reload_now(self, reason: str) -> tuple[bool, str | None]:
        """Load the file now; swap it in if valid. Returns (ok, error text)."""
        async with self.lock:
            return await self._load_and_apply(reason)

    async def _load_and_apply(self, reason: str) -> tuple[bool, str | None]:
        try:
            new = await asyncio.to_thread(load, self.path)
        except ConfigError as err:
            return self._rejected(reason, str(err), err.sources)
        except Exception as exc:  # load turns everything into ConfigError; this is the backstop
            log.exception("reload (%s): loading failed", reason)
            return self._rejected(reason, f"cannot load the config: {exc!r}", None)
        old = self.runtime.config
        if self.prepare is not None:
            try:
                self.prepare(new)
            except Exception as exc:  # noqa: BLE001 -- e.g. TLS contexts OpenSSL refuses: keep the old
                return self._rejected(reason, f"cannot apply the config: {exc}", new.sources)
        try:
            snap = self.runtime.swap(new)
        except Exception as exc:  # a config that validates but cannot be put in force
            log.exception("reload (%s): cannot put the new config in force", reason)
            return self._rejected(reason, f"cannot apply the config: {exc!r}", new.sources)
        self.seen = dict(new.sources)
        if self.on_swap is not None:
            try:
                self.on_swap(old, new)
            except Exception:  # the config is in force; what follows it must not undo that
                log.exception("reload (%s): generation %d in force, but applying it failed",
                              reason, snap.generation)  # fmt: skip
        log.info("reload (%s): generation %d in force, weight %d",
                 reason, snap.generation, snap.table.weight)  # fmt: skip
        return True, None

    def _rejected(
        self, reason: str, text: str, sources: Mapping[str, str] | None
    ) -> tuple[bool, str | None]:
        self.runtime.reject(text)
        if sources:
            self.seen = dict(sources)  # the bad bytes exactly as parsed: do not retry them
        log.error("reload (%s) rejected, keeping generation %d",
                  reason, self.runtime.snapshot.generation)  # fmt: skip
        for line in text.splitlines():  # one log line per problem
            log.error("  %s", line)
        return False, text

    def start(self) -> None:
        self.stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._watch()), loop.create_task(self._poll())]

    async def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
        for task in [*self.tasks, *self.requests]:
            task.cancel()
        for task in [*self.tasks, *self.requests]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks = []

    def changed(self) -> bool:
        """True when a file the last load read now holds other bytes (reads files: a thread)."""
        seen = self.seen or {self.path: ""}
        for path, was in seen.items():
            limit = MAX_CONFIG_BYTES if path == self.path else MAX_COHORT_BYTES
            if file_digest(path, limit) != was:
                return True
        return False

    async def check(self, reason: str) -> None:
        """Reload if the files changed; never raises (the watcher and the poll call it)."""
        try:
            async with self.lock:
                if await asyncio.to_thread(self.changed):
                    await self._load_and_apply(reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reload check (%s) failed; the config in force is kept", reason)

    def _watched(self) -> set[str]:
        """The files whose change matters: those of the last load, and those in force."""
        return {self.path, *self.seen, *self.runtime.config.routing.cohort_files}

    def _relevant(self, change: object, path: str) -> bool:
        """Only the config, its ConfigMap `..` entries and cohort files matter."""
        name = os.path.basename(path)
        watched = self._watched()
        return name.startswith("..") or path in watched or name in map(os.path.basename, watched)

    def _folders(self) -> list[str]:
        folders = {os.path.dirname(p) for p in self._watched()}
        return sorted(f for f in folders if os.path.isdir(f))

    async def _watch(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            try:
                if folders := self._folders():
                    await self._watch_folders(folders)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # inotify limits, a folder that vanished, anything
                log.warning("file watch failed (%r); retrying in %.0f s, polling meanwhile",
                            exc, WATCH_RETRY)  # fmt: skip
            with contextlib.suppress(TimeoutError):  # no folder to watch, or it failed: wait
                await asyncio.wait_for(self.stop_event.wait(), WATCH_RETRY)

    async def _watch_folders(self, folders: list[str]) -> None:
        assert self.stop_event is not None
        async for _ in awatch(
            *folders, watch_filter=self._relevant, stop_event=self.stop_event,
            debounce=WATCH_DEBOUNCE, step=WATCH_STEP, recursive=False, yield_on_timeout=False,
        ):  # fmt: skip
            await self.check("file change")
            if self._folders() != folders:
                return  # cohort files moved: watch the new folders

    async def _poll(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            await asyncio.sleep(POLL_INTERVAL)
            await self.check("poll")
