"""Which version serves a request, and why: a pure decision.

The order is fixed (PRODUCT.md §4):
1. rollback latch → stable (`rollback`)
2. rules, first match wins (`rule:<name>`)
3. the rollout's rings in force, in the order they were entered: a keyed request whose
   key is in a ring's cohort → canary (`ring:<cohort>`)
4. sticky weight by key (`weight`): bucket = murmur3_x86_32("<group>:<key>",
   seed 0, unsigned) % 100 + 1; canary iff bucket <= weight. This is Unleash's
   `normalizedValue`, so the same group and percentage pick the same users.
5. no key: `random` (probability weight%), `stable` (`anonymous`), or `cookie`
   (issue a random `turnout_id` and route by it as a keyed request, `weight`).

`Table` is compiled once per config snapshot; `decide` only reads it.
"""

from __future__ import annotations

import random as _random
import secrets
from collections.abc import Callable
from typing import Final
from urllib.parse import unquote

import mmh3

from .config import Config, Rule
from .headers import request_scanner

COOKIE_NAME: Final = "turnout_id"


def bucket(group: str, key: str) -> int:
    """Unleash's normalizedValue: 1..100."""
    return mmh3.hash(f"{group}:{key}", 0, signed=False) % 100 + 1


class Decision:
    """The outcome of `decide`. Instances are shared; never mutate one."""

    __slots__ = ("version", "reason", "bucket", "set_cookie", "label", "version_header")

    def __init__(
        self, version: str, reason: str, bucket: int | None = None, set_cookie: str | None = None
    ) -> None:
        self.version = version
        self.reason = reason
        self.bucket = bucket
        self.set_cookie = set_cookie  # a newly issued turnout_id, to be sent to the client
        self.label = (version, reason)
        self.version_header = b"X-Turnout-Version: %s\r\n" % version.encode()

    def __repr__(self) -> str:
        return f"Decision({self.version!r}, {self.reason!r}, bucket={self.bucket})"


class RequestView:
    """The parts of a request that routing may read."""

    __slots__ = ("method", "path", "query", "headers", "peer")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], peer: str
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case name -> value; only names the table wants
        self.peer = peer


def parse_cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if not header:
        return out
    for part in header.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out.setdefault(name.strip(), value.strip().strip('"'))
    return out


