"""Dark launch: shadow copies of stable's traffic to the canary, compared with the primary.

Rules:
- Eligible: served by stable, method listed, not an upgrade, rollback latch not
  set, `percent` sampled (by the bucket of "<group>:mirror:<key>" when the
  request has a sticky key - header, cookie, query, ip, or the `turnout_id`
  cookie of `anonymous: cookie` - so a user is mirrored consistently; else at
  random), request body within `max_body_bytes`.
- The request body is teed while it streams to the primary, never read twice
  and never held beyond the limit; the copy leaves once the primary's request
  is complete, on the canary's own pooled connections, with
  `X-Turnout-Shadow: 1`, the same method, target, headers and Host.
- The copy never delays, alters or fails the primary, and never holds the
  client's connection: it has no client. Beyond `max_in_flight` copies, or past
  the body limit, a copy is dropped and counted. `timeout` bounds its whole life.
- A copy ends like a primary exchange would: a body framed by the connection's
  close ends with it; a pooled connection the canary closed unanswered is
  retried once on a fresh one (idempotent methods); a request without Host gets
  the endpoint's.
- Its outcome counts toward the canary's guard window as shadow traffic, and so
  does a copy that finds no usable canary endpoint (a connect error, as a
  primary would get a 502); with `compare`, a complete response is compared
  with the primary's (proxy.compare), a failed copy never is.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .compare import Captured, compare
from .config import Mirror
from .forward import IDEMPOTENT, sized_response
from .framing import Framing
from .headers import HOP_BY_HOP
from .http.upstream import Pool, UpstreamConnection
from .routing import COOKIE_NAME, Decision, RequestView, bucket, parse_cookies

if TYPE_CHECKING:
    from .forward import Exchange
    from .server import Server

MAX_MISMATCHES = 50  # kept for /status and /events


class Mirroring:
    """Per server: what is in flight and the latest mismatches.

    The counts (sent, dropped, failed, compared) live in the Recorder, which
    both /metrics and /status read."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.in_flight = 0
        self.mismatches: deque[dict] = deque(maxlen=MAX_MISMATCHES)
        self.cfg: Mirror | None = None  # the policy `methods` was made from
        self.methods: frozenset[bytes] = frozenset()

    def eligible(self, ex: Exchange, decision: Decision) -> Mirror | None:
        """The mirror policy if `ex` should be copied (before its body is known).

        Called for every request while a mirror is configured: the common "no"
        answers come first and cost a few attribute reads.
        """
        snap = ex.snap
        cfg = snap.config.mirror
        if cfg is None or decision.version != snap.config.stable or ex.upgrade:
            return None
        if cfg is not self.cfg:  # methods as bytes, once per configuration
            self.cfg = cfg
            self.methods = frozenset(m.encode("latin-1") for m in cfg.methods)
        if ex.method not in self.methods or snap.table.latched:
            return None
        if cfg.percent < 100:
            key = sampling_key(ex, decision)
            if key:
                if bucket(snap.table.group + ":mirror", key) > cfg.percent:
                    return None
            elif random.random() * 100 >= cfg.percent:
                return None
        length = ex.head.content_length
        if (length is not None and length > cfg.max_body_bytes) or (
            self.in_flight >= cfg.max_in_flight  # full now: do not even tee the body
        ):
            self.drop()
            return None
        return cfg

    def drop(self) -> None:
        self.server.runtime.recorder.mirrored("dropped")

    def launch(self, ex: Exchange, cfg: Mirror, body: list[bytes]) -> ShadowExchange | None:
        """Send the copy now that the primary's request is complete, or drop it.

        Returns the copy when the primary must feed it its answer (`compare` on);
        otherwise the primary has nothing more to do with it.
        """
        if self.in_flight >= cfg.max_in_flight or self.server.runtime.snapshot.table.latched:
            self.drop()
            return None
        snap = ex.snap
        pools = snap.upstreams.versions[snap.config.canary]
        pool = pools.pick()
        if pool is None:
            # Like a primary's 502: the guard must see it, or a dead canary (its
            # endpoints cooling down after refusals) would never fail its dark launch.
            rec = self.server.runtime.recorder
            rec.mirrored("failed")
            rec.shadow_finished(snap.config.canary, 0, 0.0, "unavailable")
            return None
        shadow = ShadowExchange(self, ex, cfg, b"".join(body))
        self.in_flight += 1
        self.server.runtime.recorder.mirrored("sent")
        shadow.dispatch(pool)
        return shadow if cfg.compare is not None else None

    def done(self, shadow: ShadowExchange) -> None:
        self.in_flight -= 1


