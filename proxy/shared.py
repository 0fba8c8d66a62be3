"""What every exchange of one process reads: the snapshot in force and the shared state.

Rules:
- A `Snapshot` never changes once made: config, compiled routing table,
  upstream pools, generation, and the few settings every request reads, copied
  into native fields (`max_body_bytes`, ...) so the compiled hot path reads a
  struct field instead of walking the config's dataclasses.
- `Shared` is the per-process state of the data plane, made once and handed
  to whatever needs it at construction: the snapshot in force (replaced whole
  by the control plane: one assignment), the recorder, the table of deadlines
  the server's expiry loop checks, whether the process is draining, and the
  access log's records when the log is on.
- Nothing here knows the layers above: a deadline is anything with
  `overdue_at()` and `timed_out()`.
"""

from __future__ import annotations

from typing import Protocol

from .accesslog import AccessLog
from .config import Config, Mirror
from .http.pools import Upstreams
from .metrics import Recorder
from .routing import Table


class Snapshot:
    __slots__ = (
        "config", "table", "upstreams", "generation", "loaded_at", "max_body_bytes",
        "max_header_bytes", "response_timeout", "connect_timeout", "expose_version", "mirror",
        "stable", "canary",
    )  # fmt: skip

    def __init__(
        self, config: Config, table: Table, upstreams: Upstreams, generation: int, loaded_at: float
    ) -> None:
        self.config = config
        self.table = table
        self.upstreams = upstreams
        self.generation = generation
        self.loaded_at = loaded_at
        limits = config.limits
        self.max_body_bytes: int = limits.max_body_bytes
        self.max_header_bytes: int = limits.max_header_bytes
        self.response_timeout: float = limits.response_timeout
        self.connect_timeout: float = limits.connect_timeout
        self.expose_version: bool = config.expose_version
        self.mirror: Mirror | None = config.mirror
        self.stable: str = config.stable
        self.canary: str = config.canary


class Deadline(Protocol):
    """Something waiting with a deadline: a response head, or a shadow copy's whole life."""

    def overdue_at(self) -> float:
        """time.monotonic() seconds by which it must be over; 0.0: no deadline now."""
        ...

    def timed_out(self) -> None: ...


class Shared:
    __slots__ = ("snapshot", "recorder", "awaiting", "draining", "access")

    def __init__(self, snapshot: Snapshot, recorder: Recorder) -> None:
        self.snapshot = snapshot
        self.recorder = recorder
        # Waiting for a deadline, in the order they began to wait.
        self.awaiting: dict[Deadline, None] = {}
        self.draining = False
        self.access: AccessLog | None = None  # access_log on: where exchanges are recorded
