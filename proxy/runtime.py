"""The snapshot in force, and how a new one replaces it.

Rules:
- A `Snapshot` (proxy.shared) is immutable: config, compiled routing table,
  upstream pools, generation. A request reads the snapshot in force once and
  keeps it; the one in force lives in `Shared.snapshot`, which the data plane
  reads and only this class writes.
- `swap()` is one assignment; the old snapshot lives on for requests that hold it.
- The rollback latch and the rollout progress are runtime state, not config,
  so a reload never clears them (the controller decides what a reload means).
"""

from __future__ import annotations

import time

from . import rollout
from .config import Config
from .http.pools import Upstreams
from .metrics import Recorder
from .rollout import Progress
from .routing import Table
from .shared import Shared, Snapshot
from .state import Latch


class Runtime:
    """Holds the current snapshot and what the control plane knows about it.

    The release state (`latch`, `progress`) lives here, beside the config: the
    routing table is compiled from both, and `refresh()` recompiles it when the
    controller changes either one. No I/O here.
    """

    def __init__(
        self,
        config: Config,
        recorder: Recorder | None = None,
        latch: Latch | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.recorder = recorder or Recorder()
        self.latch = latch or Latch()
        self.progress = progress
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.shared = Shared(self._build(config, Upstreams(config), 1), self.recorder)
        self.recorder.generation = 1

    @property
    def snapshot(self) -> Snapshot:
        return self.shared.snapshot

    @snapshot.setter
    def snapshot(self, snap: Snapshot) -> None:
        self.shared.snapshot = snap

    @property
    def latched(self) -> bool:
        return self.latch.active

    def _build(self, config: Config, upstreams: Upstreams, generation: int) -> Snapshot:
        table = Table(config, self.configured_weight(config), self.latch.active, self.rings(config))
        self.recorder.canary_weight = table.weight
        self.recorder.decision_labels = table.labels
        self.recorder.rollback_active = int(self.latch.active)
        return Snapshot(config, table, upstreams, generation, time.time())

    def configured_weight(self, config: Config) -> int:
        """The weight before the latch: the rollout's step when there is a rollout."""
        if config.rollout is not None and self.progress is not None:
            return rollout.weight(self.progress, config.rollout)
        return config.routing.weight

    def rings(self, config: Config) -> tuple[str, ...]:
        """The rollout's rings in force: cohorts routed to the canary on top of the weight."""
        if config.rollout is not None and self.progress is not None:
            return rollout.rings(self.progress, config.rollout)
        return ()

    @property
    def config(self) -> Config:
        return self.snapshot.config

    def swap(self, config: Config) -> Snapshot:
        """Put `config` in force as the next generation."""
        old = self.snapshot
        snap = self._build(config, Upstreams(config, old.upstreams), old.generation + 1)
        snap.loaded_at = time.time()
        self.snapshot = snap
        self.last_error = None
        self.last_error_at = None
        self.recorder.reloaded(True, snap.generation)
        return snap

    def refresh(self) -> Snapshot:
        """Recompile routing after the latch or the rollout changed (same generation)."""
        old = self.snapshot
        snap = self._build(old.config, old.upstreams, old.generation)
        snap.loaded_at = old.loaded_at
        self.snapshot = snap
        return snap

    def reject(self, error: str) -> None:
        """A reload failed: keep the snapshot, remember and count the error."""
        self.last_error = error
        self.last_error_at = time.time()
        self.recorder.reloaded(False, self.snapshot.generation)