def query_param(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if sep and unquote(key) == name:
            return unquote(value.replace("+", " "))
    return None


class _CompiledRule:
    __slots__ = ("header", "cookie", "cohort", "path_prefix", "methods", "decision")

    def __init__(self, rule: Rule, version: str, cohorts: dict[str, frozenset[str]]) -> None:
        m = rule.match
        self.header = m.header
        self.cookie = m.cookie
        self.cohort = cohorts.get(m.cohort) if m.cohort is not None else None
        self.path_prefix = m.path_prefix
        self.methods = frozenset(m.method)
        self.decision = Decision(version, f"rule:{rule.name}")

    def matches(self, req: RequestView, key: str | None, cookies: dict[str, str] | None) -> bool:
        if self.methods and req.method not in self.methods:
            return False
        if self.path_prefix is not None and not req.path.startswith(self.path_prefix):
            return False
        headers = req.headers
        for name, value in self.header:
            if headers.get(name) != value:
                return False
        if self.cookie:
            if cookies is None:
                cookies = parse_cookies(headers.get("cookie"))
            for name, value in self.cookie:
                if cookies.get(name) != value:
                    return False
        return self.cohort is None or (key is not None and key in self.cohort)


class Table:
    """Everything `decide` needs, compiled from one config and one runtime state."""

    def __init__(
        self, config: Config, weight: int, latched: bool, rings: tuple[str, ...] = ()
    ) -> None:
        routing = config.routing
        stable, canary = config.stable, config.canary
        self.stable = stable
        self.canary = canary
        self.weight = 0 if latched else weight
        self.latched = latched
        sticky = routing.sticky
        self.key_kind = sticky.kind if sticky else None
        self.key_name = (
            sticky.name.lower()
            if sticky and sticky.kind == "header"
            else (sticky.name if sticky else "")
        )
        self.group = sticky.group if sticky else canary
        self.anonymous = sticky.anonymous if sticky else "random"
        self.rules = tuple(
            _CompiledRule(r, stable if r.to == "stable" else canary, dict(routing.cohorts))
            for r in routing.rules
        )
        # (keys, decision) per ring; a ring whose cohort a reload removed routes no one
        self.rings = tuple(
            (routing.cohorts.get(name, frozenset()), Decision(canary, f"ring:{name}"))
            for name in rings
        )
        self.needs_cookies = any(r.match.cookie for r in routing.rules) or (
            sticky is not None and (sticky.kind == "cookie" or sticky.anonymous == "cookie")
        )
        wanted = {name for r in routing.rules for name, _ in r.match.header}
        if self.key_kind == "header":
            wanted.add(self.key_name)
        if self.needs_cookies:
            wanted.add("cookie")
        self.scanner = request_scanner(w.encode("latin-1") for w in wanted)
        self.rollback = Decision(stable, "rollback")
        self.random_decisions = (Decision(stable, "random"), Decision(canary, "random"))
        self.anonymous_decision = Decision(stable, "anonymous")
        # bucket -> shared Decision; index 0 unused
        self.by_bucket = tuple(
            Decision(canary if b <= self.weight else stable, "weight", b) for b in range(101)
        )
        self.labels = self._labels()
        # The common table: no rules, keyed by a header. Then a request with the
        # key needs nothing but the bucket (see `quick`).
        self.plain = not self.rules and not self.rings and self.key_kind == "header" and not latched

    def _labels(self) -> tuple[tuple[str, str], ...]:
        """Every (version, reason) pair this table can produce: metric label values."""
        seen = {self.rollback.label, self.anonymous_decision.label}
        seen.update(d.label for d in self.random_decisions)
        seen.update(d.label for d in self.by_bucket[1:])
        seen.update(r.decision.label for r in self.rules)
        seen.update(decision.label for _, decision in self.rings)
        return tuple(sorted(seen))

    def quick(self, headers: dict[str, str]) -> Decision | None:
        """`decide` for a plain table and a request carrying its key; else None."""
        if self.plain:
            key = headers.get(self.key_name)
            if key:
                return self.by_bucket[bucket(self.group, key)]
        return None

    def sticky_key(self, req: RequestView, cookies: dict[str, str] | None) -> str | None:
        kind = self.key_kind
        if kind == "header":
            return req.headers.get(self.key_name) or None
        if kind == "cookie":
            return (cookies or {}).get(self.key_name) or None
        if kind == "query":
            return query_param(req.query, self.key_name) if req.query else None
        if kind == "ip":
            return req.peer
        return None


def decide(req: RequestView, table: Table, rand: Callable[[], float] = _random.random) -> Decision:
    """The version for `req` under `table`, with the reason (see module docstring)."""
    if table.latched:
        return table.rollback
    cookies = parse_cookies(req.headers.get("cookie")) if table.needs_cookies else None
    key = table.sticky_key(req, cookies)
    if key is None and table.anonymous == "cookie" and cookies is not None:
        key = cookies.get(COOKIE_NAME) or None
    for rule in table.rules:
        if rule.matches(req, key, cookies):
            return rule.decision
    if key is not None:
        for keys, ring in table.rings:
            if key in keys:
                return ring
        return table.by_bucket[bucket(table.group, key)]
    if table.anonymous == "stable":
        return table.anonymous_decision
    if table.anonymous == "cookie":
        issued = secrets.token_hex(16)
        b = bucket(table.group, issued)
        return Decision(table.canary if b <= table.weight else table.stable, "weight", b, issued)
    return table.random_decisions[rand() * 100 < table.weight]
