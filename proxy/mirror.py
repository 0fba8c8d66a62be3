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
from collections.abc import Callable
from typing import Any, Final

from .compare import Captured, compare
from .config import Mirror
from .forward import Forwarding, MirrorTap, Shadow
from .framing import Framing
from .headers import HOP_BY_HOP
from .http.upstream import Pool
from .leg import UpstreamLeg
from .routing import COOKIE_NAME, Decision, RequestView, bucket, parse_cookies
from .shared import Shared

MAX_MISMATCHES: Final = 50  # kept for /status and /events


class Mirroring(MirrorTap):
    """Per process: what is in flight and the latest mismatches.

    The counts (sent, dropped, failed, compared) live in the Recorder, which
    both /metrics and /status read; a mismatch is also given to `on_mismatch`
    (the controller's event feed)."""

    def __init__(self, shared: Shared, on_mismatch: Callable[[dict], None]) -> None:
        self.shared = shared
        self.on_mismatch = on_mismatch
        self.in_flight = 0
        self.mismatches: deque[dict] = deque(maxlen=MAX_MISMATCHES)
        self.cfg: Mirror | None = None  # the policy `methods` was made from
        self.methods: frozenset[bytes] = frozenset()

    def eligible(self, ex: Forwarding, decision: Decision) -> Mirror | None:
        """The mirror policy if `ex` should be copied (before its body is known).

        Called for every request while a mirror is configured: the common "no"
        answers come first and cost a few attribute reads.
        """
        snap = ex.snap
        cfg = snap.mirror
        if cfg is None or decision.version != snap.stable or ex.upgrade:
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
        self.shared.recorder.mirrored("dropped")

    def launch(self, ex: Forwarding, cfg: Mirror, body: list[bytes]) -> Shadow | None:
        """Send the copy now that the primary's request is complete, or drop it.

        Returns the copy when the primary must feed it its answer (`compare` on);
        otherwise the primary has nothing more to do with it.
        """
        shared = self.shared
        if self.in_flight >= cfg.max_in_flight or shared.snapshot.table.latched:
            self.drop()
            return None
        snap = ex.snap
        pools = snap.upstreams.versions[snap.canary]
        pool = pools.pick()
        if pool is None:
            # Like a primary's 502: the guard must see it, or a dead canary (its
            # endpoints cooling down after refusals) would never fail its dark launch.
            rec = shared.recorder
            rec.mirrored("failed")
            rec.shadow_finished(snap.canary, 0, 0.0, "unavailable")
            log = shared.access
            if log is not None:
                now = time.monotonic()
                log.record(
                    now, now, ex.client.peer_address(), ex.method, ex.target, 0,
                    (snap.canary, "mirror"), 0, 0, None, "unavailable", True,
                )  # fmt: skip
            return None
        shadow = ShadowExchange(self, ex, cfg, b"".join(body))
        self.in_flight += 1
        shared.recorder.mirrored("sent")
        shadow.start(pool)
        return shadow if cfg.compare is not None else None

    def done(self, shadow: ShadowExchange) -> None:
        self.in_flight -= 1


def sampling_key(ex: Forwarding, decision: Decision) -> str | None:
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
        ex.client.peer_address(),
    )
    key = table.sticky_key(view, cookies)
    if key is None and table.anonymous == "cookie":
        key = decision.set_cookie or (cookies or {}).get(COOKIE_NAME) or None
    return key


_CHUNKED_LINE: Final = b"Transfer-Encoding: chunked\r\n"  # the last line upstream_request adds


def shadow_request(ex: Forwarding, body: bytes) -> bytes:
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


