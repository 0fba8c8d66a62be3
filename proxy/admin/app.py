"""Admin HTTP API on `admin.listen` (aiohttp; nothing here is on the request path).

Routes: GET /metrics, /healthz, /readyz (no auth); GET /status, /explain,
/events (viewer); POST /rollback, /pause (any token); POST /resume, /promote,
/reload (a role other than viewer; promote into an approval step needs that
step's role). Errors are JSON `{"error": ...}` with a 4xx status; every action,
allowed or refused, is audited. Who may call is auth.py's (with tokens: the
bearer token; without: loopback peer, Host and Origin).

An action's body is a JSON object sent as `Content-Type: application/json`;
an empty body is `{}` whatever its type (aiohttp and others label it
application/octet-stream); a browser cannot send one cross-site without an
Origin header, which auth.py refuses without tokens, nor with a bearer token.
A non-empty body of another type (text/plain, a form) is 415; a body over
`MAX_BODY_BYTES` (64 KiB) is 413; malformed JSON, JSON nested deeper than
`MAX_JSON_DEPTH` (32), or anything but an object is 400; a rollback `reason`
that is not a string or is longer than `MAX_REASON_CHARS` (512) is 400. Each
refusal is audited (rate-limited, see auth.py) and changes nothing.
Timestamps are ISO 8601 UTC with milliseconds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from .. import native, rollout
from ..controller import ALL_ROLES, ActionError
from ..exposition import registry, render
from ..history import SPAN
from ..metrics import Recorder
from ..routing import RequestView, Table, decide
from ..store import Unavailable
from .auth import ANY_TOKEN, OPERATOR, Audit, Caller, Denied, allow, identify

MAX_BODY_BYTES = 64 << 10  # an action's body is a few bytes of JSON
STATIC = Path(__file__).resolve().parent / "static"  # the dashboard: no build step
STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
# The page loads only its own files and talks only to this listener.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_JSON_DEPTH = 32
MAX_REASON_CHARS = 512

if TYPE_CHECKING:
    from ..controller import Controller
    from ..history import History
    from ..mirror import Mirroring
    from ..reload import Reloader
    from ..runtime import Runtime
    from ..tls import Terminator
    from ..workers import Fleet


class Proxy(Protocol):
    """What the admin API reads and steers: the proxy process it belongs to
    (proxy.server's Server, the composition root, implements it)."""

    runtime: Runtime
    controller: Controller
    reloader: Reloader
    mirroring: Mirroring
    fleet: Fleet | None
    history: History
    ready: bool

    def counts(self) -> Recorder:
        """The counters to show: this process's, or the whole fleet's on the leader."""
        ...

    def terminator(self) -> Terminator | None:
        """The TLS settings new handshakes on the listener get; None: cleartext."""
        ...


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def status_document(server: Proxy) -> dict:
    rt = server.runtime
    snap = rt.snapshot
    cfg = snap.config
    rec = server.counts()
    totals = rec.version_totals()
    in_flight = rec.in_flight()
    versions = {}
    for name in cfg.versions:
        t = totals.get(name, {"requests": 0, "errors": 0})
        versions[name] = {
            "requests": t["requests"],
            "errors": t["errors"],
            "error_rate": round(t["errors"] / t["requests"], 6) if t["requests"] else 0.0,
            "p99_ms": rec.p99_ms(name),
            "in_flight": in_flight.get(name, 0),
            "endpoints": [ep.url for ep in cfg.versions[name].endpoints],
            "release": cfg.versions[name].release,
            # the last ~10 s, from the history the server samples every second
            "recent": server.history.recent(name),
        }
    return {
        "config": {
            "path": cfg.path,
            "generation": snap.generation,
            "loaded_at": _iso(snap.loaded_at),
            "last_error": rt.last_error,
            "last_error_at": _iso(rt.last_error_at),
            "reloads": dict(rec.reloads),
            "warnings": list(cfg.warnings),
        },
        "stable": cfg.stable,
        "canary": cfg.canary,
        "weight": {"configured": cfg.routing.weight, "effective": snap.table.weight},
        "rollback": _latch(rt.latch),
        "state": server.controller.persistence(),
        "rollout": _rollout(server),
        "guard": _guard(server),
        "versions": versions,
        "mirror": _mirror(server, rec),
        "workers": _workers(server),
        "access_log": None
        if cfg.access_log is None
        else {
            "path": cfg.access_log.path,
            "lines_dropped": rec.access_log_dropped,
        },
        "tls": _tls(server, rec),
        "build": native.build(),
    }


def _tls(server: Proxy, rec: Recorder) -> dict | None:
    term = server.terminator()
    if term is None:
        return None
    return {
        "certificates": [
            {"cert": c.cert, "names": list(c.names), "not_after": _iso(c.not_after)}
            for c in term.served
        ],
        "min_version": term.tls.min_version,
        "alpn": list(term.tls.alpn),
        "handshake_failures": dict(rec.tls_failures),
    }


def _workers(server: Proxy) -> dict | None:
    if server.fleet is None:
        return None
    return {"count": server.fleet.role.count, "members": server.fleet.members()}


def _mirror(server: Proxy, rec: Recorder) -> dict | None:
    cfg = server.runtime.config.mirror
    if cfg is None:
        return None
    m = server.mirroring
    latest = list(m.mismatches)
    if server.fleet is not None:
        for events in server.fleet.mismatches.values():
            latest.extend(events)
        latest.sort(key=lambda x: x["at"], reverse=True)
    return {
        **rec.mirror,
        "matched": rec.comparisons["match"],
        "mismatched": rec.comparisons["mismatch"],
        "in_flight": m.in_flight,
        "percent": cfg.percent,
        "methods": sorted(cfg.methods),
        "compare": cfg.compare is not None,
        "latest_mismatches": [{**x, "at": _iso(x["at"])} for x in latest[:10]],
    }


def _latch(latch) -> dict:
    return {
        "active": latch.active,
        "reason": latch.reason,
        "at": _iso(latch.at),
        "release": latch.release,
        "evidence": latch.evidence,
        "actor": latch.actor,
    }


def _rollout(server: Proxy) -> dict:
    rt = server.runtime
    cfg = rt.config.rollout
    p = rt.progress
    if cfg is None or p is None:
        return {"state": "none", "step": None, "weight": None, "rings": [], "next_at": None,
                "awaiting": None, "waiting_for": []}  # fmt: skip
    return {
        "state": p.phase.value,
        "step": p.step,
        "steps": [s.weight for s in cfg.steps],
        "step_approvals": [s.approve for s in cfg.steps],  # the role each step waits for
        # each step's ring (its cohorts), and the rings in force: routed to the canary on
        # top of the weight (reason ring:<cohort>)
        "step_rings": [list(s.cohorts) for s in cfg.steps],
        "weight": rollout.weight(p, cfg),
        "rings": list(rollout.rings(p, cfg)),
        "next_at": _iso(rollout.next_at(p, cfg)),
        "awaiting": rollout.awaiting(p, cfg),
        # what the step needs before it advances on its own, in words (dwell, verdict,
        # requests, evidence); [] when it would advance now or does not advance on time
        "waiting_for": server.controller.waiting_for(),
    }


def _guard(server: Proxy) -> dict | None:
    if server.runtime.config.guard is None:
        return None
    v = server.controller.last_verdict
    source = server.controller.source.doc()
    if v is None:
        return {"state": "inconclusive", "reasons": [], "evidence": None, "summary": None,
                "source": source}  # fmt: skip
    summary = (v.evidence.get("cumulative") or {}).get("summary")
    return {"state": v.state, "reasons": list(v.reasons), "evidence": v.evidence,
            "summary": summary, "source": source}  # fmt: skip


def explain(server: Proxy, query: web.Request) -> dict:
    """Which version a request with this key and these headers would get, and why."""
    table = server.runtime.snapshot.table
    headers: dict[str, str] = {}
    for raw in query.query.getall("header", []):
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise web.HTTPBadRequest(
                text='{"error": "header must be Name:Value"}', content_type="application/json"
            )
        headers[name.strip().lower()] = value.strip()
    key = query.query.get("key")
    path = query.query.get("path", "/")
    method = query.query.get("method", "GET").upper()
    q = ""
    peer = "127.0.0.1"
    if key is not None:
        kind, name = table.key_kind, table.key_name
        if kind == "header":
            headers[name] = key
        elif kind == "cookie":
            prior = headers.get("cookie")
            headers["cookie"] = f"{prior}; {name}={key}" if prior else f"{name}={key}"
        elif kind == "query":
            q = f"{name}={key}"
        elif kind == "ip":
            peer = key
    view = RequestView(method, path, q, headers, peer)
    d = decide(view, table)
    out = {"version": d.version, "reason": d.reason, "bucket": d.bucket,
           "words": _decision_words(d.version, d.reason, d.bucket, table)}  # fmt: skip
    if d.set_cookie:
        out["issued_key"] = d.set_cookie
    if key is not None and table.key_kind is None:
        out["note"] = "no sticky key is configured: the key was not used"
    return out


def _decision_words(version: str, reason: str, bucket: int | None, table: Table) -> str:
    """The decision path in words (PRODUCT.md §4's order: latch, rules, rings, weight)."""
    kind, _, name = reason.partition(":")
    w, stable, canary = table.weight, table.stable, table.canary
    if reason == "rollback":
        return f"{version}: the rollback latch is set, so every request goes to stable"
    if kind == "rule":
        return f"{version}: rule {name!r} matched (rules come before the weight)"
    if kind == "ring":
        return (f"{version}: the key is in cohort {name!r}, a ring of the rollout's current "
                "step, which goes to the canary whatever the weight")  # fmt: skip
    if reason == "weight" and bucket is not None:
        split = (f"buckets 1-{w} go to {canary} and {w + 1}-100 to {stable}" if 0 < w < 100
                 else f"every bucket goes to {canary if w >= 100 else stable}")  # fmt: skip
        return (f"{version}: no rule matched; the key hashes to bucket {bucket} of 100 and "
                f"the canary's weight is {w}%: {split}")  # fmt: skip
    if reason == "anonymous":
        return f"{version}: the request has no sticky key, and keyless requests go to stable"
    if reason == "random":
        return (f"{version}: the request has no sticky key, so it was split at random by the "
                f"weight ({w}% to {canary})")  # fmt: skip
    return f"{version}: {reason}"


ACTIONS = {"rollback": ANY_TOKEN, "pause": ANY_TOKEN, "resume": OPERATOR,
           "promote": OPERATOR, "reload": OPERATOR}  # fmt: skip


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AdminServer:
    def __init__(self, server: Proxy) -> None:
        self.server = server
        self.registry = registry(server.runtime.recorder)
        self.runner: web.AppRunner | None = None
        store = server.controller.store
        self.audit = Audit(server.controller.audit_path, copy=store.audit if store else None)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes(
            [
                web.get("/metrics", self.metrics),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/status", self.viewer(self.status)),
                web.get("/explain", self.viewer(self.explain)),
                web.get("/events", self.viewer(self.events)),
                web.get("/history", self.viewer(self.history)),
                web.get("/live", self.viewer(self.live)),
                web.get("/", self.page),
                web.get("/static/{name}", self.static),
                *(web.post(f"/{name}", self.action(name)) for name in ACTIONS),
            ]
        )
        self.app = app

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def caller(self, request: web.Request) -> Caller:
        return identify(request, self.server.runtime.config.admin.tokens)

    def viewer(self, handler):
        async def guarded(request: web.Request) -> web.Response:
            try:
                self.caller(request)
            except Denied as d:
                # Refused calls are audited too (PRODUCT.md §13), reads included: a
                # probe with a wrong token is worth a line. Not an event: a client
                # polling with a bad token must not push the real events out.
                self.audit.refused(d.caller, f"{request.method} {request.path}",
                                   d.status, d.message)  # fmt: skip
                return _error(d.status, d.message)
            return await handler(request)

        return guarded

    def action(self, name: str):
        async def act(request: web.Request) -> web.Response:
            ctl = self.server.controller
            try:
                caller = self.caller(request)
                allow(caller, ACTIONS[name])
                body = await json_body(request, caller.name)
                if name == "rollback":
                    _check_reason(body, caller.name)
            except Denied as d:
                # Rate-limited, and an event only when audited: a flood of refused
                # calls must neither grow the file without bound nor flush the events.
                if self.audit.refused(d.caller, name, d.status, d.message):
                    ctl.event("admin", action=name, actor=d.caller, outcome=f"refused {d.status}")
                return _error(d.status, d.message)
            try:
                result = await self.perform(name, caller, body)
            except ActionError as err:
                outcome = f"refused {err.status}"
                self.audit.record(caller.name, name, outcome, str(err))
                ctl.event("admin", action=name, actor=caller.name, outcome=outcome, detail=str(err))
                return _error(err.status, str(err))
            held = await ctl.confirm() if name == "rollback" else {"ok": True}
            outcome = "ok" if held["ok"] else "latched, not confirmed"
            note = held.get("error") or result.get("detail")
            self.audit.record(caller.name, name, outcome, None if note is None else str(note))
            ctl.event("admin", action=name, actor=caller.name, outcome=outcome)
            doc = {**held, "actor": caller.name, **result}
            # A latch that is not yet on disk or not yet in force in every worker: 503,
            # with what is missing; it stays in force here and the write is retried.
            return web.json_response(
                {**doc, "status": status_document(self.server)}, status=200 if held["ok"] else 503
            )

        return act

    async def perform(self, name: str, caller: Caller, body: dict) -> dict:
        ctl = self.server.controller
        if name == "rollback":
            reason = body.get("reason") or f"manual rollback by {caller.name}"
            if self.server.runtime.latch.active:
                held = self.server.runtime.latch.reason
                return {"detail": f"already latched ({held}); {reason!r} not recorded"}
            await ctl.fleet_action(name, lambda: ctl.rollback(reason, caller.name))
            return {"detail": reason}
        if name == "pause":
            await ctl.fleet_action(name, lambda: ctl.pause(caller.name))
            return {}
        if name == "resume":
            await ctl.fleet_action(name, lambda: ctl.resume(caller.name))
            return {}
        if name == "promote":
            roles = ALL_ROLES if caller.everything else caller.roles
            await ctl.fleet_action(name, lambda: ctl.promote(caller.name, roles))
            return {}
        ok, error = await self.server.reloader.reload_now(f"POST /reload by {caller.name}")
        if ok and self.server.fleet is not None:
            self.server.fleet.reload_followers()
        if not ok:
            raise ActionError(f"config rejected, the old one stays in force:\n{error}", 422)
        return {"generation": self.server.runtime.snapshot.generation}

    async def metrics(self, request: web.Request) -> web.Response:
        fleet = self.server.fleet
        body = render(self.registry if fleet is None else registry(fleet.merged()))
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.server.ready:
            return web.json_response({"status": "not ready"}, status=503)
        ctl = self.server.controller
        if ctl.latch_unsaved:  # a restart would forget the latch: route elsewhere meanwhile
            doc = {"status": "not ready", "reason": "the rollback latch is not saved",
                   "error": ctl.write_error}  # fmt: skip
            return web.json_response(doc, status=503)
        return web.json_response({"status": "ready"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status_document(self.server))

    async def explain(self, request: web.Request) -> web.Response:
        return web.json_response(explain(self.server, request))

    async def page(self, request: web.Request) -> web.Response:
        """The dashboard (static/index.html): anyone may load it; what it shows comes from
        /live, which needs the viewer role like /status."""
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_TYPES:
            return _error(404, "no such file")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        body = (STATIC / name).read_bytes()
        return web.Response(body=body, headers={
            "Content-Type": STATIC_TYPES[name], "Cache-Control": "no-cache",
            "Content-Security-Policy": DASHBOARD_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })  # fmt: skip

    async def live(self, request: web.Request) -> web.Response:
        """What the dashboard polls once a second: the status, the latest events, the
        ten-minute history and who the caller is (to show what it may do)."""
        caller = self.caller(request)
        doc = {
            "status": status_document(self.server),
            "events": await self.feed(30),
            "history": self.series(SPAN),
            "caller": {"name": caller.name, "roles": sorted(caller.roles),
                       "everything": caller.everything},
            "tokens": bool(self.server.runtime.config.admin.tokens),
        }  # fmt: skip
        return web.json_response(doc, dumps=_dumps)

    async def history(self, request: web.Request) -> web.Response:
        """Per-version requests/s, error ratio and p99, a point a second (?seconds=N)."""
        try:
            seconds = max(1.0, min(float(SPAN), float(request.query.get("seconds", SPAN))))
        except ValueError:
            return _error(400, "seconds must be a number")
        return web.json_response(self.series(seconds))

    def series(self, seconds: float) -> dict:
        doc = self.server.history.series(seconds)
        doc["at"] = [_iso(t) for t in doc["at"]]
        return doc

    async def feed(self, limit: int) -> list[dict]:
        """The newest `limit` events: the fleet's feed (each event once) when the state is
        in Redis and it answers, else this process's."""
        ctl = self.server.controller
        feed = list(ctl.events)[:limit]
        if ctl.store is not None and ctl.store.up:
            with contextlib.suppress(Unavailable):
                feed = await ctl.store.events(limit)
        return [{**e, "at": _iso(e["at"])} for e in feed]

    async def events(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(500, int(request.query.get("limit", "50"))))
        except ValueError:
            return _error(400, "limit must be an integer")
        return web.json_response({"events": await self.feed(limit)}, dumps=_dumps)


def _dumps(obj) -> str:
    return json.dumps(obj, default=str)


async def json_body(request: web.Request, actor: str) -> dict:
    """An action's JSON object (see the module's rules), or Denied (400, 413, 415)."""
    try:
        data = await request.read()  # at most client_max_size (MAX_BODY_BYTES)
    except web.HTTPRequestEntityTooLarge:
        raise Denied(413, f"the body is over the {MAX_BODY_BYTES} byte limit", actor) from None
    if not data:
        return {}  # nothing to read, whatever the type says (aiohttp sends octet-stream)
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise Denied(415, "an action's body must be sent as Content-Type: application/json", actor)
    try:
        body = json.loads(data)
    except RecursionError:
        raise Denied(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", actor) from None
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise Denied(400, f"malformed JSON: {err}", actor) from None
    if not isinstance(body, dict):
        raise Denied(400, f"the body must be a JSON object, got {type(body).__name__}", actor)
    if _depth(body) > MAX_JSON_DEPTH:
        raise Denied(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", actor)
    return body


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (an object or array is one level), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def _check_reason(body: dict, actor: str) -> None:
    """A rollback's `reason`, when given, is a string of at most MAX_REASON_CHARS; or 400."""
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise Denied(400, f"reason must be a string, got {type(reason).__name__}", actor)
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        why = f"reason is {len(reason)} characters, over the limit of {MAX_REASON_CHARS}"
        raise Denied(400, why, actor)
