"""The config file: YAML in, frozen dataclasses out.

The dataclasses are in `model`; the YAML walking, the problems and the limits on
the file in `walker` (unknown keys are errors there: a typo must never pass
silently).

Rules:
- `load(path)` returns a `Config` or raises `ConfigError` carrying *every* problem
  found, each with its dotted key path and the line it sits on.
- Durations are seconds (float) once loaded; sizes are bytes (int).
- Relative paths (`state_file`, cohort `file`) are resolved against the config
  file's folder.
- Nothing here does network I/O; reading cohort files is the only file I/O
  besides the config itself.
- Limits: the config file may hold at most `MAX_CONFIG_BYTES` (4 MiB), a
  cohort file at most `MAX_COHORT_BYTES` (64 MiB), and YAML may nest at most
  `MAX_DEPTH` (64) levels; beyond that the file is rejected with the limit, the
  key path and the line. Nothing a file holds makes `load` raise anything but
  `ConfigError`: an unexpected failure becomes one problem naming it.
- `Config.sources` / `ConfigError.sources` map each file a load read (the
  config, then its cohort files) to the SHA-256 of the exact bytes parsed (or
  to why it could not be read), so a reloader can tell what it has seen
  without reading the files a second time.
- Every mapping is parsed through a table of key -> parser (`SECTIONS` and the
  `*_FIELDS` tables at the bottom): a new section is one parser and one entry.
- Warnings do not reject the file; `Config.warnings` holds them (`turnout check`
  prints them): an admin token whose environment variable is unset (the token
  is disabled), `routing.weight` beside a `rollout` section (the rollout owns
  the weight), an `approve` role that no configured token holds.
- Admin tokens come from environment variables named in the file (read at load
  time), never from the file itself; "viewer" is implied for every token.
- `guard:` becomes a `proxy.guard.Policy`; `rollout:` a `RolloutConfig` whose
  step weights never decrease; `mirror:` a `Mirror` (with a `Compare` when
  `compare:` is present, even as `{}`). Each is None when its section is absent.
- Mirror warnings: `percent: 0` (the section mirrors nothing), and a name in
  `compare.headers` that is never compared (hop-by-hop, framing, X-Turnout-*) or
  that `compare.ignore_headers` also lists.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..guard import Policy
from .model import (
    COMPARED_BY_DEFAULT,
    MAX_COHORT_BYTES,
    MAX_CONFIG_BYTES,
    NEVER_COMPARED,
    NEVER_COMPARED_PREFIX,
    VIEWER,
    Admin,
    Compare,
    Config,
    Endpoint,
    Limits,
    Match,
    Mirror,
    RolloutConfig,
    Routing,
    Rule,
    Step,
    Sticky,
    Token,
    Version,
)
from .walker import (
    BAD,
    MAX_DEPTH,
    NULL_TAG,
    ConfigError,
    Ctx,
    Parser,
    Problem,
    child,
    compose,
    did_you_mean,
    digest,
    file_digest,
    got,
    join,
    parse_fields,
    parse_list,
    read_limited,
    render_problems,
    unreadable,
)

__all__ = [  # the public API; everything else in the package is its own business
    "COMPARED_BY_DEFAULT",
    "MAX_COHORT_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "NEVER_COMPARED",
    "NEVER_COMPARED_PREFIX",
    "SECTIONS",
    "VIEWER",
    "Admin",
    "Compare",
    "Config",
    "ConfigError",
    "Endpoint",
    "Limits",
    "Match",
    "Mirror",
    "Problem",
    "RolloutConfig",
    "Routing",
    "Rule",
    "Step",
    "Sticky",
    "Token",
    "Version",
    "digest",
    "file_digest",
    "load",
    "parse",
    "render_problems",
]

# ----------------------------------------------------------------------- entry points


def load(path: str) -> Config:
    """Read and validate the config file at `path`; never raises anything but ConfigError."""
    sources: dict[str, str] = {}
    try:
        return _load(path, sources)
    except ConfigError as err:
        err.sources = err.sources or sources
        raise
    except Exception as e:  # noqa: BLE001 -- a bad file is a reported error, never a crash
        why = f"cannot load the config ({type(e).__name__}: {e})"
        raise ConfigError([Problem("", why)], os.path.abspath(path), sources) from e


def _load(path: str, sources: dict[str, str]) -> Config:
    path = os.path.abspath(path)
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except (OSError, ValueError) as e:
        sources[path] = unreadable(e)
        why = e.strerror if isinstance(e, OSError) else e
        raise ConfigError([Problem("", f"cannot read config file {path}: {why}")], path) from e
    sources[path] = digest(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = Problem("", f"cannot read config file {path}: not UTF-8 text")
        raise ConfigError([problem], path) from e
    return parse(text, path, sources)


def parse(text: str, path: str, sources: dict[str, str] | None = None) -> Config:
    """Validate YAML `text` as read from `path` (relative paths resolve next to it).

    `sources` collects the digests of the cohort files read (see Config.sources).
    """
    path = os.path.abspath(path)
    sources = {} if sources is None else sources
    root = compose(text, path, sources)
    if root is None:
        empty = Problem("", "the file is empty: versions, stable and canary are required")
        raise ConfigError([empty], path, sources)
    ctx = Ctx(os.path.dirname(path), sources)
    kw = _config(ctx, root)
    if ctx.problems:
        raise ConfigError(sorted(ctx.problems, key=lambda p: p.line or 0), path, sources)
    warnings = tuple(str(w) for w in sorted(ctx.warnings, key=lambda w: w.line or 0))
    return Config(path=path, warnings=warnings, sources=MappingProxyType(sources), **kw)


# ------------------------------------------------------------------------- names

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names, methods
_VERSION_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")  # rules and cohorts


# ---------------------------------------------------------------- scalar parsers


def _text(ctx: Ctx, node: Node, path: str, empty: bool = False) -> Any:
    """A string as written; plain numbers and booleans count (`release: 2.10` is '2.10')."""
    if not isinstance(node, ScalarNode) or node.tag == NULL_TAG:
        return ctx.error(path, node, f"must be a string, got {got(node)}")
    if not node.value and not empty:
        return ctx.error(path, node, "must not be empty")
    return node.value


def _named(pattern: re.Pattern[str], what: str) -> Parser:
    def parse(ctx: Ctx, node: Node, path: str) -> Any:
        text = _text(ctx, node, path)
        if text is not BAD and not pattern.fullmatch(text):
            return ctx.error(path, node, f"must be {what} ({pattern.pattern}), got {got(node)}")
        return text

    return parse


def _choice(*options: str) -> Parser:
    shown = ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"

    def parse(ctx: Ctx, node: Node, path: str) -> Any:
        if ctx.value(node) not in options:
            return ctx.error(path, node, f"must be {shown}, got {got(node)}")
        return node.value

    return parse


def _bool(ctx: Ctx, node: Node, path: str) -> Any:
    if not isinstance(value := ctx.value(node), bool):
        return ctx.error(path, node, f"must be true or false, got {got(node)}")
    return value


def _path(ctx: Ctx, node: Node, path: str) -> Any:
    text = _text(ctx, node, path)
    return text if text is BAD else os.path.normpath(os.path.join(ctx.base_dir, text))


_HOSTPORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]/]*)):(\d{1,5})")


def _hostport(ctx: Ctx, node: Node, path: str) -> Any:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' (all interfaces) -> (host, port)."""
    text = _text(ctx, node, path)
    if text is BAD:
        return BAD
    m = _HOSTPORT.fullmatch(text)
    if not m or int(m[3]) > 65535:
        like = "HOST:PORT like 127.0.0.1:8080, [::1]:8080 or :8080"
        return ctx.error(path, node, f"must be {like}, got {got(node)}")
    return (m[1] or m[2] or "0.0.0.0", int(m[3]))


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _duration(ctx: Ctx, node: Node, path: str) -> Any:
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


