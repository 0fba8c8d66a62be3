"""The value parsers: one key's value (a scalar, a list of them, or a flat mapping).

Rules:
- A value parser returns the value, or `walker.BAD` once its problem is recorded;
  the message says what was expected and shows what was written (`got`).
- Durations are seconds (float) once loaded: '500ms', '2s', '1.5m' or a bare
  number of seconds. Sizes are bytes (int): an integer, or a number with B, KiB,
  MiB or GiB (binary units only).
- Relative paths (`state_file`, cohort `file`) are resolved against the config
  file's folder.
- Nothing here does network I/O; reading cohort files (at most `MAX_COHORT_BYTES`,
  64 MiB, each) is the only file I/O besides the config itself, and each one read
  goes into `Ctx.sources` with its digest.
- A cohort name or an `approve` role is only collected here: the loader checks it
  once every section is parsed, as sections may come in any order.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .model import COMPARED_BY_DEFAULT, MAX_COHORT_BYTES, Endpoint
from .walker import (
    BAD,
    NULL_TAG,
    Bad,
    Ctx,
    ParserOf,
    digest,
    got,
    join,
    parse_list,
    read_limited,
    unreadable,
)

TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names, methods


# ------------------------------------------------------------------------------- scalars


def string(ctx: Ctx, node: Node, path: str, empty: bool = False) -> str | Bad:
    """A string as written; plain numbers and booleans count (`release: 2.10` is '2.10')."""
    if not isinstance(node, ScalarNode) or node.tag == NULL_TAG:
        return ctx.error(path, node, f"must be a string, got {got(node)}")
    if not node.value and not empty:
        return ctx.error(path, node, "must not be empty")
    return node.value


def named(pattern: re.Pattern[str], what: str) -> ParserOf[str]:
    def parse(ctx: Ctx, node: Node, path: str) -> str | Bad:
        text = string(ctx, node, path)
        if text is not BAD and not pattern.fullmatch(text):
            return ctx.error(path, node, f"must be {what} ({pattern.pattern}), got {got(node)}")
        return text

    return parse


def choice(*options: str) -> ParserOf[str]:
    shown = ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"
    if len(options) == 1:
        shown = repr(options[0])

    def parse(ctx: Ctx, node: Node, path: str) -> str | Bad:
        if ctx.value(node) not in options:
            return ctx.error(path, node, f"must be {shown}, got {got(node)}")
        return node.value

    return parse


def boolean(ctx: Ctx, node: Node, path: str) -> bool | Bad:
    if not isinstance(value := ctx.value(node), bool):
        return ctx.error(path, node, f"must be true or false, got {got(node)}")
    return value


def file_path(ctx: Ctx, node: Node, path: str) -> str | Bad:
    text = string(ctx, node, path)
    return text if text is BAD else os.path.normpath(os.path.join(ctx.base_dir, text))


_HOSTPORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]/]*)):(\d{1,5})")


def host_port(ctx: Ctx, node: Node, path: str) -> tuple[str, int] | Bad:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' (all interfaces) -> (host, port)."""
    text = string(ctx, node, path)
    if text is BAD:
        return BAD
    m = _HOSTPORT.fullmatch(text)
    if not m or int(m[3]) > 65535:
        like = "HOST:PORT like 127.0.0.1:8080, [::1]:8080 or :8080"
        return ctx.error(path, node, f"must be {like}, got {got(node)}")
    return (m[1] or m[2] or "0.0.0.0", int(m[3]))


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def duration(ctx: Ctx, node: Node, path: str) -> float | Bad:
    """'500ms', '2s', '1.5m', or a bare number of seconds -> seconds (float, > 0)."""
    value = ctx.value(node)
    if isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        value = float(m[1]) * _DURATION_UNITS[m[2]]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ctx.error(path, node, f"must be a duration like 500ms, 2s or 1m, got {got(node)}")
    if not 0 < value < float("inf"):
        return ctx.error(path, node, f"must be a duration greater than 0, got {got(node)}")
    return float(value)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def size(low: int, high: int, bounds: str) -> ParserOf[int]:
    """Bytes: an integer, or a number with B, KiB, MiB or GiB (binary units only)."""

    def parse(ctx: Ctx, node: Node, path: str) -> int | Bad:
        value = ctx.value(node)
        if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
            value = int(float(m[1]) * _SIZE_UNITS[m[2]])
        if type(value) is not int:
            like = "a size like 16384, 64KiB or 100MiB (units B, KiB, MiB, GiB; not KB/MB/GB)"
            return ctx.error(path, node, f"must be {like}, got {got(node)}")
        if not low <= value <= high:
            return ctx.error(path, node, f"must be {bounds}, got {got(node)}")
        return value

    return parse


def percent(ctx: Ctx, node: Node, path: str) -> int | Bad:
    if type(value := ctx.value(node)) is not int or not 0 <= value <= 100:
        return ctx.error(path, node, f"must be an integer 0..100, got {got(node)}")
    return value


