"""The `turnout` command: argument parsing and wiring only.

User errors print one line (or the list of config problems) and exit non-zero;
no tracebacks. Text that came from outside (a rollback's reason, an actor, a
config error, the admin API's error message) is printed with its control
characters escaped (proxy.safetext), and so is every argument of a log line
of `turnout run`: none of it can recolour the terminal or forge a line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from .config import ConfigError, load, render_problems
from .safetext import EscapingFilter, escape

DEFAULT_ADMIN = "http://127.0.0.1:9901"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except CommandError as err:
        print(f"turnout: {err}", file=sys.stderr)
        return 1


class CommandError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turnout", description="Traffic-splitting reverse proxy")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True)
    run.add_argument("--log-level", default=os.environ.get("TURNOUT_LOG_LEVEL", "info"))
    run.add_argument(
        "--workers",
        default=os.environ.get("TURNOUT_WORKERS", "1"),
        help="processes sharing the port: a number, or 'auto' for one per core (default 1)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="play a release on demo upstreams")
    demo.add_argument("--duration", type=float, default=None, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--admin", default=os.environ.get("TURNOUT_ADMIN", DEFAULT_ADMIN))
        c.add_argument("--token", default=os.environ.get("TURNOUT_TOKEN"))
        return c

    status = client("status", "show the proxy's status")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    rollback = client("rollback", "route everything to stable now and latch it")
    rollback.add_argument("--reason", default=None)
    rollback.set_defaults(func=cmd_action, action="rollback")
    for name, text in (
        ("resume", "clear the rollback latch and un-pause the rollout"),
        ("promote", "approve a waiting rollout step, or advance to the next one now"),
        ("pause", "freeze the rollout at its current step"),
        ("reload", "reload the config file now"),
    ):
        client(name, text).set_defaults(func=cmd_action, action=name)

    explain = client("explain", "which version a request would get, and why")
    explain.add_argument("--key")
    explain.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    explain.add_argument("--path", default="/")
    explain.add_argument("--method", default="GET")
    explain.set_defaults(func=cmd_explain)
    return p


# -- server-side commands -----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as err:
        print(render_problems(err), file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(cfg.versions)
    print(f"{args.config}: ok (versions {names}; stable {cfg.stable}, canary {cfg.canary})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapingFilter())
    try:
        cfg = load(args.config)
    except ConfigError as err:
        print(render_problems(err), file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        logging.getLogger("turnout").warning("%s", warning)
    from .workers import Supervisor, parse_workers, role_from_env

    try:
        workers = parse_workers(args.workers)
    except ValueError as err:
        print(f"turnout: {err}", file=sys.stderr)
        return 2
    if workers > 1 and role_from_env() is None:
        return Supervisor(args.config, workers, args.log_level).run()
    import uvloop

    from .server import Server

    async def serve() -> None:
        await Server(cfg).serve_forever()

    try:
        uvloop.run(serve())
    except OSError as err:
        print(f"turnout: cannot listen: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .release_demo import run_demo

    return run_demo(duration=args.duration)


# -- client commands -------------------------------------------------------------------


def admin_get(args: argparse.Namespace, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` as JSON to) the admin API; CommandError on any failure."""
    url = args.admin.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = escape(str(json.loads(err.read()).get("error", "")))
        except (ValueError, AttributeError):
            detail = ""
        hint = " (pass --token or set TURNOUT_TOKEN)" if err.code == 401 and not args.token else ""
        raise CommandError(f"{url}: HTTP {err.code} {detail}".rstrip() + hint) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CommandError(f"cannot reach the admin API at {args.admin}: {reason}") from None


def cmd_status(args: argparse.Namespace) -> int:
    doc = admin_get(args, "/status")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render_status(doc))
    return 0