def _size(low: int, high: int, bounds: str) -> Parser:
    """Bytes: an integer, or a number with B, KiB, MiB or GiB (binary units only)."""

    def parse(ctx: Ctx, node: Node, path: str) -> Any:
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


# ----------------------------------------------------------------------- top level


def _config(ctx: Ctx, root: Node) -> dict[str, Any]:
    """Config keyword arguments from the document's root node."""
    kw: dict[str, Any] = {"state_file": os.path.join(ctx.base_dir, "turnout-state.json")}
    for part in parse_fields(ctx, root, "", SECTIONS, ("versions", "stable", "canary")).values():
        kw.update(part)
    versions, stable, canary = kw.get("versions"), kw.get("stable"), kw.get("canary")
    for role, name in (("stable", stable), ("canary", canary)):
        if name is not None and versions is not None and name not in versions:
            hint = did_you_mean(name, versions)
            ctx.error(role, child(root, role), f"no version named {name!r} in versions{hint}")
    if stable is not None and stable == canary:
        ctx.error("canary", child(root, "canary"), f"must differ from stable ({stable!r})")
    sticky = kw.get("routing", Routing()).sticky
    if sticky is not None and not sticky.group and canary is not None:
        kw["routing"] = replace(kw["routing"], sticky=replace(sticky, group=canary))
    _check_cohort_refs(ctx, root)
    _check_rollout(ctx, root, kw.get("admin", Admin()))
    return kw


