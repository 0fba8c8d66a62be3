"""The snapshot in force, and how a new one replaces it.

Rules:
- A `Snapshot` is immutable: config, compiled routing table, upstream pools,
  generation. A request reads `runtime.snapshot` once and keeps it.
- `swap()` is one assignment; the old snapshot lives on for requests that hold it.
- The rollback latch is part of the runtime state, not of the config, so a
  reload never clears it.
"""

from __future__ import annotations

import time

from .config import Config
from .http.upstream import Upstreams
from .metrics import Recorder
from .routing import Table


class Snapshot:
    __slots__ = ("config", "table", "upstreams", "generation", "loaded_at")

    def __init__(
        self, config: Config, table: Table, upstreams: Upstreams, generation: int, loaded_at: float
    ) -> None:
        self.config = config
        self.table = table
        self.upstreams = upstreams
        self.generation = generation
        self.loaded_at = loaded_at


class Runtime:
    """Holds the current snapshot and what the control plane knows about it."""

    def __init__(self, config: Config, recorder: Recorder | None = None) -> None:
        self.recorder = recorder or Recorder()
        self.latched = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.snapshot = self._build(config, None, 1)
        self.recorder.reloaded(True, 1)
        self.recorder.reloads["success"] = 0  # the first load is not a reload

    def _build(self, config: Config, previous: Snapshot | None, generation: int) -> Snapshot:
        weight = self.effective_weight(config)
        table = Table(config, weight, self.latched)
        upstreams = Upstreams(config, previous.upstreams if previous else None)
        self.recorder.canary_weight = table.weight
        return Snapshot(config, table, upstreams, generation, time.time())

    def effective_weight(self, config: Config) -> int:
        return config.routing.weight

    @property
    def config(self) -> Config:
        return self.snapshot.config

    def swap(self, config: Config) -> Snapshot:
        """Put `config` in force as the next generation."""
        old = self.snapshot
        snap = self._build(config, old, old.generation + 1)
        self.snapshot = snap
        self.last_error = None
        self.last_error_at = None
        self.recorder.reloaded(True, snap.generation)
        return snap

    def reject(self, error: str) -> None:
        """A reload failed: keep the snapshot, remember and count the error."""
        self.last_error = error
        self.last_error_at = time.time()
        self.recorder.reloaded(False, self.snapshot.generation)