def int_at_least(low: int) -> ParserOf[int]:
    def parse(ctx: Ctx, node: Node, path: str) -> int | Bad:
        if type(value := ctx.value(node)) is not int or value < low:
            return ctx.error(path, node, f"must be an integer >= {low}, got {got(node)}")
        return value

    return parse


def _number(ctx: Ctx, node: Node, path: str) -> float | Bad:
    value = ctx.value(node)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return BAD
    return float(value)


def rate(ctx: Ctx, node: Node, path: str) -> float | Bad:
    """A fraction strictly between 0 and 1 (0.02 is 2%)."""
    if (value := _number(ctx, node, path)) is BAD or not 0 < value < 1:
        return ctx.error(
            path, node, f"must be a number between 0 and 1 (exclusive), got {got(node)}"
        )
    return value


def positive(ctx: Ctx, node: Node, path: str) -> float | Bad:
    if (value := _number(ctx, node, path)) is BAD or not 0 < value < float("inf"):
        return ctx.error(path, node, f"must be a number greater than 0, got {got(node)}")
    return value


def http_url(ctx: Ctx, node: Node, path: str) -> str | Bad:
    """An http:// or https:// URL with a host (a path and query are fine)."""
    if (url := string(ctx, node, path)) is BAD:
        return BAD
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as e:
        return ctx.error(path, node, f"must be an http:// or https:// URL, got {url!r} ({e})")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ctx.error(path, node, f"must be an http:// or https:// URL with a host, got {url!r}")
    return url


# ------------------------------------------------------------------------------ versions


def endpoints(ctx: Ctx, node: Node, path: str) -> list[Endpoint] | Bad:
    what = "http://, https:// or h2c://HOST:PORT URLs"
    return parse_list(ctx, node, path, _endpoint, what, lambda e: f"endpoint {e.key}")


def _endpoint(ctx: Ctx, node: Node, path: str) -> Endpoint | Bad:
    url = string(ctx, node, path)
    if url is BAD:
        return BAD
    hostport = _split_url(url)
    if isinstance(hostport, str):
        like = "a URL like http://127.0.0.1:9001"
        return ctx.error(path, node, f"must be {like}, got {url!r} ({hostport})")
    host, port = hostport
    scheme = url.split(":", 1)[0].lower()
    return Endpoint(url, host, port, scheme == "https", scheme == "h2c")


_DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80}  # h2c: HTTP/2 in cleartext


def _split_url(url: str) -> tuple[str, int] | str:
    """(host, port) of an upstream URL, or why it is not one."""
    if "://" not in url:
        return "the http:// scheme is missing"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return str(e)
    if parts.scheme not in _DEFAULT_PORTS:
        return f"only http, https and h2c are supported, not {parts.scheme}"
    if parts.username is not None or parts.password is not None:
        return "user info is not allowed"
    if not parts.hostname:
        return "the host is missing"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "a path, query or fragment is not allowed"
    default = _DEFAULT_PORTS[parts.scheme]
    return (parts.hostname, port or default) if port != 0 else "port 0 is not a valid port"


# ------------------------------------------------------------------------------- routing


STICKY_KINDS = ("header", "cookie", "query")  # plus "ip", which has no name
_QUERY_NAME = re.compile(r"[^\s&=#]+")


def sticky_key(ctx: Ctx, node: Node, path: str) -> tuple[str, str] | Bad:
    """'header:NAME' | 'cookie:NAME' | 'query:NAME' | 'ip' -> (kind, name)."""
    if (text := string(ctx, node, path)) is BAD:
        return BAD
    kind, _, name = text.partition(":")
    if text == "ip":
        return ("ip", "")
    if (_QUERY_NAME if kind == "query" else TOKEN).fullmatch(name) and kind in STICKY_KINDS:
        return (kind, name)
    like = "header:NAME, cookie:NAME, query:NAME or ip"
    return ctx.error(path, node, f"must be {like}, got {got(node)}")


def pairs(lower: bool) -> ParserOf[tuple[tuple[str, str], ...]]:
    """A mapping of header or cookie names to exact values -> ((name, value), ...)."""

    def parse(ctx: Ctx, node: Node, path: str) -> tuple[tuple[str, str], ...] | Bad:
        out: list[tuple[str, str]] = []
        for name, knode, vnode in ctx.entries(node, path) or ():
            if not TOKEN.fullmatch(name):
                ctx.error(join(path, name), knode, f"names must match {TOKEN.pattern}")
            elif (value := string(ctx, vnode, join(path, name), empty=True)) is not BAD:
                out.append((name.lower() if lower else name, value))
        if isinstance(node, MappingNode) and not node.value:
            return ctx.error(path, node, "must name at least one")
        return tuple(out)

    return parse