def _check_cohort_refs(ctx: Ctx, root: Node) -> None:
    """Every cohort a rule or a rollout ring names must be in routing.cohorts, and a
    sticky key must exist to compare it with (sections may come in any order)."""
    routing = child(root, "routing")
    listed = child(routing, "cohorts") if routing is not None else None
    keys = listed.value if isinstance(listed, MappingNode) else []
    names = {k.value for k, _ in keys if isinstance(k, ScalarNode)}
    for ref_path, ref_node, name in ctx.cohort_refs:
        if name not in names:
            hint = did_you_mean(name, names)
            ctx.error(ref_path, ref_node, f"no cohort named {name!r} in routing.cohorts{hint}")
        elif routing is None or child(routing, "sticky") is None:
            why = "cohorts are compared with the sticky key"
            ctx.error(ref_path, ref_node, f"needs routing.sticky.key ({why})")


def _check_rollout(ctx: Ctx, root: Node, admin: Admin) -> None:
    """Warn about what a rollout section makes pointless or unreachable."""
    if child(root, "rollout") is None:
        return
    routing = child(root, "routing")
    if routing is not None and (weight := child(routing, "weight")) is not None:
        ctx.warn("routing.weight", weight, "ignored because rollout owns the weight")
    held = {role for token in admin.tokens for role in token.roles}
    for path, node, role in ctx.approve_refs if admin.tokens else ():
        if role not in held:
            why = f"no token in admin.tokens holds role {role!r}, so no one can approve this step"
            ctx.warn(path, node, why)


def _as(*names: str, parse: Parser) -> Parser:
    """A top-level parser: `parse`'s value (a tuple when several) as Config keyword arguments."""

    def section(ctx: Ctx, node: Node, path: str) -> Any:
        value = parse(ctx, node, path)
        values = value if len(names) > 1 else (value,)
        return value if value is BAD else dict(zip(names, values, strict=True))

    return section


def _admin(ctx: Ctx, node: Node, path: str) -> Admin:
    fields = parse_fields(ctx, node, path, ADMIN_FIELDS)
    tokens = tuple(fields.get("tokens", ()))
    if "listen" not in fields:
        return Admin(tokens=tokens)
    host, port = fields["listen"]
    return Admin(host, port, tokens)


def _limits(ctx: Ctx, node: Node, path: str) -> Limits:
    return Limits(**parse_fields(ctx, node, path, LIMITS_FIELDS))


