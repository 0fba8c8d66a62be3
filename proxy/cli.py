"""The `turnout` command: argument parsing and wiring only.

User errors print one line (or the list of config problems) and exit non-zero;
no tracebacks. Text that came from outside (a rollback's reason, an actor, a
config error, the admin API's error message) is printed with its control
characters escaped (proxy.safetext), and so is every argument of a log line
of `turnout run`: none of it can recolour the terminal or forge a line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import sys
import textwrap
import time
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
    status.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
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

    from .accessfile import LogOpenError
    from .server import Server

    async def serve() -> None:
        await Server(cfg).serve_forever()

    try:
        uvloop.run(serve())
    except LogOpenError as err:
        print(f"turnout: {err}", file=sys.stderr)
        return 1
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
            raw = resp.read()
            proxied = resp.headers.get("X-Turnout-Version") is not None
        if proxied:
            raise CommandError(f"{url}: an upstream answered{_PROXY_PORT.format(args.admin)}")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise CommandError(
                f"{url} did not answer JSON: is {args.admin} Turnout's admin listener "
                "(admin.listen), not its proxy port?"
            ) from None
        if not isinstance(doc, dict):
            raise CommandError(f"{url} answered JSON that is not an object")
        return doc
    except urllib.error.HTTPError as err:
        try:
            detail = escape(str(json.loads(err.read()).get("error", "")))
        except (ValueError, AttributeError):
            detail = ""
        hint = ""
        if err.headers.get("X-Turnout-Version") is not None:
            hint = _PROXY_PORT.format(args.admin)
        elif err.code == 401:
            hint = (" (pass --token or set TURNOUT_TOKEN)" if not args.token
                    else " (this token is not one of admin.tokens: check its value)")  # fmt: skip
        elif err.code == 403:
            hint = (" (ask for a token that holds that role)" if args.token else
                    " (without tokens the admin API answers loopback callers only)")  # fmt: skip
        elif err.code == 404:
            hint = f" (is {args.admin} Turnout's admin listener, admin.listen in its config?)"
        raise CommandError(f"{url}: HTTP {err.code} {detail}".rstrip() + hint) from None
    except http.client.HTTPException as err:  # cut off mid-answer (a restart, say)
        raise CommandError(f"{url}: the answer was cut off ({type(err).__name__})") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CommandError(
            f"cannot reach the admin API at {args.admin}: {reason} (is turnout running? its "
            "admin address is admin.listen in the config; pass --admin URL or set TURNOUT_ADMIN)"
        ) from None


# An answer that carries X-Turnout-Version came through the proxy, not the admin API.
_PROXY_PORT = (
    " ({} is Turnout's proxy port, which passed the call on to an upstream: point --admin"
    " at the admin listener, admin.listen in the config)"
)


def cmd_status(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(admin_get(args, "/status"), indent=2))
        return 0
    if not args.watch:
        print(render_status(admin_get(args, "/status"), terminal_width()))
        return 0
    return watch(args)


def watch(args: argparse.Namespace, every: float = 1.0) -> int:
    """Redraw the status every `every` s until Ctrl-C; an unreachable proxy is shown,
    not fatal (it may be restarting)."""
    tty = sys.stdout.isatty()
    try:
        while True:
            started = time.monotonic()
            try:
                text = render_status(admin_get(args, "/status"), terminal_width())
            except CommandError as err:
                text = f"turnout: {err}\n(retrying every {every:g} s; Ctrl-C stops)"
            stamp = time.strftime("%H:%M:%S")
            screen = f"{stamp}  turnout status --watch  {args.admin}\n\n{text}\n"
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + screen)
            sys.stdout.flush()
            time.sleep(max(0.0, every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0


def terminal_width() -> int:
    return max(40, min(120, shutil.get_terminal_size((80, 24)).columns))


def _bar(percent: float, cells: int) -> str:
    full = round(cells * max(0.0, min(100.0, percent)) / 100)
    return "█" * full + "░" * (cells - full)


def _steps_row(ro: dict, latched: bool) -> str | None:
    """The rollout's steps, the current one marked: ✓ done, ▶ current, · to come."""
    steps = ro.get("steps")
    if not steps:
        return None
    roles = ro.get("step_approvals") or [None] * len(steps)
    current, state = ro["step"], ro["state"]
    cells = []
    for i, (weight, role) in enumerate(zip(steps, roles, strict=False)):
        label = f"{weight}%" + (f" ({escape(str(role))} approves)" if role else "")
        if i < current or (i == current and state == "complete"):
            cells.append(f"✓{label}")
        elif i == current:
            cells.append(f"▶{label}" + (" ✗latched" if latched else ""))
        else:
            cells.append(f"·{label}")
    return "steps   " + "  ".join(cells)


_TEST_NAMES = {"error_rate": "binomial", "relative": "Fisher", "p99": "p99 binomial"}


