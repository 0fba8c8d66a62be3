"""The YAML walker: the node tree, the problems found in it, and the limits on it.

Rules:
- Every problem is collected, never raised one at a time: a `Problem` carries the
  dotted key path (e.g. "routing.rules[0].to", "" for the file itself) and the
  1-based line it sits on, and `ConfigError.problems` holds them all, in line order.
- Every mapping is parsed through a table of key -> parser (`parse_fields`):
  unknown keys are errors, with the closest known key as a hint, because a typo
  must never pass silently; duplicate keys and missing required keys are errors too.
- A parser returns its value or `BAD`, meaning "invalid, and the problem is
  already recorded" (`Ctx.error` records one and returns `BAD`).
- Warnings do not reject the file: `Ctx.warn` records them for `Config.warnings`.
- Limits: YAML may nest at most `MAX_DEPTH` (64) levels, and a file is read up to
  a byte limit (`read_limited`); beyond that the file is rejected with the limit,
  the key path and the line.
- `digest` is what `Config.sources` / `ConfigError.sources` hold for a file: the
  SHA-256 of the exact bytes parsed, or why it could not be read (`unreadable`);
  `file_digest` reads a file the same way, so a reloader can compare.
- Nothing here does network I/O or knows the schema: the tables, the parsers
  and the cross-checks are elsewhere in the package; `Ctx` only carries what
  the cross-checks collect on the way (cohort and role references, secrets).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import os
import stat
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 64  # YAML nesting; the schema itself needs fewer than 10 levels

# ------------------------------------------------------------------------ problems


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # dotted key path, e.g. "routing.rules[0].to"; "" for the file itself
    message: str
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return where + self.message + (f" (line {self.line})" if self.line else "")


class ConfigError(Exception):
    """An unusable config file; `.problems` holds every problem found, in line order."""

    def __init__(
        self,
        problems: list[Problem],
        source: str | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = list(problems)
        self.source = source  # the config file's path, when known
        self.sources = dict(sources or {})  # what the failed load read: see Config.sources


def render_problems(err: ConfigError) -> str:
    """A heading naming the file and the count, then one indented problem a line."""
    n = len(err.problems)
    head = f"{err.source or 'config'}: {n} problem{'' if n == 1 else 's'}"
    return "\n".join([head, *(f"  {p}" for p in err.problems)])


# ------------------------------------------------------------------------- files


def digest(data: bytes) -> str:
    """What `Config.sources` holds for a file whose bytes were `data`."""
    return hashlib.sha256(data).hexdigest()


def read_limited(path: str, limit: int) -> bytes:
    """The file's bytes; OSError when it cannot be read, ValueError when over `limit`
    or not a regular file (a FIFO would block the reload for good, /dev/zero never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        f = open(fd, "rb")  # noqa: SIM115 -- closed below; the fd is closed here on failure
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        shown = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} byte"
        raise ValueError(f"larger than the {shown} limit")
    return data


def file_digest(path: str, limit: int) -> str:
    """The digest `load` would record for `path` now, read the same way."""
    try:
        return digest(read_limited(path, limit))
    except (OSError, ValueError) as e:
        return unreadable(e)


def unreadable(e: Exception) -> str:
    return f"unreadable: {e.strerror if isinstance(e, OSError) else e}"


# --------------------------------------------------------------------------- YAML