def _versions(ctx: Ctx, node: Node, path: str) -> Any:
    out: dict[str, Version] = {}
    for name, knode, vnode in ctx.entries(node, path) or ():
        sub = join(path, name)
        if not _VERSION_NAME.fullmatch(name):
            ctx.error(sub, knode, f"version names must match {_VERSION_NAME.pattern}")
        fields = parse_fields(ctx, vnode, sub, VERSION_FIELDS, ("endpoints",))
        out[name] = Version(name, tuple(fields.get("endpoints", ())), fields.get("release"))
    if isinstance(node, MappingNode) and not node.value:
        ctx.error(path, node, "must name at least one version")
    return MappingProxyType(out)


def _endpoints(ctx: Ctx, node: Node, path: str) -> Any:
    what = "http://HOST:PORT URLs"
    return parse_list(ctx, node, path, _endpoint, what, lambda e: f"endpoint {e.key}")


def _endpoint(ctx: Ctx, node: Node, path: str) -> Any:
    url = _text(ctx, node, path)
    if url is BAD:
        return BAD
    hostport = _split_url(url)
    if isinstance(hostport, str):
        like = "a URL like http://127.0.0.1:9001"
        return ctx.error(path, node, f"must be {like}, got {url!r} ({hostport})")
    return Endpoint(url, *hostport)


def _split_url(url: str) -> tuple[str, int] | str:
    """(host, port) of an upstream URL, or why it is not one."""
    if "://" not in url:
        return "the http:// scheme is missing"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return str(e)
    if parts.scheme != "http":
        return f"only http is supported, not {parts.scheme}"
    if parts.username is not None or parts.password is not None:
        return "user info is not allowed"
    if not parts.hostname:
        return "the host is missing"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "a path, query or fragment is not allowed"
    return (parts.hostname, port or 80) if port != 0 else "port 0 is not a valid port"


# ------------------------------------------------------------------------- routing


def _routing(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, ROUTING_FIELDS)
    cohorts, files = fields.get("cohorts", ({}, ()))
    rules, sticky = tuple(fields.get("rules", ())), fields.get("sticky")
    cohort_map = MappingProxyType(cohorts)
    return Routing(fields.get("weight", 0), sticky, rules, cohort_map, files)


def _weight(ctx: Ctx, node: Node, path: str) -> Any:
    if type(value := ctx.value(node)) is not int or not 0 <= value <= 100:
        return ctx.error(path, node, f"must be an integer 0..100, got {got(node)}")
    return value


def _sticky(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, STICKY_FIELDS, ("key",))
    if "key" not in fields:
        return BAD
    group, anonymous = fields.get("group", ""), fields.get("anonymous", "random")
    kind, name = fields["key"]
    return Sticky(kind, name, group, anonymous)  # group "" = the canary's name


_QUERY_NAME = re.compile(r"[^\s&=#]+")


def _sticky_key(ctx: Ctx, node: Node, path: str) -> Any:
    """'header:NAME' | 'cookie:NAME' | 'query:NAME' | 'ip' -> (kind, name)."""
    if (text := _text(ctx, node, path)) is BAD:
        return BAD
    kind, _, name = text.partition(":")
    if text == "ip":
        return ("ip", "")
    if (_QUERY_NAME if kind == "query" else _TOKEN).fullmatch(name) and kind in STICKY_KINDS:
        return (kind, name)
    like = "header:NAME, cookie:NAME, query:NAME or ip"
    return ctx.error(path, node, f"must be {like}, got {got(node)}")


def _rules(ctx: Ctx, node: Node, path: str) -> Any:
    return parse_list(ctx, node, path, _rule, "rules", lambda r: f"rule name {r.name!r}")


def _rule(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, RULE_FIELDS, ("name", "match", "to"))
    return Rule(**fields) if len(fields) == 3 else BAD


def _match(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, MATCH_FIELDS)
    if isinstance(node, MappingNode) and not any(child(node, k) for k in MATCH_FIELDS):
        conditions = ", ".join(MATCH_FIELDS)
        return ctx.error(path, node, f"must have at least one condition ({conditions})")
    return Match(**fields)