def _guard_words(guard: dict) -> str | None:
    """The window's evidence in words: the counts, and each test's p against alpha."""
    ev = guard.get("evidence") or {}
    c, s = ev.get("canary"), ev.get("stable")
    if not c or not s:
        return None
    words = (f"  canary {c['errors']}/{c['requests']} errors ({100 * c['error_rate']:.1f}%)"
             f" vs stable {s['errors']}/{s['requests']}")  # fmt: skip
    alpha = (ev.get("thresholds") or {}).get("alpha")
    for name, t in (ev.get("tests") or {}).items():
        p = t.get("p_value")
        if p is None:
            continue
        against = "" if alpha is None else (f" < {alpha:.0e}" if p < alpha else f" ≥ {alpha:.0e}")
        words += f"; {_TEST_NAMES.get(name, name)} p = {p:.1e}{against}"
    return words


def _wrap(lines: list[str], width: int) -> str:
    out = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        indent = (
            "    " if not line.startswith(" ") else line[: len(line) - len(line.lstrip())] + "  "
        )
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False,
                                 break_long_words=True))  # fmt: skip
    return "\n".join(out)


def render_status(doc: dict, width: int = 80) -> str:
    """The status in at most `width` columns (80 by default): versions and releases,
    the weight as a bar, the steps, the latch, the verdict in words, rates and p99."""
    cfg = doc["config"]
    w = doc["weight"]
    versions = doc["versions"]

    def named(role: str, name: str) -> str:
        release = (versions.get(name) or {}).get("release")
        return f"{role} {escape(name)}" + (f" {escape(str(release))}" if release else "")

    rb = doc["rollback"]
    lines = [
        f"{named('stable', doc['stable'])} · {named('canary', doc['canary'])} · "
        f"weight {w['effective']}% (configured {w['configured']}%)",
    ]
    bar = width - 22
    lines.append(f"canary  {_bar(w['effective'], bar)} {w['effective']:>3}%"
                 + ("  LATCHED" if rb["active"] else ""))  # fmt: skip
    if rb["active"]:
        who, why = escape(str(rb.get("actor"))), escape(str(rb["reason"]))
        lines.append(f"rollback latch: SET at {rb['at']} by {who} — {why}")
    else:
        lines.append("rollback latch: clear")
    ro = doc["rollout"]
    if ro["state"] == "none":
        lines.append("rollout: none")
    else:
        row = _steps_row(ro, rb["active"])
        if row:
            lines.append(row)
        extra = f", awaiting approval by {ro['awaiting']}" if ro.get("awaiting") else ""
        nxt = f", next step at {ro['next_at']}" if ro.get("next_at") else ""
        rings = ", ".join(escape(str(r)) for r in ro.get("rings") or ())
        # under the latch everyone is on stable: the step's ring is not in force
        ring = f" plus ring {rings}" if rings and not rb["active"] else ""
        count = len(ro.get("steps") or ()) or "?"
        lines.append(f"rollout: {ro['state']} — step {ro['step']} of {count}, "
                     f"weight {ro['weight']}%{ring}{extra}{nxt}")  # fmt: skip
        for what in ro.get("waiting_for") or ():
            lines.append(f"  waiting for {escape(str(what))}")
    guard = doc.get("guard")
    if guard:
        lines.append(f"guard: {guard['state']}" + (f" ({', '.join(guard['reasons'])})"
                                                    if guard["reasons"] else "")
                     + _source_words(guard.get("source") or {}))  # fmt: skip
        words = _guard_words(guard)
        if words:
            lines.append(words)
        if guard.get("summary"):
            lines.append(f"  {escape(guard['summary'])}")
    lines.append(
        f"{'version':<14}{'requests':>11}{'errors':>8}{'err%':>8}{'req/s':>9}{'p99 ms':>9}"
    )
    for name, v in versions.items():
        # rates and p99 over the last ~10 s (the server's history); the lifetime error
        # ratio and p99 before there is any
        recent = v.get("recent") or {}
        rps = "-" if recent.get("rps") is None else f"{recent['rps']:.1f}"
        p99v = recent.get("p99_ms") if recent.get("p99_ms") is not None else v["p99_ms"]
        p99 = "-" if p99v is None else f"{p99v:.1f}"
        rate = recent.get("error_rate")
        rate = v["error_rate"] if rate is None else rate
        lines.append(f"{escape(name)[:13]:<14}{v['requests']:>11,}{v['errors']:>8,}"
                     f"{100 * rate:>7.2f}%{rps:>9}{p99:>9}")  # fmt: skip
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
    lines.append(f"config {cfg['path']} generation {cfg['generation']} loaded {cfg['loaded_at']}")
    if cfg.get("last_error"):
        lines.append(f"last reload FAILED at {cfg.get('last_error_at')}:")
        lines.extend("  " + escape(line) for line in cfg["last_error"].split("\n"))
    return _wrap(lines, width)


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
    print(f"{escape(str(doc['version']))} — reason {escape(str(doc['reason']))}{bucket}")
    if doc.get("words"):
        print(escape(str(doc["words"])))
    if doc.get("note"):
        print(escape(str(doc["note"])))
    return 0