def compose(text: str, path: str, sources: dict[str, str]) -> Node | None:
    """The YAML node tree, or ConfigError (syntax, or nesting over MAX_DEPTH)."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except _TooDeep as e:
        why = f"nested deeper than the limit of {MAX_DEPTH} levels"
        raise ConfigError([Problem(e.path, why, e.line)], path, sources) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        why = getattr(e, "problem", None) or str(e)
        problem = Problem("", f"invalid YAML: {why}", mark.line + 1 if mark else None)
        raise ConfigError([problem], path, sources) from e


class _TooDeep(Exception):
    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses to nest deeper than MAX_DEPTH.

    The composer recurses once per level: unchecked, a few thousand `[` exhaust
    Python's stack (RecursionError). The key path is kept for the message.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.trail: list[str] = []

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if len(self.trail) >= MAX_DEPTH:  # this node would be level MAX_DEPTH + 1
            raise _TooDeep(_trail_path(self.trail), self.peek_event().start_mark.line + 1)
        if isinstance(index, ScalarNode):
            self.trail.append(f".{index.value}")  # a mapping's value: its key
        else:
            self.trail.append(f"[{index}]" if isinstance(index, int) else "")
        try:
            return super().compose_node(parent, index)
        finally:
            self.trail.pop()


def _trail_path(trail: list[str], shown: int = 8) -> str:
    """The key path of a too-deep node: its first `shown` levels, then an ellipsis."""
    text = "".join(trail[:shown]).lstrip(".")
    return text + "…" if len(trail) > shown else text


# -------------------------------------------------------------------------- walker


class Bad(enum.Enum):
    """The type of `BAD`: a parser of T values returns `T | Bad`."""

    BAD = "bad"


BAD: Final = Bad.BAD  # "invalid, and the problem is already recorded"
T = TypeVar("T")
ParserOf = Callable[["Ctx", Node, str], "T | Bad"]  # (ctx, node, key path) -> a T or BAD
Parser = Callable[["Ctx", Node, str], object]  # a parser of any value, as in a key table
NULL_TAG, STR_TAG = "tag:yaml.org,2002:null", "tag:yaml.org,2002:str"


def line_of(node: Node) -> int:
    return node.start_mark.line + 1


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def got(node: Node) -> str:
    """A value as shown in messages: `150`, `'fast'`, `null`, `a list`."""
    if not isinstance(node, ScalarNode):
        return "a mapping" if isinstance(node, MappingNode) else "a list"
    if node.tag == NULL_TAG:
        return "null"
    value = node.value
    if len(value) > _SHOWN:  # a message quotes a value, never a whole runaway line
        return f"{value[:_SHOWN]!r}… ({len(value)} characters)"
    return repr(value) if node.tag == STR_TAG else value


_SHOWN = 80


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def child(node: Node, key: str) -> Node | None:
    """The value node under `key` of a mapping node, if there is one."""
    if isinstance(node, MappingNode):
        for knode, vnode in node.value:
            if isinstance(knode, ScalarNode) and knode.value == key:
                return vnode
    return None


class Ctx:
    """What one parse accumulates: problems, warnings, and what cross-checks need."""

    def __init__(self, base_dir: str, sources: dict[str, str] | None = None) -> None:
        self.base_dir = base_dir
        self.sources = {} if sources is None else sources  # file -> digest of what was read
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []  # `turnout check` prints these
        self.cohort_refs: list[tuple[str, Node, str]] = []  # (path, node, cohort name)
        self.approve_refs: list[tuple[str, Node, str]] = []  # (path, node, role)
        self.secrets: dict[str, str] = {}  # admin token value -> the token's name
        self.environ: Mapping[str, str] = os.environ
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, path: str, node: Node | None, message: str) -> Bad:
        self.problems.append(Problem(path, message, line_of(node) if node is not None else None))
        return BAD

    def warn(self, path: str, node: Node, message: str) -> None:
        self.warnings.append(Problem(path, message, line_of(node)))

    def value(self, node: Node) -> Any:
        """The Python value of a scalar node; BAD for mappings, lists and bad tags."""
        if not isinstance(node, ScalarNode):
            return BAD
        try:
            return self._constructor.construct_object(node)
        except Exception:  # noqa: BLE001 -- YAMLError, or ValueError: 2024-02-30, a 5000-digit int
            return BAD

    def entries(self, node: Node, path: str) -> list[tuple[str, Node, Node]] | None:
        """(key, key node, value node) of a mapping, duplicates dropped; None if no mapping."""
        if not isinstance(node, MappingNode):
            self.error(path, node, f"must be a mapping, got {got(node)}")
            return None
        seen: dict[str, int] = {}
        out: list[tuple[str, Node, Node]] = []
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                self.error(path, knode, f"keys must be strings, got {got(knode)}")
            elif knode.value in seen:
                message = f"duplicate key (first on line {seen[knode.value]})"
                self.error(join(path, knode.value), knode, message)
            else:
                seen[knode.value] = line_of(knode)
                out.append((knode.value, knode, vnode))
        return out


def parse_fields(
    ctx: Ctx, node: Node, path: str, table: Mapping[str, Parser], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Parse a mapping whose keys are those of `table`; return the valid values by key.

    The values' types are the table's parsers' own: the result is keyword arguments.
    """
    entries = ctx.entries(node, path)
    if entries is None:
        return {}
    out: dict[str, Any] = {}
    for key, knode, vnode in entries:
        if key not in table:
            ctx.error(join(path, key), knode, f"unknown key{did_you_mean(key, table)}")
        elif (value := table[key](ctx, vnode, join(path, key))) is not BAD:
            out[key] = value
    present = {key for key, _, _ in entries}
    for key in (key for key in required if key not in present):
        ctx.error(join(path, key), node, "is required")
    return out


def parse_list(
    ctx: Ctx,
    node: Node,
    path: str,
    item: ParserOf[T],
    what: str,
    key: Callable[[T], Hashable] | None = None,
) -> list[T] | Bad:
    """A non-empty list of `item`s (the valid ones); `key(value)` says what must be unique."""
    if not isinstance(node, SequenceNode) or not node.value:
        return ctx.error(path, node, f"must be a non-empty list of {what}, got {got(node)}")
    out: list[T] = []
    first: dict[Hashable, int] = {}
    for i, sub in enumerate(node.value):
        if (value := item(ctx, sub, f"{path}[{i}]")) is BAD:
            continue
        out.append(value)
        if key and (k := key(value)) in first:
            ctx.error(f"{path}[{i}]", sub, f"duplicate {k} (first on line {first[k]})")
        elif key:
            first[k] = line_of(sub)
    return out