def _pairs(lower: bool) -> Parser:
    """A mapping of header or cookie names to exact values -> ((name, value), ...)."""

    def parse(ctx: Ctx, node: Node, path: str) -> Any:
        out = []
        for name, knode, vnode in ctx.entries(node, path) or ():
            if not _TOKEN.fullmatch(name):
                ctx.error(join(path, name), knode, f"names must match {_TOKEN.pattern}")
            elif (value := _text(ctx, vnode, join(path, name), empty=True)) is not BAD:
                out.append((name.lower() if lower else name, value))
        if isinstance(node, MappingNode) and not node.value:
            return ctx.error(path, node, "must name at least one")
        return tuple(out)

    return parse


def _cohort_ref(ctx: Ctx, node: Node, path: str) -> Any:
    if (name := _text(ctx, node, path)) is not BAD:
        ctx.cohort_refs.append((path, node, name))  # checked by _routing, once cohorts are known
    return name


def _path_prefix(ctx: Ctx, node: Node, path: str) -> Any:
    prefix = _text(ctx, node, path)
    if prefix is not BAD and not prefix.startswith("/"):
        return ctx.error(path, node, f"must start with '/', got {got(node)}")
    return prefix


def _methods(ctx: Ctx, node: Node, path: str) -> Any:
    """'POST' or [GET, HEAD] -> ('POST',) / ('GET', 'HEAD')."""
    if isinstance(node, SequenceNode):
        found = parse_list(ctx, node, path, _method, "HTTP methods")
    else:
        found = [_method(ctx, node, path)]
    return BAD if found is BAD or BAD in found else tuple(m.upper() for m in found)


_method = _named(_TOKEN, "an HTTP method")


def _cohorts(ctx: Ctx, node: Node, path: str) -> Any:
    """name -> {keys, file} -> ({name: frozenset(keys)}, (absolute file, ...))."""
    cohorts: dict[str, frozenset[str]] = {}
    files: list[str] = []
    for name, knode, vnode in ctx.entries(node, path) or ():
        sub = join(path, name)
        if not _RULE_NAME.fullmatch(name):
            ctx.error(sub, knode, f"cohort names must match {_RULE_NAME.pattern}")
        fields = parse_fields(ctx, vnode, sub, COHORT_FIELDS)
        if isinstance(vnode, MappingNode) and not (child(vnode, "keys") or child(vnode, "file")):
            ctx.error(sub, vnode, "must have keys, file or both")
        file, file_keys = fields.get("file", (None, ()))
        files += [file] if file else []
        cohorts[name] = frozenset([*fields.get("keys", ()), *file_keys])
    return cohorts, tuple(files)


def _cohort_keys(ctx: Ctx, node: Node, path: str) -> Any:
    if isinstance(node, SequenceNode) and not node.value:
        return []  # an empty inline list is fine: the file may hold the keys
    return parse_list(ctx, node, path, _text, "keys")


def _cohort_file(ctx: Ctx, node: Node, path: str) -> Any:
    """(absolute path, keys): one key a line; blank lines and '#' lines are skipped."""
    if (resolved := _path(ctx, node, path)) is BAD:
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


# ------------------------------------------------------------------- admin tokens