def render_status(doc: dict) -> str:
    cfg = doc["config"]
    w = doc["weight"]
    lines = [
        f"stable {doc['stable']} · canary {doc['canary']} · weight {w['effective']}% "
        f"(configured {w['configured']}%)",
        f"config {cfg['path']} generation {cfg['generation']} loaded {cfg['loaded_at']}",
    ]
    if cfg.get("last_error"):
        lines.append(f"last reload FAILED at {cfg.get('last_error_at')}:")
        lines.extend("  " + escape(line) for line in cfg["last_error"].split("\n"))
    rb = doc["rollback"]
    if rb["active"]:
        who, why = escape(str(rb.get("actor"))), escape(str(rb["reason"]))
        lines.append(f"rollback latch: SET at {rb['at']} by {who} — {why}")
    else:
        lines.append("rollback latch: clear")
    ro = doc["rollout"]
    if ro["state"] == "none":
        lines.append("rollout: none")
    else:
        extra = f", awaiting approval by {ro['awaiting']}" if ro.get("awaiting") else ""
        nxt = f", next step at {ro['next_at']}" if ro.get("next_at") else ""
        rings = ", ".join(escape(str(r)) for r in ro.get("rings") or ())
        # under the latch everyone is on stable: the step's ring is not in force
        ring = f" plus ring {rings}" if rings and not rb["active"] else ""
        lines.append(f"rollout: {ro['state']} — step {ro['step']} of {ro.get('steps')}, "
                     f"weight {ro['weight']}%{ring}{extra}{nxt}")  # fmt: skip
        for what in ro.get("waiting_for") or ():
            lines.append(f"  waiting for {escape(str(what))}")
    mirror = doc.get("mirror")
    if mirror:
        lines.append(
            f"mirror: {mirror['percent']}% of {','.join(mirror['methods'])} · sent {mirror['sent']}"
            f" · dropped {mirror['dropped']} · failed {mirror['failed']}"
            + (
                f" · matched {mirror['matched']} · mismatched {mirror['mismatched']}"
                if mirror["compare"]
                else ""
            )  # fmt: skip
        )
    workers = doc.get("workers")
    if workers:
        each = " · ".join(f"{m['index']}: pid {m['pid']}, {m['requests']} requests"
                          for m in workers["members"])  # fmt: skip
        lines.append(f"workers: {workers['count']} ({each})")
    lines.append(_state_line(doc.get("state") or {}))
    guard = doc.get("guard")
    if guard:
        lines.append(f"guard: {guard['state']}" + (f" ({', '.join(guard['reasons'])})"
                                                    if guard["reasons"] else "")
                     + _source_words(guard.get("source") or {}))  # fmt: skip
        if guard.get("summary"):
            lines.append(f"  {escape(guard['summary'])}")
    lines.append(f"{'version':<12}{'requests':>10}{'errors':>8}{'err%':>8}{'p99 ms':>9}")
    for name, v in doc["versions"].items():
        p99 = "-" if v["p99_ms"] is None else f"{v['p99_ms']:.1f}"
        lines.append(
            f"{name:<12}{v['requests']:>10}{v['errors']:>8}{100 * v['error_rate']:>7.2f}%{p99:>9}"
        )
    return "\n".join(lines)


def _state_line(st: dict) -> str:
    """Where the release state lives and whether it is up (PRODUCT.md §11)."""
    if st.get("backend") == "redis":
        where = (
            f"state: redis {escape(str(st.get('url')))} prefix {escape(str(st.get('key_prefix')))}"
        )
        if not st.get("up"):
            unwritten = ", ".join(st.get("unwritten") or ()) or "nothing"
            return (f"{where} — UNREACHABLE since {st.get('down_since')}: "
                    f"{escape(str(st.get('error')))} (unwritten here: {unwritten})")  # fmt: skip
        lead = "this replica leads the rollout" if st.get("leader") else (
            f"the rollout is led by {escape(str(st.get('lease_holder')))}"
            if st.get("lease_holder") else "no replica leads the rollout")  # fmt: skip
        return f"{where} — up · {lead}"
    where = f"state: file {escape(str(st.get('file')))}"
    if st.get("persisted", True):
        return f"{where} — written"
    return f"{where} — NOT WRITTEN: {escape(str(st.get('error')))}"


def _source_words(src: dict) -> str:
    if src.get("kind") != "prometheus":
        return " · source local"
    where = f" · source prometheus {escape(str(src.get('url')))} job {escape(str(src.get('job')))}"
    if src.get("up"):
        return where + " (up)"
    return where + f" (DOWN: {escape(str(src.get('last_error')))})"


def cmd_action(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if getattr(args, "reason", None) else {}
    doc = admin_get(args, "/" + args.action, body)
    st = doc.get("status", {})
    rb = st.get("rollback", {})
    ro = st.get("rollout", {})
    weight = st.get("weight", {}).get("effective")
    line = f"{args.action}: ok (by {escape(str(doc.get('actor')))}) · weight {weight}%"
    if ro.get("state", "none") != "none":
        line += f" · rollout {ro['state']} step {ro['step']}"
    if rb.get("active"):
        line += f" · rollback latch SET ({escape(str(rb.get('reason')))})"
    if "generation" in doc:
        line += f" · generation {doc['generation']}"
    print(line)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    params: list[tuple[str, str]] = [("path", args.path), ("method", args.method)]
    if args.key is not None:
        params.append(("key", args.key))
    for h in args.header:
        if ":" not in h:
            raise CommandError(f"--header must be NAME:VALUE, got {h!r}")
        params.append(("header", h))
    doc = admin_get(args, "/explain?" + urllib.parse.urlencode(params))
    bucket = "" if doc.get("bucket") is None else f" (bucket {doc['bucket']})"
    print(f"{doc['version']} — reason {doc['reason']}{bucket}")
    if doc.get("note"):
        print(doc["note"])
    return 0
