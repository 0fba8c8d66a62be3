"""Admin HTTP API on `admin.listen` (aiohttp; nothing here is on the request path).

Routes: GET /metrics, /healthz, /readyz, /status, /explain.
Errors are JSON `{"error": ...}` with a 4xx status.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from aiohttp import web

from ..metrics import exposition
from ..routing import RequestView, decide

if TYPE_CHECKING:
    from ..server import Server


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def status_document(server: Server) -> dict:
    rt = server.runtime
    snap = rt.snapshot
    cfg = snap.config
    rec = rt.recorder
    totals = rec.version_totals()
    versions = {}
    for name in cfg.versions:
        t = totals.get(name, {"requests": 0, "errors": 0})
        versions[name] = {
            "requests": t["requests"],
            "errors": t["errors"],
            "error_rate": round(t["errors"] / t["requests"], 6) if t["requests"] else 0.0,
            "p99_ms": rec.p99_ms(name),
            "in_flight": rec.in_flight.get(name, 0),
            "endpoints": [ep.url for ep in cfg.versions[name].endpoints],
            "release": cfg.versions[name].release,
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
        "rollback": {
            "active": rt.latched,
            "reason": None,
            "at": None,
            "release": None,
            "evidence": None,
        },  # fmt: skip
        "rollout": {
            "state": "none",
            "step": None,
            "weight": None,
            "next_at": None,
            "awaiting": None,
        },  # fmt: skip
        "versions": versions,
    }


def explain(server: Server, query: web.Request) -> dict:
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
    out = {"version": d.version, "reason": d.reason, "bucket": d.bucket}
    if d.set_cookie:
        out["issued_key"] = d.set_cookie
    if key is not None and table.key_kind is None:
        out["note"] = "no sticky key is configured: the key was not used"
    return out


class AdminServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = server.runtime.recorder.registry()
        self.runner: web.AppRunner | None = None
        app = web.Application()
        app.add_routes(
            [
                web.get("/metrics", self.metrics),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/status", self.status),
                web.get("/explain", self.explain),
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

    async def metrics(self, request: web.Request) -> web.Response:
        body = exposition(self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.server.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status_document(self.server))

    async def explain(self, request: web.Request) -> web.Response:
        return web.json_response(explain(self.server, request))