_ROLE = re.compile(r"[a-z][a-z0-9_-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _tokens(ctx: Ctx, node: Node, path: str) -> Any:
    """A list of {name, token_env, roles}; names unique, secrets distinct."""
    return parse_list(ctx, node, path, _token, "tokens", lambda t: f"token name {t.name!r}")


def _token(ctx: Ctx, node: Node, path: str) -> Any:
    """One token; its secret is read from the environment now (unset: disabled, a warning)."""
    fields = parse_fields(ctx, node, path, TOKEN_FIELDS, ("name", "token_env"))
    if "name" not in fields or "token_env" not in fields:
        return BAD
    name, env = fields["name"], fields["token_env"]
    env_node, env_path = child(node, "token_env") or node, join(path, "token_env")
    value = ctx.environ.get(env) or None
    if value is None:
        why = f"environment variable {env} is not set; token {name!r} is disabled"
        ctx.warn(env_path, env_node, why)
    elif value in ctx.secrets:  # never show the secret itself
        why = f"{env} holds the same token as {ctx.secrets[value]!r}; every token must differ"
        return ctx.error(env_path, env_node, why)
    else:
        ctx.secrets[value] = name
    return Token(name, env, frozenset({VIEWER, *fields.get("roles", ())}), value)


def _roles(ctx: Ctx, node: Node, path: str) -> Any:
    if isinstance(node, SequenceNode) and not node.value:
        return []  # no role beyond viewer
    return parse_list(ctx, node, path, _role, "role names")


_role = _named(_ROLE, "a role name")


# -------------------------------------------------------------------------- guard


def _guard(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, GUARD_FIELDS)
    try:
        return Policy(**fields)
    except (TypeError, ValueError) as e:  # the table's checks should have caught it
        return ctx.error(path, node, f"invalid guard policy: {e}")


def _int_at_least(low: int) -> Parser:
    def parse(ctx: Ctx, node: Node, path: str) -> Any:
        if type(value := ctx.value(node)) is not int or value < low:
            return ctx.error(path, node, f"must be an integer >= {low}, got {got(node)}")
        return value

    return parse


def _number(ctx: Ctx, node: Node, path: str) -> Any:
    value = ctx.value(node)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return BAD
    return float(value)


def _rate(ctx: Ctx, node: Node, path: str) -> Any:
    """A fraction strictly between 0 and 1 (0.02 is 2%)."""
    if (value := _number(ctx, node, path)) is BAD or not 0 < value < 1:
        return ctx.error(
            path, node, f"must be a number between 0 and 1 (exclusive), got {got(node)}"
        )
    return value


def _positive(ctx: Ctx, node: Node, path: str) -> Any:
    if (value := _number(ctx, node, path)) is BAD or not 0 < value < float("inf"):
        return ctx.error(path, node, f"must be a number greater than 0, got {got(node)}")
    return value


def _webhook(ctx: Ctx, node: Node, path: str) -> Any:
    """An http:// or https:// URL with a host (a path and query are fine)."""
    if (url := _text(ctx, node, path)) is BAD:
        return BAD
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as e:
        return ctx.error(path, node, f"must be an http:// or https:// URL, got {url!r} ({e})")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ctx.error(path, node, f"must be an http:// or https:// URL with a host, got {url!r}")
    return url


# ------------------------------------------------------------------------ rollout


def _rollout(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, ROLLOUT_FIELDS, ("steps",))
    if "steps" not in fields:
        return BAD
    return RolloutConfig(tuple(fields["steps"]), fields.get("interval", 60.0))


def _steps(ctx: Ctx, node: Node, path: str) -> Any:
    """A non-empty list of weights or {weight, approve, interval, cohorts}; weights never
    decrease. A ring step (cohorts) without a weight keeps the previous step's."""
    like = "steps (a weight 0..100 or {weight, approve, interval, cohorts})"
    if not isinstance(node, SequenceNode) or not node.value:
        return ctx.error(path, node, f"must be a non-empty list of {like}, got {got(node)}")
    steps, previous, bad = [], None, False
    for i, sub in enumerate(node.value):
        if (step := _step(ctx, sub, f"{path}[{i}]")) is BAD:
            bad = True
            continue
        if step.weight == _PREVIOUS_WEIGHT:
            step = replace(step, weight=previous or 0)
        if previous is not None and step.weight < previous:
            where = child(sub, "weight") or sub
            message = (
                f"must not be below the previous step's weight ({previous}), got {step.weight}"
            )
            ctx.error(f"{path}[{i}]" + (".weight" if where is not sub else ""), where, message)
            bad = True
        previous = step.weight
        steps.append(step)
    return BAD if bad else steps


def _step(ctx: Ctx, node: Node, path: str) -> Any:
    if not isinstance(node, MappingNode):
        weight = _weight(ctx, node, path)
        return weight if weight is BAD else Step(weight)
    has_cohorts = child(node, "cohorts") is not None
    fields = parse_fields(ctx, node, path, STEP_FIELDS, () if has_cohorts else ("weight",))
    if not ("weight" in fields or has_cohorts) or len(fields) < len(node.value):
        return BAD
    if "cohorts" in fields:
        fields["cohorts"] = tuple(fields["cohorts"])
    return Step(**{"weight": _PREVIOUS_WEIGHT, **fields})


_PREVIOUS_WEIGHT = -1  # a ring step without a weight: _steps puts the previous step's


def _ring(ctx: Ctx, node: Node, path: str) -> Any:
    return parse_list(ctx, node, path, _cohort_ref, "cohort names", key=lambda name: name)


def _approve(ctx: Ctx, node: Node, path: str) -> Any:
    if (role := _role(ctx, node, path)) is not BAD:
        ctx.approve_refs.append((path, node, role))  # checked against admin.tokens later
    return role


# ------------------------------------------------------------------------- mirror


def _mirror(ctx: Ctx, node: Node, path: str) -> Any:
    fields = parse_fields(ctx, node, path, MIRROR_FIELDS)
    if fields.get("percent") == 0:
        where = child(node, "percent") or node
        ctx.warn(join(path, "percent"), where, "is 0, so nothing is mirrored")
    if "methods" in fields:
        fields["methods"] = frozenset(fields["methods"])
    return Mirror(**fields)


def _compare(ctx: Ctx, node: Node, path: str) -> Any:
    """`{}` is a comparison with the defaults; see COMPARED_BY_DEFAULT for the headers."""
    fields = parse_fields(ctx, node, path, COMPARE_FIELDS)
    listed, ignored = child(node, "headers"), fields.get("ignore_headers", frozenset())
    for i, name in enumerate(fields.get("headers", ())):
        sub, where = f"{path}.headers[{i}]", listed.value[i] if listed is not None else node
        if name in NEVER_COMPARED or name.startswith(NEVER_COMPARED_PREFIX):
            ctx.warn(sub, where, f"{name} is never compared (hop-by-hop, framing or Turnout's own)")
        elif name in ignored:
            ctx.warn(sub, where, f"{name} is also in ignore_headers, so it is not compared")
    if "headers" in fields:
        fields["headers"] = tuple(dict.fromkeys(fields["headers"]))  # in order, once each
    return Compare(**fields)


def _header_names(ctx: Ctx, node: Node, path: str) -> Any:
    """A non-empty list of header names -> lower-case names (duplicates kept)."""
    if isinstance(node, SequenceNode) and not node.value:
        default = ", ".join(COMPARED_BY_DEFAULT)
        why = f"must list at least one header name (leave the key out to compare {default})"
        return ctx.error(path, node, why)
    found = parse_list(ctx, node, path, _header_name, "header names")
    return found if found is BAD else [name.lower() for name in found]


def _ignore_headers(ctx: Ctx, node: Node, path: str) -> Any:
    if isinstance(node, SequenceNode) and not node.value:
        return frozenset()  # nothing ignored
    found = _header_names(ctx, node, path)
    return found if found is BAD else frozenset(found)


_header_name = _named(_TOKEN, "a header name")
_JSON_SEGMENT = r"(?:[A-Za-z0-9_$-]+|\*)"
_JSON_PATH = re.compile(rf"{_JSON_SEGMENT}(?:\.{_JSON_SEGMENT})*")


def _json_paths(ctx: Ctx, node: Node, path: str) -> Any:
    """Dotted paths into a JSON body; `*` is any key or array element ('items.*.id')."""
    if isinstance(node, SequenceNode) and not node.value:
        return ()  # nothing ignored
    found = parse_list(ctx, node, path, _json_path, "dotted JSON paths")
    return found if found is BAD else tuple(dict.fromkeys(found))


def _json_path(ctx: Ctx, node: Node, path: str) -> Any:
    text = _text(ctx, node, path)
    if text is not BAD and not _JSON_PATH.fullmatch(text):
        what = "a dotted path of field names ([A-Za-z0-9_$-]+) or * (any key or element)"
        return ctx.error(path, node, f"must be {what}, like meta.request_id, got {got(node)}")
    return text


# -------------------------------------------------------------------------- tables
# One entry per key. A new section (e.g. mirror) is one parser and one entry here,
# plus a Config field with a default, added at the end.

SECTIONS: dict[str, Parser] = {  # top-level key -> parser of Config keyword arguments
    "listen": _as("listen_host", "listen_port", parse=_hostport),
    "admin": _as("admin", parse=_admin),
    "state_file": _as("state_file", parse=_path),
    "stable": _as("stable", parse=_text),
    "canary": _as("canary", parse=_text),
    "versions": _as("versions", parse=_versions),
    "routing": _as("routing", parse=_routing),
    "limits": _as("limits", parse=_limits),
    "expose_version": _as("expose_version", parse=_bool),
    "guard": _as("guard", parse=_guard),
    "rollout": _as("rollout", parse=_rollout),
    "mirror": _as("mirror", parse=_mirror),
}
ADMIN_FIELDS: dict[str, Parser] = {"listen": _hostport, "tokens": _tokens}
TOKEN_FIELDS: dict[str, Parser] = {
    "name": _named(_RULE_NAME, "a token name"),
    "token_env": _named(_ENV_NAME, "an environment variable name"),
    "roles": _roles,
}
GUARD_FIELDS: dict[str, Parser] = {
    "window": _duration,
    "min_requests": _int_at_least(1),
    "max_error_rate": _rate,
    "max_p99_ms": _positive,
    "relative_to_stable": _bool,
    "on_breach": _choice("rollback", "pause", "alert"),
    "webhook": _webhook,
}
ROLLOUT_FIELDS: dict[str, Parser] = {"interval": _duration, "steps": _steps}
STEP_FIELDS: dict[str, Parser] = {
    "weight": _weight,
    "approve": _approve,
    "interval": _duration,
    "cohorts": _ring,
}
MIRROR_FIELDS: dict[str, Parser] = {
    "percent": _weight,
    "methods": _methods,
    "max_in_flight": _int_at_least(1),
    "max_body_bytes": _size(0, 1 << 62, "0 or more"),
    "timeout": _duration,
    "compare": _compare,
}
COMPARE_FIELDS: dict[str, Parser] = {
    "ignore_headers": _ignore_headers,
    "headers": _header_names,
    "ignore_json_fields": _json_paths,
    # both sides are held in memory up to this while a shadow copy is in flight
    "max_body_bytes": _size(0, 64 << 20, "between 0 and 64MiB (67108864) bytes"),
}
VERSION_FIELDS: dict[str, Parser] = {"endpoints": _endpoints, "release": _text}
ROUTING_FIELDS: dict[str, Parser] = {
    "weight": _weight,
    "sticky": _sticky,
    "rules": _rules,
    "cohorts": _cohorts,
}
STICKY_KINDS = ("header", "cookie", "query")  # plus "ip", which has no name
STICKY_FIELDS: dict[str, Parser] = {
    "key": _sticky_key,
    "group": _text,
    "anonymous": _choice("random", "stable", "cookie"),
}
RULE_FIELDS: dict[str, Parser] = {
    "name": _named(_RULE_NAME, "a rule name"),
    "match": _match,
    "to": _choice("stable", "canary"),
}
MATCH_FIELDS: dict[str, Parser] = {
    "header": _pairs(lower=True),
    "cookie": _pairs(lower=False),
    "cohort": _cohort_ref,
    "path_prefix": _path_prefix,
    "method": _methods,
}
COHORT_FIELDS: dict[str, Parser] = {"keys": _cohort_keys, "file": _cohort_file}
LIMITS_FIELDS: dict[str, Parser] = {
    "connect_timeout": _duration,
    "response_timeout": _duration,
    "idle_timeout": _duration,
    "drain_timeout": _duration,
    "client_header_timeout": _duration,
    "client_body_timeout": _duration,
    "send_timeout": _duration,
    "max_connections": _size(1, 1 << 20, "between 1 and 1048576"),
    "max_header_bytes": _size(1024, 1 << 20, "between 1KiB (1024) and 1MiB (1048576) bytes"),
    "max_body_bytes": _size(1, 1 << 62, "greater than 0"),
}