def sampling_key(ex: Exchange, decision: Decision) -> str | None:
    """The request's sticky key as routing reads it (any kind), or None."""
    table = ex.snap.table
    if table.key_kind is None and table.anonymous != "cookie":
        return None
    headers = ex.head.routing
    cookies = parse_cookies(headers.get("cookie")) if table.needs_cookies else None
    path, _, query = ex.target.partition(b"?")
    view = RequestView(
        ex.method.decode("latin-1"),
        path.decode("latin-1"),
        query.decode("latin-1"),
        headers,
        ex.client.peer,
    )
    key = table.sticky_key(view, cookies)
    if key is None and table.anonymous == "cookie":
        key = decision.set_cookie or (cookies or {}).get(COOKIE_NAME) or None
    return key


_CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"  # the last line upstream_request adds


def shadow_request(ex: Exchange, body: bytes) -> bytes:
    """The copy: the primary's head as sent upstream, framed by length, and its body.

    The head is the one headers.upstream_request made for the primary (never an
    upgrade: those are not mirrored); the body is whole, so a chunked one goes
    with a Content-Length instead.
    """
    head = ex.head_bytes[:-2]  # without the blank line that ends it
    if ex.head.chunked:
        head = head[: -len(_CHUNKED_LINE)]
    if ex.head.content_length is None and (body or ex.head.chunked):
        head += b"Content-Length: %d\r\n" % len(body)
    return b"%sX-Turnout-Shadow: 1\r\n\r\n%s" % (head, body)


class _Capture:
    """One side's response, bounded: the first `limit` body bytes and a digest of all."""

    __slots__ = ("status", "headers", "body", "length", "sha", "limit")

    def __init__(self, limit: int) -> None:
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.body: list[bytes] = []
        self.length = 0
        self.sha = hashlib.sha256()
        self.limit = limit

    def head(self, status: int, block: bytes) -> None:
        self.status = status
        pairs = []
        for line in block.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            low = name.strip().lower()
            if sep and low not in HOP_BY_HOP:
                pairs.append((low.decode("latin-1"), value.strip().decode("latin-1")))
        self.headers = tuple(pairs)

    def add(self, data: bytes) -> None:
        if self.length < self.limit:
            self.body.append(data[: self.limit - self.length])
        self.length += len(data)
        self.sha.update(data)

    def captured(self) -> Captured:
        return Captured(self.status, self.headers, b"".join(self.body), self.length,
                        self.sha.hexdigest())  # fmt: skip