def cohort_ref(ctx: Ctx, node: Node, path: str) -> str | Bad:
    if (name := string(ctx, node, path)) is not BAD:
        ctx.cohort_refs.append((path, node, name))  # checked in the loader, once cohorts are known
    return name


def path_prefix(ctx: Ctx, node: Node, path: str) -> str | Bad:
    prefix = string(ctx, node, path)
    if prefix is not BAD and not prefix.startswith("/"):
        return ctx.error(path, node, f"must start with '/', got {got(node)}")
    return prefix


def methods(ctx: Ctx, node: Node, path: str) -> tuple[str, ...] | Bad:
    """'POST' or [GET, HEAD] -> ('POST',) / ('GET', 'HEAD')."""
    if not isinstance(node, SequenceNode):
        method = _method(ctx, node, path)
        return method if method is BAD else (method.upper(),)
    found = parse_list(ctx, node, path, _method, "HTTP methods")  # the valid ones
    return found if found is BAD else tuple(m.upper() for m in found)


_method = named(TOKEN, "an HTTP method")


def cohort_keys(ctx: Ctx, node: Node, path: str) -> list[str] | Bad:
    if isinstance(node, SequenceNode) and not node.value:
        return []  # an empty inline list is fine: the file may hold the keys
    return parse_list(ctx, node, path, string, "keys")


def cohort_file(ctx: Ctx, node: Node, path: str) -> tuple[str, frozenset[str]] | Bad:
    """(absolute path, keys): one key a line; blank lines and '#' lines are skipped."""
    if (resolved := file_path(ctx, node, path)) is BAD:
        return BAD
    try:
        data = read_limited(resolved, MAX_COHORT_BYTES)
    except (OSError, ValueError) as e:
        ctx.sources[resolved] = unreadable(e)
        why = e.strerror if isinstance(e, OSError) else e
        return ctx.error(path, node, f"cannot read cohort file {resolved}: {why}")
    ctx.sources[resolved] = digest(data)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return ctx.error(path, node, f"cannot read cohort file {resolved}: not UTF-8 text")
    keys = (s for line in lines if (s := line.strip()) and not s.startswith("#"))
    return resolved, frozenset(keys)


# --------------------------------------------------------------------- admin and rollout


_ROLE = re.compile(r"[a-z][a-z0-9_-]*")


def role_names(ctx: Ctx, node: Node, path: str) -> list[str] | Bad:
    if isinstance(node, SequenceNode) and not node.value:
        return []  # no role beyond viewer
    return parse_list(ctx, node, path, role_name, "role names")


role_name = named(_ROLE, "a role name")


def ring_cohorts(ctx: Ctx, node: Node, path: str) -> list[str] | Bad:
    return parse_list(ctx, node, path, cohort_ref, "cohort names", key=lambda name: name)


def approve_role(ctx: Ctx, node: Node, path: str) -> str | Bad:
    if (role := role_name(ctx, node, path)) is not BAD:
        ctx.approve_refs.append((path, node, role))  # checked against admin.tokens later
    return role


# ---------------------------------------------------------------------------- comparison


def header_names(ctx: Ctx, node: Node, path: str) -> list[str] | Bad:
    """A non-empty list of header names -> lower-case names (duplicates kept)."""
    if isinstance(node, SequenceNode) and not node.value:
        default = ", ".join(COMPARED_BY_DEFAULT)
        why = f"must list at least one header name (leave the key out to compare {default})"
        return ctx.error(path, node, why)
    found = parse_list(ctx, node, path, _header_name, "header names")
    return found if found is BAD else [name.lower() for name in found]


def ignored_headers(ctx: Ctx, node: Node, path: str) -> frozenset[str] | Bad:
    if isinstance(node, SequenceNode) and not node.value:
        return frozenset()  # nothing ignored
    found = header_names(ctx, node, path)
    return found if found is BAD else frozenset(found)


_header_name = named(TOKEN, "a header name")


_JSON_SEGMENT = r"(?:[A-Za-z0-9_$-]+|\*)"
_JSON_PATH = re.compile(rf"{_JSON_SEGMENT}(?:\.{_JSON_SEGMENT})*")


def json_paths(ctx: Ctx, node: Node, path: str) -> tuple[str, ...] | Bad:
    """Dotted paths into a JSON body; `*` is any key or array element ('items.*.id')."""
    if isinstance(node, SequenceNode) and not node.value:
        return ()  # nothing ignored
    found = parse_list(ctx, node, path, _json_path, "dotted JSON paths")
    return found if found is BAD else tuple(dict.fromkeys(found))


def _json_path(ctx: Ctx, node: Node, path: str) -> str | Bad:
    text = string(ctx, node, path)
    if text is not BAD and not _JSON_PATH.fullmatch(text):
        what = "a dotted path of field names ([A-Za-z0-9_$-]+) or * (any key or element)"
        return ctx.error(path, node, f"must be {what}, like meta.request_id, got {got(node)}")
    return text
