"""The fleet's release state in Redis (`state.backend: redis`): one release for every
replica that shares a `key_prefix`.

Job: hold, under the prefix, what every replica must agree on — the state in force
(the rollback latch with its evidence, the rollout's progress and pending approval,
the release), the event feed and the audit log — and let exactly one replica at a
time advance the rollout.

Keys (all under `key_prefix`):
- `state:<release>`: JSON `{"rev": N, "state": <state.to_json>}` for the canary
  release the replicas' config names; `rev` grows by one per change. Each release has
  its own state, so replicas whose config is still on its way never mix two, and a
  new release starts afresh (step 0, no latch), as it does on one replica.
- `lease:<release>`: the id of the replica that may step that release's rollout,
  with an expiry (`lease` seconds); its holder renews it every tick.
- `events`: the fleet's event feed, newest first, at most MAX_EVENTS.
- `audit`: the audit log, one JSON line per admin action, oldest first.

Rules:
- Every change is a transaction over the state and the lease (WATCH, read, MULTI, EXEC):
  the controller first takes the state it read (if it is newer than what it holds),
  then applies its change to it, and the write succeeds only if neither key moved
  meanwhile; otherwise it reads again and re-applies the change to the newer state
  (at most RETRIES times). So two replicas never both advance a step, a latch keeps
  the first evidence (a replica that finds the latch set takes it as it is), and an
  approval given to any replica is in force in all.
- Every replica reads `state` each controller tick (`TICK`, 0.25 s): a change made by
  any replica is in force in every other within a tick and a round trip.
- The events a change makes are pushed in the same transaction: each is in the feed
  once, however many replicas saw the change.
- Unreachable (refused, a timeout, an error answer): the replica keeps the state it
  last saw (a set latch stays set), reports `up: false`, and tries again at most
  every RECONNECT seconds. Meanwhile rollback and pause act locally and are kept as
  pending intents, applied to the fleet's state when Redis answers again (a latch
  found set there is kept as it is); promote and resume are refused (503); the
  rollout does not step (no replica can hold the lease); audit lines are kept and
  appended when it is back, in order.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import state
from .state import State, StateError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("turnout.store")

MAX_EVENTS = 500
RETRIES = 8  # a change re-applied on a state that moved under it, at most
RECONNECT = 1.0  # seconds between attempts while Redis is unreachable
TIMEOUT = 0.5  # seconds a command may take before Redis counts as unreachable
MAX_PENDING_AUDIT = 10_000  # audit lines kept while Redis is unreachable

T = TypeVar("T")
M = TypeVar("M")


class Unavailable(Exception):
    """Redis cannot be reached or answered with an error; the message says which."""


class Redis:
    """The fleet's state under one key prefix, through redis-py's asyncio client."""

    def __init__(self, url: str, key_prefix: str, lease: float = 3.0) -> None:
        self.url = url
        self.prefix = key_prefix
        self.lease = lease
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.keys = {name: key_prefix + name for name in ("events", "audit")}
        # redis-py is loaded here, by the one process kind that uses it: it adds about
        # 8 MiB to a process, which a proxy keeping its state in a file never pays.
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError, WatchError

        self.failures: tuple[type[Exception], ...] = (RedisError, OSError)
        self.conflict: type[Exception] = WatchError  # the watched state moved
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
            retry_on_timeout=False, health_check_interval=0,
        )  # fmt: skip
        self.state_key = ""  # the state key of the release last read
        # (epoch, revision) of the state last taken or written; None: none yet
        self.version: tuple[str, int] | None = None
        self.remote_at = 0.0  # when the state last read was written (wall-clock s)
        self.up = False
        self.error: str | None = "not connected yet"
        self.down_since: float | None = time.time()
        self.retry_at = 0.0  # monotonic s: no attempt before this while down
        self.holder: str | None = None  # who holds the lease, as last read
        self.pending_audit: deque[str] = deque(maxlen=MAX_PENDING_AUDIT)
        self.audit_dropped = 0

    # -- what the controller asks ------------------------------------------------------------

    def leading(self) -> bool:
        """Whether this replica held the lease at its last successful change."""
        return self.up and self.holder == self.me

    def may_lead(self) -> bool:
        """During a change: whether this replica holds the lease or may take it."""
        return self.holder is None or self.holder == self.me

    def release_keys(self, release: str | None) -> tuple[str, str]:
        """The state and lease keys of a canary release: each release has its own state,
        so replicas that run different releases (a config on its way) never mix them,
        and a new release starts from a fresh state (step 0, no latch)."""
        tag = release if release is not None else "-"
        return f"{self.prefix}state:{tag}", f"{self.prefix}lease:{tag}"

    def may_try(self) -> bool:
        return self.up or time.monotonic() >= self.retry_at

    async def change(
        self,
        release: str | None,
        take: Callable[[State], None],
        apply: Callable[[], T],
        current: Callable[[], State],
        events: list[dict],
        mark: Callable[[], M],
        restore: Callable[[M], None],
    ) -> T:
        """Apply a change to the fleet's state of `release` (see the module's rules).

        `take(state)` puts a newer state read from Redis in force here; `apply()`
        makes the change on what is in force (and may raise, which aborts it); then
        `current()` is written if it differs from what was read, with the `events`
        `apply` appended to the list meanwhile. Returns what `apply` returned.

        An attempt that does not commit (a conflict, an error, `apply` raising) is
        undone here first: `mark()` is taken before `apply`, and `restore(mark)` puts
        back what was in force then, so a change is never applied twice on top of
        itself. Unavailable when Redis cannot be reached or the change cannot be
        written: nothing of it is in force.
        """
        if not self.may_try():
            raise Unavailable(self.error or "unreachable")
        state_key, lease_key = self.release_keys(release)
        if state_key != self.state_key:
            self.state_key, self.version = state_key, None  # another release: read afresh
        try:
            for _ in range(RETRIES):
                async with self.client.pipeline(transaction=True) as pipe:
                    await pipe.watch(state_key, lease_key)
                    raw, holder = await pipe.mget(state_key, lease_key)
                    version, remote = self.decode(raw, state_key)
                    if remote is not None and version != self.version:
                        take(remote)
                        self.version = version
                    self.holder = _text(holder)
                    before = mark()
                    try:
                        del events[:]
                        result = apply()
                        new = current()
                        lease_free = self.holder is None or self.holder == self.me
                        if new == remote and not lease_free:
                            await pipe.unwatch()
                            self.connected()
                            return result
                        epoch, rev = version if version is not None else (_epoch(), 0)
                        pipe.multi()
                        if lease_free:
                            pipe.set(lease_key, self.me, px=max(1, int(self.lease * 1000)))
                        if new != remote:
                            doc = {"epoch": epoch, "rev": rev + 1, "at": time.time(),
                                   "state": state.to_json(new)}  # fmt: skip
                            pipe.set(state_key, json.dumps(doc, default=str))
                        for ev in events:
                            pipe.lpush(self.keys["events"], json.dumps(ev, default=str))
                        if events:
                            pipe.ltrim(self.keys["events"], 0, MAX_EVENTS - 1)
                        await pipe.execute()
                    except self.conflict:
                        restore(before)
                        continue
                    except BaseException:
                        restore(before)
                        raise
                if lease_free:
                    self.holder = self.me
                if new != remote:
                    self.version = (epoch, rev + 1)
                self.connected()
                return result
            raise Unavailable(
                f"the change could not be written: {RETRIES} attempts in a row met another"
            )
        except self.failures as err:
            self.disconnected(err)
            raise Unavailable(self.error or "unreachable") from err

    def decode(
        self, raw: bytes | str | None, key: str
    ) -> tuple[tuple[str, int] | None, State | None]:
        """(the state's version: its epoch and revision, the state); (None, None) if none.

        The epoch is drawn when a state is first written: a Redis that lost its data
        (a flush, an old snapshot) starts a new one, so a revision is never mistaken
        for one seen before."""
        if raw is None:
            return None, None
        try:
            doc = json.loads(raw)
            self.remote_at = float(doc.get("at") or 0.0)
            return (str(doc.get("epoch", "")), int(doc["rev"])), state.from_json(doc["state"])
        except (ValueError, KeyError, TypeError, AttributeError, StateError) as err:
            # Never silently fresh: a state that cannot be read is not taken, and it is
            # overwritten only by a change made on top of what is in force here.
            log.error("the fleet's state in Redis (%s) is unusable: %s", key, err)
            return None, None

    async def events(self, limit: int) -> list[dict]:
        try:
            raw = await self.client.lrange(self.keys["events"], 0, limit - 1)
        except self.failures as err:
            self.disconnected(err)
            raise Unavailable(self.error or "unreachable") from err
        out = []
        for item in raw:
            try:
                out.append(json.loads(item))
            except ValueError:
                continue
        return out

    async def push_event(self, ev: dict) -> None:
        """An event that is not part of a change (a mismatch, an admin call's outcome)."""
        if not self.up:
            return
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lpush(self.keys["events"], json.dumps(ev, default=str))
                pipe.ltrim(self.keys["events"], 0, MAX_EVENTS - 1)
                await pipe.execute()
        except self.failures as err:
            self.disconnected(err)

    def audit(self, line: str) -> None:
        """Keep an audit line for the fleet's log; `flush_audit` appends what is kept."""
        if len(self.pending_audit) == self.pending_audit.maxlen:
            self.audit_dropped += 1
        self.pending_audit.append(line)

    async def flush_audit(self) -> None:
        if not self.pending_audit or not self.may_try():
            return
        lines = list(self.pending_audit)
        try:
            await self.client.rpush(self.keys["audit"], *lines)
        except self.failures as err:
            self.disconnected(err)
            return
        for _ in lines:
            self.pending_audit.popleft()

    async def audit_lines(self) -> list[dict]:
        raw = await self.client.lrange(self.keys["audit"], 0, -1)
        return [json.loads(item) for item in raw]

    # -- up and down -------------------------------------------------------------------------

    def connected(self) -> None:
        if not self.up:
            log.warning("state backend redis is reachable (%s)", self.url)
        self.up, self.error, self.down_since = True, None, None

    def disconnected(self, err: Exception) -> None:
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if self.up or self.error != why:
            log.error("state backend redis unreachable (%s): %s", self.url, why)
        self.up, self.error = False, why
        self.down_since = self.down_since or time.time()
        self.holder = None
        self.version = None  # what is in force here may differ from Redis now: read afresh
        self.retry_at = time.monotonic() + RECONNECT

    def doc(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "up": self.up,
            "error": self.error,
            "url": self.url,
            "key_prefix": self.prefix,
            "rev": self.version[1] if self.version is not None else None,
            "leader": self.leading(),
            "lease_holder": self.holder,
            "me": self.me,
            "down_since": self.down_since,
            "pending_audit": len(self.pending_audit),
        }

    async def close(self) -> None:
        try:
            if self.holder == self.me and self.up and self.state_key:
                # Hand the lease on at once rather than at its expiry.
                tag = self.state_key.removeprefix(f"{self.prefix}state:")
                await self.client.eval(_RELEASE_LEASE, 1, f"{self.prefix}lease:{tag}", self.me)
        except self.failures:
            pass
        await self.client.aclose()


# Delete the lease only if this replica still holds it (atomic: one script).
_RELEASE_LEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end"


def _epoch() -> str:
    return secrets.token_hex(8)


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