class ShadowExchange:
    """A fire-and-forget copy of one request, sent to the canary; no client attached."""

    tunnel = False
    resp_pending = None
    # Class-level defaults: most keep them for the copy's whole life.
    conn: UpstreamConnection | None = None
    pool: Pool | None = None
    done = False
    keep_alive = True
    reused = False  # the connection came from the pool
    mine: _Capture | None = None  # the canary's answer, when comparing
    primary: _Capture | None = None  # the primary's answer, when comparing
    primary_finished = False
    finished_status: int | None = None

    def __init__(self, owner: Mirroring, primary: Exchange, cfg: Mirror, body: bytes) -> None:
        self.owner = owner
        self.cfg = cfg
        self.version = primary.snap.config.canary
        self.method = primary.method
        self.target = primary.target
        self.data = shadow_request(primary, body)  # kept for one resend (see stale_pooled)
        self.needs_host = primary.head.host is None
        self.loop = primary.client.loop
        self.server = owner.server
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cfg.timeout
        if cfg.compare is not None:
            limit = cfg.compare.max_body_bytes
            self.mine, self.primary = _Capture(limit), _Capture(limit)

    # -- sending ------------------------------------------------------------------------

    def dispatch(self, pool: Pool) -> None:
        self.pool = pool
        self.server.awaiting[self] = None  # the timeout covers the whole copy
        conn = pool.take()
        if conn is None:
            self.loop.create_task(self.connect(pool))
            return
        self.reused = True
        self.attach(conn)

    async def connect(self, pool: Pool) -> None:
        try:
            conn = await pool.connect(min(self.cfg.timeout, 5.0))
        except (TimeoutError, OSError):
            pool.refused()
            self.end(0, "connect")
            return
        if self.done:
            pool.give(conn)
            return
        self.attach(conn)

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self  # type: ignore[assignment]
        data = self.data
        if self.needs_host:  # as the primary does: HTTP/1.1 upstreams require a Host
            line_end = data.index(b"\r\n") + 2
            host = conn.pool.endpoint.key.encode()
            data = b"%sHost: %s\r\n%s" % (data[:line_end], host, data[line_end:])
        conn.send(data)
        if not self.reused:
            self.data = b""  # a fresh connection is never resent on

    def upstream_paused(self, paused: bool) -> None:
        """Nothing to pause: the copy's body is already in memory."""

    # -- the canary's answer ----------------------------------------------------------------

    def whole_response(self, data: bytes, end: int) -> bool:
        """A complete, sized answer read in one piece: take it without the parser."""
        if self.method == b"HEAD":
            return False
        found = sized_response(data, end)
        if found is None:
            return False
        status, sle, rh = found
        self.finished_status = status
        self.keep_alive = not rh.close
        self.data = b""
        if self.mine is not None:
            self.mine.head(status, data[sle : end + 2])
            self.mine.add(data[end + 4 :])
        self.response_complete()
        return True

    def flush_response_head(self) -> None:
        pass

    def response_head(self, status: int, head: bytes, keep_alive: bool, framing: Framing) -> None:
        if status < 200:
            return
        self.keep_alive = keep_alive
        self.finished_status = status
        self.data = b""  # answered: no resend any more
        block = head[head.find(b"\r\n") :]
        if self.mine is not None:
            self.mine.head(status, block)

    def response_body(self, data: bytes) -> None:
        if self.mine is not None:
            self.mine.add(data)

    def response_complete(self) -> None:
        if self.done or self.finished_status is None:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.keep_alive:
                self.pool.give(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        self.end(self.finished_status, None)

    def upgraded(self, rest: bytes) -> None:
        self.upstream_failed("protocol", "unexpected protocol switch")

    def upstream_lost(self, silent: bool = False, until_close: bool = False) -> None:
        """The canary's connection closed (`silent`: before one byte of an answer)."""
        self.conn = None
        if self.done:
            return
        if silent and self.stale_pooled():
            return
        if self.finished_status is not None and until_close:
            self.end(self.finished_status, None)  # the close is the end of the body
            return
        self.end(0, "reset")

    def stale_pooled(self) -> bool:
        """Resend once on a fresh connection when a pooled one was closed under the copy.

        The canary may close an idle keep-alive connection just as it is reused; the
        copy was then never processed. As for primaries, only idempotent methods.
        """
        if not (self.reused and self.data) or self.method not in IDEMPOTENT or self.pool is None:
            return False
        self.reused = False
        self.loop.create_task(self.connect(self.pool))
        return True

    def upstream_failed(self, kind: str, cause: str, status: int = 502) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self.end(0, kind)

    def timed_out(self) -> None:
        self.upstream_failed("timeout", "shadow timeout")

    # -- the end --------------------------------------------------------------------------------

    def end(self, status: int, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.server.awaiting.pop(self, None)
        self.owner.done(self)
        rec = self.server.runtime.recorder
        rec.shadow_finished(self.version, status, time.perf_counter() - self.t0, error)
        if error is not None:
            rec.mirrored("failed")
            self.mine = self.primary = None  # an answer cut short is not compared
        self.judge()

    def primary_head(self, status: int, block: bytes) -> None:
        if self.primary is not None:
            self.primary.head(status, block)

    def primary_body(self, data: bytes) -> None:
        if self.primary is not None:
            self.primary.add(data)

    def primary_done(self, ok: bool) -> None:
        self.primary_finished = ok
        if not ok:
            self.primary = None  # nothing trustworthy to compare with
        self.judge()

    def judge(self) -> None:
        """Compare once both sides are over (and both answered)."""
        cfg = self.cfg.compare
        if cfg is None or self.primary is None or self.mine is None:
            return
        if not (self.done and self.primary_finished) or self.finished_status is None:
            return
        primary, mine = self.primary.captured(), self.mine.captured()
        outcome = compare(primary, mine, cfg)
        self.primary = self.mine = None
        self.server.runtime.recorder.compared(outcome.result)
        if outcome.result == "mismatch":
            event: dict[str, Any] = {
                "request": f"{self.method.decode('latin-1')} {self.target.decode('latin-1')}",
                "difference": outcome.kind,
                "primary_status": primary.status,
                "shadow_status": mine.status,
                "detail": outcome.detail,
                "version": self.version,
            }
            self.owner.mismatches.appendleft({"at": time.time(), **event})
            self.server.controller.event("mismatch", **event)
