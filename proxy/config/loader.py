"""Loading a config file: `load` and `parse`, the top-level table and the cross-checks.

Rules:
- `load(path)` returns a `Config` or raises `ConfigError` carrying *every* problem
  found, each with its dotted key path and the line it sits on.
- Limits: the config file may hold at most `MAX_CONFIG_BYTES` (4 MiB); beyond that
  the file is rejected with the limit. Nothing a file holds makes `load` raise
  anything but `ConfigError`: an unexpected failure becomes one problem naming it.
- `Config.sources` / `ConfigError.sources` map each file a load read (the
  config, then its cohort files) to its digest (`walker.digest`), also when the
  load fails.
- Every mapping is parsed through a table of key -> parser: `SECTIONS` here for
  the top level, the `*_FIELDS` tables in `parsers` below it.
- What needs more than one section is checked here, once every section is
  parsed (sections may come in any order): `stable` and `canary` name two
  different versions; every cohort a rule or a rollout ring names is in
  `routing.cohorts`, with a sticky key to compare it with; a sticky group left
  out is the canary's name.
- Warnings do not reject the file; `Config.warnings` holds them (`turnout check`
  prints them), in line order. Those found here: `routing.weight` beside a
  `rollout` section (the rollout owns the weight), an `approve` role that no
  configured token holds.
"""

from __future__ import annotations

import os
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from . import parsers, transport
from .model import MAX_CONFIG_BYTES, Admin, Config, Routing
from .values import boolean, file_path, host_port, string
from .walker import (
    BAD,
    Bad,
    ConfigError,
    Ctx,
    Parser,
    ParserOf,
    Problem,
    child,
    compose,
    did_you_mean,
    digest,
    parse_fields,
    read_limited,
    unreadable,
)

# -------------------------------------------------------------------------- entry points


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


# ----------------------------------------------------------------------------- top level


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


def _as(*names: str, parse: Parser) -> ParserOf[dict[str, object]]:
    """A top-level parser: `parse`'s value (a tuple when several) as Config keyword arguments."""

    def section(ctx: Ctx, node: Node, path: str) -> dict[str, object] | Bad:
        value = parse(ctx, node, path)
        values = value if len(names) > 1 and isinstance(value, tuple) else (value,)
        return value if value is BAD else dict(zip(names, values, strict=True))

    return section


# One entry per top-level key. A new section is one parser (in `parsers`) and one
# entry here, plus a Config field with a default, added at the end (in `model`).
SECTIONS: dict[str, Parser] = {  # top-level key -> parser of Config keyword arguments
    "listen": _as("listen_host", "listen_port", parse=host_port),
    "admin": _as("admin", parse=parsers.admin),
    "state_file": _as("state_file", parse=file_path),
    "stable": _as("stable", parse=string),
    "canary": _as("canary", parse=string),
    "versions": _as("versions", parse=parsers.versions),
    "routing": _as("routing", parse=parsers.routing),
    "limits": _as("limits", parse=parsers.limits),
    "expose_version": _as("expose_version", parse=boolean),
    "guard": _as("guard", parse=parsers.guard),
    "rollout": _as("rollout", parse=parsers.rollout),
    "mirror": _as("mirror", parse=parsers.mirror),
    "state": _as("state", parse=parsers.state_backend),
    "access_log": _as("access_log", parse=parsers.access_log),
    "tls": _as("tls", parse=transport.tls),
    "http2": _as("http2", parse=transport.http2),
}
