"""Is the shadow response the same as the primary one? Pure; no I/O.

Rules (docs/mirror.md):
- Status first: a different status is a "status" mismatch and nothing else is looked at.
- Then headers: only those `compared_headers(cfg)` names (`cfg.headers` if the
  operator listed any, else `content-type`; minus `ignore_headers`, hop-by-hop,
  framing and `x-turnout-*`). Names are case-insensitive, values exact; a header
  present on one side only differs. Any difference is a "headers" mismatch.
- Then the body. When both bodies are complete (`len(body) == length`), within
  `cfg.max_body_bytes`, and both parse as JSON (a side is tried when its
  content type contains "json" or its body starts with `{` or `[`), they are compared as
  JSON values minus `cfg.ignore_json_fields`: object key order does not matter,
  numbers compare by value (1 == 1.0) but never equal a boolean, arrays compare
  element by element. Otherwise the full-body digests decide.
- `detail` is JSON-safe and bounded: header values, up to 20 paths, and
  200-character excerpts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import COMPARED_BY_DEFAULT, NEVER_COMPARED, NEVER_COMPARED_PREFIX, Compare

MAX_PATHS = 20  # differing JSON paths kept in a mismatch
EXCERPT_CHARS = 200


@dataclass(frozen=True, slots=True)
class Captured:
    """One side's response as the mirror saw it."""

    status: int
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) as received, no hop-by-hop
    body: bytes  # the first `limit` bytes (may be truncated)
    length: int  # the full body length
    digest: str  # hex sha256 of the FULL body (computed by the caller while streaming)


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str  # "match" | "mismatch"
    kind: str | None  # None on match; "status" | "headers" | "body"
    detail: dict  # JSON-safe; {} on match


def compare(primary: Captured, shadow: Captured, cfg: Compare) -> Outcome:
    """Status, then the compared headers, then the body (as JSON when both are JSON)."""
    if primary.status != shadow.status:
        return Outcome("mismatch", "status", {"primary": primary.status, "shadow": shadow.status})
    differing = _header_diff(primary.headers, shadow.headers, compared_headers(cfg))
    if differing:
        return Outcome("mismatch", "headers", differing)
    a, b = _as_json(primary, cfg), _as_json(shadow, cfg)
    if a is not _NOT_JSON and b is not _NOT_JSON:
        paths = _diff(a, b, cfg.ignore_json_fields, MAX_PATHS)
        if not paths:
            return Outcome("match", None, {})
        found: dict[str, Any] = {"paths": paths, **_excerpts(primary, shadow)}
        return Outcome("mismatch", "body", found)
    if primary.digest == shadow.digest:
        return Outcome("match", None, {})
    detail = {
        "primary_digest": primary.digest,
        "shadow_digest": shadow.digest,
        **_excerpts(primary, shadow),
        "primary_length": primary.length,
        "shadow_length": shadow.length,
    }
    return Outcome("mismatch", "body", detail)


def compared_headers(cfg: Compare) -> tuple[str, ...]:
    """The lower-case header names a comparison with `cfg` looks at, in order."""
    listed = tuple(name.lower() for name in cfg.headers) or COMPARED_BY_DEFAULT
    ignored = {name.lower() for name in cfg.ignore_headers}
    return tuple(
        name
        for name in dict.fromkeys(listed)
        if name not in ignored
        and name not in NEVER_COMPARED
        and not name.startswith(NEVER_COMPARED_PREFIX)
    )


# ------------------------------------------------------------------------ headers


def _header_diff(
    primary: tuple[tuple[str, str], ...], shadow: tuple[tuple[str, str], ...], names: tuple
) -> dict[str, dict[str, str | None]]:
    """name -> {primary, shadow} for each compared header whose values differ."""
    if not names:
        return {}
    wanted = set(names)
    a, b = _values(primary, wanted), _values(shadow, wanted)
    return {
        name: {"primary": _joined(a.get(name)), "shadow": _joined(b.get(name))}
        for name in names
        if a.get(name) != b.get(name)
    }


