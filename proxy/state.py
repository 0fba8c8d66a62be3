"""The persisted runtime state: the rollback latch and the rollout's progress.

Rules:
- The state file is one JSON object: {"version": 1, "release", "latch", "rollout"}.
  `rollout` is `rollout.to_dict()` output or null; `release` is the canary
  release this state belongs to (a new release clears the latch — the caller's
  decision, not this module's).
- `load` of a missing file is the empty `State()`; anything else that is wrong
  (unreadable, not JSON, truncated, wrong shape) raises `StateError` naming the
  file and the problem. A corrupt file is never silently replaced by defaults:
  forgetting a rollback would send users back to a broken canary.
- `save` is atomic: a temp file in the same folder, flushed and fsynced, then
  `os.replace` over the old one and an fsync of the folder. A failure at any
  point leaves the old file as it was and no temp file behind.
- Concurrent `save`s in one process are serialized per path; the last one wins
  whole. Under `--workers N` only the leading worker writes; the others read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from . import rollout

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Latch:
    active: bool = False
    reason: str | None = None
    at: float | None = None  # epoch seconds when it was set
    release: str | None = None  # the canary release it was set against
    evidence: dict | None = None  # the counts and test behind the verdict
    actor: str | None = None  # who pulled it ("guard" or a token name)


@dataclass(frozen=True)
class State:
    latch: Latch = field(default_factory=Latch)
    rollout: dict | None = None  # rollout.to_dict() output
    release: str | None = None  # the canary release this state belongs to
    version: int = FORMAT_VERSION


class StateError(Exception):
    """The state file cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------- JSON form


def to_json(state: State) -> dict[str, Any]:
    latch = state.latch
    return {
        "version": state.version,
        "release": state.release,
        "latch": {
            "active": latch.active,
            "reason": latch.reason,
            "at": latch.at,
            "release": latch.release,
            "evidence": latch.evidence,
            "actor": latch.actor,
        },
        "rollout": state.rollout,
    }


def from_json(d: Any) -> State:
    """The inverse of to_json; ValueError saying which field is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"the state must be a JSON object, got {_kind(d)}")
    version = d.get("version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"version: expected {FORMAT_VERSION}, got {version!r}")
    unknown = set(d) - {"version", "release", "latch", "rollout"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    latch = _latch(d.get("latch", {}))
    progress = d.get("rollout")
    if progress is not None:
        rollout.from_dict(progress)  # validates; the caller converts when it needs to
    return State(latch, progress, _optional(d, "release", str, "release"), version)


def _latch(d: Any) -> Latch:
    if not isinstance(d, dict):
        raise ValueError(f"latch: must be an object, got {_kind(d)}")
    unknown = set(d) - {"active", "reason", "at", "release", "evidence", "actor"}
    if unknown:
        raise ValueError(f"latch: unknown keys: {', '.join(sorted(unknown))}")
    active = d.get("active", False)
    if not isinstance(active, bool):
        raise ValueError(f"latch.active: must be true or false, got {active!r}")
    at = _optional(d, "at", (int, float), "latch.at")
    if isinstance(at, bool) or (at is not None and not math.isfinite(at)):
        raise ValueError(f"latch.at: must be a finite number, got {at!r}")
    return Latch(
        active=active,
        reason=_optional(d, "reason", str, "latch.reason"),
        at=float(at) if at is not None else None,
        release=_optional(d, "release", str, "latch.release"),
        evidence=_optional(d, "evidence", dict, "latch.evidence"),
        actor=_optional(d, "actor", str, "latch.actor"),
    )


def _optional(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = d.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{where}: wrong type, got {_kind(value)} {value!r}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


# ------------------------------------------------------------------------ files


def load(path: str) -> State:
    """The state in `path`; `State()` when there is no file; StateError otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return State()
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from e
    if not raw.strip():
        raise StateError(f"state file {path} is empty (truncated?)")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"state file {path} is not valid JSON (corrupt or truncated): {e}") from e
    try:
        return from_json(doc)
    except ValueError as e:
        raise StateError(f"state file {path} has the wrong shape: {e}") from e


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(os.path.realpath(path), threading.Lock())


def save(path: str, state: State) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename, fsync the folder)."""
    data = (json.dumps(to_json(state), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    folder = os.path.dirname(os.path.abspath(path))
    with _lock_for(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable; some filesystems cannot open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