class ShadowExchange(UpstreamLeg, Shadow):
    """A fire-and-forget copy of one request, sent to the canary; no client attached."""

    # Class-level defaults: most keep them for the copy's whole life.
    done = False
    keep_alive = True
    mine: _Capture | None = None  # the canary's answer, when comparing
    primary: _Capture | None = None  # the primary's answer, when comparing
    primary_finished = False
    finished_status: int | None = None
    resp_bytes = 0  # the canary's answer's body bytes

    def __init__(self, owner: Mirroring, primary: Forwarding, cfg: Mirror, body: bytes) -> None:
        snap = primary.snap
        pools = snap.upstreams.versions[snap.canary]
        timeout = min(cfg.timeout, 5.0)
        super().__init__(owner.shared, pools, primary.method, primary.head.host is None, timeout)
        self.owner = owner
        self.cfg = cfg
        self.version = snap.canary
        self.target = primary.target
        self.client = primary.client.peer_address()  # for the access log
        self.req_bytes = len(body)
        self.data = shadow_request(primary, body)  # kept for one resend (see rewind)
        self.t0 = time.monotonic()  # the data plane's clock (proxy.forward)
        if cfg.compare is not None:
            limit = cfg.compare.max_body_bytes
            self.mine, self.primary = _Capture(limit), _Capture(limit)

    # -- the leg's hooks ------------------------------------------------------------------

    def start(self, pool: Pool) -> None:
        self.wait_until(self.t0 + self.cfg.timeout)  # the timeout covers the whole copy
        self.dial_pool(pool)

    def over(self) -> bool:
        return self.done

    def outgoing(self) -> bytes:
        return self.data

    def attached(self) -> None:
        if not self.reused:
            self.data = b""  # a fresh connection is never resent on

    def rewind(self) -> bool:
        return bool(self.data) and not self.done

    def leg_failed(self, status: int, kind: str, cause: str) -> None:
        self.end(0, kind)

    def upstream_paused(self, paused: bool) -> None:
        """Nothing to pause: the copy's body is already in memory."""

    # -- the canary's answer ----------------------------------------------------------------

    def whole_response(self, data: bytes, end: int) -> bool:
        """A complete, sized answer read in one piece: take it without the parser."""
        found = self.sized(data, end)
        if found is None:
            return False
        status, sle, rh = found
        self.finished_status = status
        self.keep_alive = not rh.close
        self.data = b""
        self.resp_bytes = len(data) - end - 4
        if self.mine is not None:
            self.mine.head(status, data[sle : end + 2])
            self.mine.add(data[end + 4 :])
        self.response_complete()
        return True

    def read_done(self) -> None:
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
        self.resp_bytes += len(data)
        if self.mine is not None:
            self.mine.add(data)

    def response_complete(self) -> None:
        if self.done or self.finished_status is None:
            return
        conn = self.detach()
        if conn is not None:
            if self.keep_alive and self.pool is not None:
                self.pool.give(conn)
            else:
                conn.close()
        self.end(self.finished_status, None)

    def upgraded(self, rest: bytes) -> None:
        self.upstream_failed("protocol", "unexpected protocol switch")

    def tunnel_data(self, data: bytes) -> None:
        self.upstream_failed("protocol", "unexpected protocol switch")

    def upstream_lost(self, silent: bool = False, until_close: bool = False) -> None:
        """The canary's connection closed (`silent`: before one byte of an answer)."""
        self.conn = None
        if self.done:
            return
        if silent and self.resend():
            return
        if self.finished_status is not None and until_close:
            self.end(self.finished_status, None)  # the close is the end of the body
            return
        self.end(0, "reset")

    def upstream_failed(self, kind: str, cause: str, status: int = 502) -> None:
        self.close_conn()
        self.end(0, kind)

    def timed_out(self) -> None:
        self.deadline = 0.0
        self.upstream_failed("timeout", "shadow timeout")

    # -- the end --------------------------------------------------------------------------------

    def end(self, status: int, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.stop_waiting()
        self.owner.done(self)
        shared = self.shared
        rec = shared.recorder
        now = time.monotonic()
        rec.shadow_finished(self.version, status, now - self.t0, error)
        log = shared.access
        if log is not None:
            log.record(
                self.t0, now, self.client, self.method, self.target, status,
                (self.version, "mirror"), self.req_bytes, self.resp_bytes, self.pool, error, True,
            )  # fmt: skip
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
        self.shared.recorder.compared(outcome.result)
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
            self.owner.on_mismatch(event)