def _values(headers: tuple[tuple[str, str], ...], wanted: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        if (low := name.lower()) in wanted:
            out.setdefault(low, []).append(value)
    return out


def _joined(values: list[str] | None) -> str | None:
    return None if values is None else ", ".join(values)


# --------------------------------------------------------------------------- body

_NOT_JSON: Any = object()


def _as_json(side: Captured, cfg: Compare) -> Any:
    """The parsed body, or _NOT_JSON: truncated, too large, not JSON-looking, or invalid."""
    if len(side.body) != side.length or side.length > cfg.max_body_bytes:
        return _NOT_JSON
    content_type = next((v for n, v in side.headers if n.lower() == "content-type"), "")
    if "json" not in content_type.lower() and side.body.lstrip()[:1] not in (b"{", b"["):
        return _NOT_JSON
    try:
        return _loads(side.body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _NOT_JSON


# Numbers are parsed into 1-tuples so that Python's C-speed `==` on whole trees is
# JSON equality: (1,) == (1.0,) but (1,) != True, and a tuple never equals a list.
# That lets the walk skip equal subtrees without visiting them.
def _loads(text: str | bytes) -> Any:
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_float)


def _int(text: str) -> tuple[int]:
    return (int(text),)


def _float(text: str) -> tuple[float]:
    return (float(text),)


def json_diff(a: Any, b: Any, ignore: tuple[str, ...], limit: int = MAX_PATHS) -> list[str]:
    """Dotted paths where JSON values `a` and `b` differ, depth first, at most `limit`.

    The root is "". Object keys are path segments, and so are array indices
    ("items.0.id"). A key or element present on one side only reports its path;
    a type difference reports the path and does not descend. A path matching an
    `ignore` pattern (same number of segments, each equal or `*`) is skipped
    with everything below it. `a` and `b` are not modified.
    """
    return _diff(_loads(json.dumps(a)), _loads(json.dumps(b)), ignore, limit)


def _diff(a: Any, b: Any, ignore: tuple[str, ...], limit: int) -> list[str]:
    """json_diff of two trees from `_loads`, which it modifies (ignored parts are cut)."""
    for pattern in ignore:
        segments = pattern.split(".")
        _cut(a, segments)
        _cut(b, segments)
    out: list[str] = []
    stack: list[tuple[tuple[str, ...], Any, Any]] = [((), a, b)]
    while stack and len(out) < limit:
        path, x, y = stack.pop()
        if x is _CUT or y is _CUT or x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            keys = dict.fromkeys([*x, *y])
            pairs = [(k, x.get(k, _MISSING), y.get(k, _MISSING)) for k in keys]
        elif isinstance(x, list) and isinstance(y, list):
            pairs = [(str(i), _at(x, i), _at(y, i)) for i in range(max(len(x), len(y)))]
        else:
            if not _same_leaf(x, y):
                out.append(".".join(path))
            continue
        stack.extend(reversed([((*path, k), u, v) for k, u, v in pairs]))
    return out


_MISSING: Any = object()  # a key or element the other side has
_CUT: Any = object()  # an ignored array element (removing it would shift the indices)


def _at(items: list, i: int) -> Any:
    return items[i] if i < len(items) else _MISSING


def _cut(tree: Any, segments: list[str]) -> None:
    """Remove what the path `segments` (with `*`) names: object keys go, elements become _CUT."""
    nodes = [tree]
    for seg in segments[:-1]:
        nodes = [child for node in nodes for child in _children(node, seg)]
    last = segments[-1]
    for node in nodes:
        if isinstance(node, dict):
            if last == "*":
                node.clear()
            else:
                node.pop(last, None)
        elif isinstance(node, list):
            for i in range(len(node)) if last == "*" else _index(node, last):
                node[i] = _CUT


def _children(node: Any, seg: str) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values()) if seg == "*" else [node[seg]] if seg in node else []
    if isinstance(node, list):
        return node if seg == "*" else [node[i] for i in _index(node, seg)]
    return []


def _index(items: list, seg: str) -> range:
    """The index `seg` names in `items` ("3", not "03"), as a range of 0 or 1."""
    if seg.isdigit() and str(int(seg)) == seg and int(seg) < len(items):
        return range(int(seg), int(seg) + 1)
    return range(0)


def _same_leaf(x: Any, y: Any) -> bool:
    """Equality of two values that are not both objects or both arrays (NaN equals NaN)."""
    if isinstance(x, tuple) and isinstance(y, tuple):  # numbers, see _loads
        return x[0] == y[0] or (x[0] != x[0] and y[0] != y[0])  # NaN is not equal to itself
    return False  # `==` already said no: a different value, type or a missing side


# ------------------------------------------------------------------------ excerpts


def _excerpts(primary: Captured, shadow: Captured) -> dict[str, str]:
    return {"primary_excerpt": _side_excerpt(primary), "shadow_excerpt": _side_excerpt(shadow)}


def _side_excerpt(side: Captured) -> str:
    text = excerpt(side.body, EXCERPT_CHARS)
    truncated = side.length > len(side.body)
    return text + "…" if truncated and not text.endswith("…") else text


def excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    """The start of `body` as one printable line: UTF-8 (undecodable bytes as U+FFFD),
    control characters escaped (\\n, \\t, \\x00); over `limit` characters it is cut
    to `limit` and ends with "…"."""
    text = body[: limit * 4 + 4].decode("utf-8", "replace")
    out: list[str] = []
    size = 0
    for ch in text:
        piece = ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        if size + len(piece) > limit:
            return "".join(out) + "…"
        out.append(piece)
        size += len(piece)
    return "".join(out)  # a longer body would have crossed `limit` above
