"""The section parsers: one per mapping of the schema, each with its table of key -> parser.

Rules:
- Every mapping is parsed through a table of key -> parser (the `*_FIELDS` tables
  at the bottom, walked by `walker.parse_fields`): a new key is one entry, a new
  section is one parser here and one entry in `loader.SECTIONS`.
- Unknown keys are errors, and so are missing required ones (each parser passes
  its own to `parse_fields`, e.g. a version's `endpoints`).
- Admin tokens come from environment variables named in the file (read at load
  time), never from the file itself; "viewer" is implied for every token. A token
  whose environment variable is unset is disabled, with a warning; two tokens
  holding the same secret are an error that never shows the secret.
- `guard:` becomes a `proxy.guard.Policy`; `rollout:` a `RolloutConfig` whose
  step weights never decrease; `mirror:` a `Mirror` (with a `Compare` when
  `compare:` is present, even as `{}`).
- Mirror warnings: `percent: 0` (the section mirrors nothing), and a name in
  `compare.headers` that is never compared (hop-by-hop, framing, X-Turnout-*) or
  that `compare.ignore_headers` also lists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from yaml.nodes import MappingNode, Node, SequenceNode

from ..guard import EXPORTED_MS, FleetCounts, Policy
from . import transport
from .model import (
    DEFAULT_UPSTREAM_TLS,
    NEVER_COMPARED,
    NEVER_COMPARED_PREFIX,
    VIEWER,
    AccessLogConfig,
    Admin,
    Compare,
    Limits,
    Match,
    Mirror,
    RolloutConfig,
    Routing,
    Rule,
    StateBackend,
    Step,
    Sticky,
    Token,
    Version,
)
from .values import (
    approve_role,
    boolean,
    choice,
    cohort_file,
    cohort_keys,
    cohort_ref,
    duration,
    endpoints,
    file_path,
    header_names,
    host_port,
    http_url,
    ignored_headers,
    int_at_least,
    json_paths,
    methods,
    named,
    pairs,
    path_prefix,
    percent,
    positive,
    rate,
    ring_cohorts,
    role_names,
    size,
    sticky_key,
    string,
)
from .walker import BAD, Bad, Ctx, Parser, child, got, join, parse_fields, parse_list

_VERSION_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")  # rules and cohorts
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------------------ sections


def admin(ctx: Ctx, node: Node, path: str) -> Admin:
    fields = parse_fields(ctx, node, path, ADMIN_FIELDS)
    tokens = tuple(fields.get("tokens", ()))
    if "listen" not in fields:
        return Admin(tokens=tokens)
    host, port = fields["listen"]
    return Admin(host, port, tokens)


def state_backend(ctx: Ctx, node: Node, path: str) -> StateBackend:
    fields = parse_fields(ctx, node, path, STATE_FIELDS)
    shared = fields.get("redis", {})
    if "redis" in fields and fields.get("backend") != "redis":
        ctx.warn(
            join(path, "redis"), child(node, "redis") or node, "is unused unless backend is redis"
        )
    if fields.get("backend") == "redis" and child(node, "redis") is None:
        default = StateBackend()
        ctx.warn(join(path, "redis"), node, f"absent: using {default.redis_url} with "
                 f"key_prefix {default.key_prefix!r}")  # fmt: skip
    lease = shared.get("lease")
    if lease is not None and lease < MIN_LEASE:
        where = child(child(node, "redis") or node, "lease") or node
        ctx.error(join(path, "redis.lease"), where, f"must be at least {MIN_LEASE:g}s (the "
                  f"holder renews it every controller tick), got {lease:g}s")  # fmt: skip
        shared = {k: v for k, v in shared.items() if k != "lease"}
    return StateBackend(fields.get("backend", "file"), **shared)


def access_log(ctx: Ctx, node: Node, path: str) -> AccessLogConfig | Bad:
    fields = parse_fields(ctx, node, path, ACCESS_LOG_FIELDS, ("path",))
    if "path" not in fields:
        return BAD
    return AccessLogConfig(**fields)


def log_path(ctx: Ctx, node: Node, path: str) -> str | Bad:
    """ "-" (standard output), or a file in a folder that exists (relative: to the config)."""
    if ctx.value(node) == "-":
        return "-"
    if (where := file_path(ctx, node, path)) is BAD:
        return BAD
    folder = os.path.dirname(where)
    if os.path.isdir(where):
        return ctx.error(path, node, f"{where} is a folder: name a file in it")
    if not os.path.isdir(folder):
        return ctx.error(path, node, f"the folder {folder} does not exist")
    return where


def redis_settings(ctx: Ctx, node: Node, path: str) -> dict[str, object]:
    fields = parse_fields(ctx, node, path, REDIS_FIELDS)
    if "url" in fields:
        fields["redis_url"] = fields.pop("url")
    return fields


def redis_url(ctx: Ctx, node: Node, path: str) -> str | Bad:
    """redis://HOST[:PORT][/DB], rediss:// (TLS) or unix:///PATH."""
    if (url := string(ctx, node, path)) is BAD:
        return BAD
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
        return ctx.error(path, node, f"must be a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


def limits(ctx: Ctx, node: Node, path: str) -> Limits:
    return Limits(**parse_fields(ctx, node, path, LIMITS_FIELDS))


def versions(ctx: Ctx, node: Node, path: str) -> Mapping[str, Version]:
    out: dict[str, Version] = {}
    for name, knode, vnode in ctx.entries(node, path) or ():
        sub = join(path, name)
        if not _VERSION_NAME.fullmatch(name):
            ctx.error(sub, knode, f"version names must match {_VERSION_NAME.pattern}")
        fields = parse_fields(ctx, vnode, sub, VERSION_FIELDS, ("endpoints",))
        eps = tuple(fields.get("endpoints", ()))
        tls = fields.get("tls", DEFAULT_UPSTREAM_TLS)
        if "tls" in fields and eps and not any(ep.tls for ep in eps):
            ctx.warn(join(sub, "tls"), child(vnode, "tls") or vnode,
                     "is unused: no endpoint of this version is https://")  # fmt: skip
        if not tls.verify and any(ep.tls for ep in eps):
            ctx.warn(join(sub, "tls.verify"), child(vnode, "tls") or vnode,
                     "false: any certificate is accepted from these upstreams (no protection "
                     "against an impostor)")  # fmt: skip
        protocol = fields.get("protocol", "http/1.1")
        if protocol == "h2":
            eps = tuple(replace(ep, h2=True) for ep in eps)
        elif eps and any(ep.h2 for ep in eps):
            if not all(ep.h2 for ep in eps):
                ctx.error(join(sub, "endpoints"), child(vnode, "endpoints") or vnode,
                          "mixes h2c:// with http:// or https://: a version's endpoints "
                          "speak one protocol (protocol: h2 for HTTP/2 over TLS)")  # fmt: skip
            protocol = "h2"
        out[name] = Version(name, eps, fields.get("release"), tls, protocol)
    if isinstance(node, MappingNode) and not node.value:
        ctx.error(path, node, "must name at least one version")
    return MappingProxyType(out)


# ------------------------------------------------------------------------------- routing


def routing(ctx: Ctx, node: Node, path: str) -> Routing:
    fields = parse_fields(ctx, node, path, ROUTING_FIELDS)
    cohorts, files = fields.get("cohorts", ({}, ()))
    rules, sticky = tuple(fields.get("rules", ())), fields.get("sticky")
    cohort_map = MappingProxyType(cohorts)
    return Routing(fields.get("weight", 0), sticky, rules, cohort_map, files)


def _sticky(ctx: Ctx, node: Node, path: str) -> Sticky | Bad:
    fields = parse_fields(ctx, node, path, STICKY_FIELDS, ("key",))
    if "key" not in fields:
        return BAD
    group, anonymous = fields.get("group", ""), fields.get("anonymous", "random")
    kind, name = fields["key"]
    return Sticky(kind, name, group, anonymous)  # group "" = the canary's name


def _rules(ctx: Ctx, node: Node, path: str) -> list[Rule] | Bad:
    return parse_list(ctx, node, path, _rule, "rules", lambda r: f"rule name {r.name!r}")


def _rule(ctx: Ctx, node: Node, path: str) -> Rule | Bad:
    fields = parse_fields(ctx, node, path, RULE_FIELDS, ("name", "match", "to"))
    return Rule(**fields) if len(fields) == 3 else BAD


def _match(ctx: Ctx, node: Node, path: str) -> Match | Bad:
    fields = parse_fields(ctx, node, path, MATCH_FIELDS)
    if isinstance(node, MappingNode) and not any(child(node, k) for k in MATCH_FIELDS):
        conditions = ", ".join(MATCH_FIELDS)
        return ctx.error(path, node, f"must have at least one condition ({conditions})")
    return Match(**fields)


def _cohorts(ctx: Ctx, node: Node, path: str) -> tuple[dict[str, frozenset[str]], tuple[str, ...]]:
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


# -------------------------------------------------------------------------- admin tokens


def _tokens(ctx: Ctx, node: Node, path: str) -> list[Token] | Bad:
    """A list of {name, token_env, roles}; names unique, secrets distinct."""
    return parse_list(ctx, node, path, _token, "tokens", lambda t: f"token name {t.name!r}")


def _token(ctx: Ctx, node: Node, path: str) -> Token | Bad:
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


# --------------------------------------------------------------------------------- guard


def guard(ctx: Ctx, node: Node, path: str) -> Policy | Bad:
    fields = parse_fields(ctx, node, path, GUARD_FIELDS)
    if fields.get("source") == "prometheus":
        if "prometheus" not in fields:
            if child(node, "prometheus") is None:  # else its own errors are reported
                ctx.error(join(path, "prometheus"), node, "is required with source prometheus")
            return BAD
        p99 = fields.get("max_p99_ms")
        if p99 is not None and p99 not in EXPORTED_MS:
            bounds = ", ".join(f"{ms:g}" for ms in EXPORTED_MS)
            why = (f"must be a bound of the exported histogram with source prometheus "
                   f"(Prometheus sees only those): one of {bounds}; got {p99:g}")  # fmt: skip
            return ctx.error(join(path, "max_p99_ms"), child(node, "max_p99_ms"), why)
    elif "prometheus" in fields:
        where = join(path, "prometheus")
        ctx.warn(where, child(node, "prometheus") or node, "is unused unless source is prometheus")
        del fields["prometheus"]
    try:
        return Policy(**fields)
    except (TypeError, ValueError) as e:  # the table's checks should have caught it
        return ctx.error(path, node, f"invalid guard policy: {e}")


def fleet_counts(ctx: Ctx, node: Node, path: str) -> FleetCounts | Bad:
    fields = parse_fields(ctx, node, path, PROMETHEUS_FIELDS, ("url",))
    if "url" not in fields:
        return BAD
    try:
        return FleetCounts(**fields)
    except ValueError as e:
        return ctx.error(path, node, str(e))


# ------------------------------------------------------------------------------- rollout


def rollout(ctx: Ctx, node: Node, path: str) -> RolloutConfig | Bad:
    fields = parse_fields(ctx, node, path, ROLLOUT_FIELDS, ("steps",))
    if "steps" not in fields:
        return BAD
    return RolloutConfig(tuple(fields["steps"]), fields.get("interval", 60.0))


def _steps(ctx: Ctx, node: Node, path: str) -> list[Step] | Bad:
    """A non-empty list of weights or {weight, approve, interval, cohorts}; weights never
    decrease. A ring step (cohorts) without a weight keeps the previous step's."""
    like = "steps (a weight 0..100 or {weight, approve, interval, cohorts})"
    if not isinstance(node, SequenceNode) or not node.value:
        return ctx.error(path, node, f"must be a non-empty list of {like}, got {got(node)}")
    steps: list[Step] = []
    previous: int | None = None
    bad = False
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


def _step(ctx: Ctx, node: Node, path: str) -> Step | Bad:
    if not isinstance(node, MappingNode):
        weight = percent(ctx, node, path)
        return weight if weight is BAD else Step(weight)
    has_cohorts = child(node, "cohorts") is not None
    fields = parse_fields(ctx, node, path, STEP_FIELDS, () if has_cohorts else ("weight",))
    if not ("weight" in fields or has_cohorts) or len(fields) < len(node.value):
        return BAD
    if "cohorts" in fields:
        fields["cohorts"] = tuple(fields["cohorts"])
    return Step(**{"weight": _PREVIOUS_WEIGHT, **fields})


_PREVIOUS_WEIGHT = -1  # a ring step without a weight: _steps puts the previous step's


# -------------------------------------------------------------------------------- mirror


def mirror(ctx: Ctx, node: Node, path: str) -> Mirror:
    fields = parse_fields(ctx, node, path, MIRROR_FIELDS)
    if fields.get("percent") == 0:
        where = child(node, "percent") or node
        ctx.warn(join(path, "percent"), where, "is 0, so nothing is mirrored")
    if "methods" in fields:
        fields["methods"] = frozenset(fields["methods"])
    return Mirror(**fields)


def _compare(ctx: Ctx, node: Node, path: str) -> Compare:
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


# -------------------------------------------------------------------------------- tables


ADMIN_FIELDS: dict[str, Parser] = {"listen": host_port, "tokens": _tokens}
TOKEN_FIELDS: dict[str, Parser] = {
    "name": named(_RULE_NAME, "a token name"),
    "token_env": named(_ENV_NAME, "an environment variable name"),
    "roles": role_names,
}
GUARD_FIELDS: dict[str, Parser] = {
    "window": duration,
    "min_requests": int_at_least(1),
    "max_error_rate": rate,
    "max_p99_ms": positive,
    "relative_to_stable": boolean,
    "on_breach": choice("rollback", "pause", "alert"),
    "webhook": http_url,
    "source": choice("local", "prometheus"),
    "prometheus": fleet_counts,
}
ACCESS_LOG_FIELDS: dict[str, Parser] = {"path": log_path, "format": choice("json")}
MIN_LEASE = 1.0  # seconds
STATE_FIELDS: dict[str, Parser] = {
    "backend": choice("file", "redis"),
    "redis": redis_settings,
}
REDIS_FIELDS: dict[str, Parser] = {
    "url": redis_url,
    "key_prefix": named(re.compile(r"[A-Za-z0-9_.:{}/-]{1,200}"), "a key prefix"),
    "lease": duration,
}
PROMETHEUS_FIELDS: dict[str, Parser] = {
    "url": http_url,
    "job": named(re.compile(r"[A-Za-z0-9_.:-]{1,128}"), "a scrape job name"),
    "query_interval": duration,
    "timeout": duration,
}
ROLLOUT_FIELDS: dict[str, Parser] = {"interval": duration, "steps": _steps}
STEP_FIELDS: dict[str, Parser] = {
    "weight": percent,
    "approve": approve_role,
    "interval": duration,
    "cohorts": ring_cohorts,
}
MIRROR_FIELDS: dict[str, Parser] = {
    "percent": percent,
    "methods": methods,
    "max_in_flight": int_at_least(1),
    "max_body_bytes": size(0, 1 << 62, "0 or more"),
    "timeout": duration,
    "compare": _compare,
}
COMPARE_FIELDS: dict[str, Parser] = {
    "ignore_headers": ignored_headers,
    "headers": header_names,
    "ignore_json_fields": json_paths,
    # both sides are held in memory up to this while a shadow copy is in flight
    "max_body_bytes": size(0, 64 << 20, "between 0 and 64MiB (67108864) bytes"),
}
VERSION_FIELDS: dict[str, Parser] = {
    "endpoints": endpoints,
    "release": string,
    "tls": transport.upstream_tls,
    "protocol": choice("http/1.1", "h2"),
}
ROUTING_FIELDS: dict[str, Parser] = {
    "weight": percent,
    "sticky": _sticky,
    "rules": _rules,
    "cohorts": _cohorts,
}
STICKY_FIELDS: dict[str, Parser] = {
    "key": sticky_key,
    "group": string,
    "anonymous": choice("random", "stable", "cookie"),
}
RULE_FIELDS: dict[str, Parser] = {
    "name": named(_RULE_NAME, "a rule name"),
    "match": _match,
    "to": choice("stable", "canary"),
}
MATCH_FIELDS: dict[str, Parser] = {
    "header": pairs(lower=True),
    "cookie": pairs(lower=False),
    "cohort": cohort_ref,
    "path_prefix": path_prefix,
    "method": methods,
}
COHORT_FIELDS: dict[str, Parser] = {"keys": cohort_keys, "file": cohort_file}
LIMITS_FIELDS: dict[str, Parser] = {
    "connect_timeout": duration,
    "response_timeout": duration,
    "idle_timeout": duration,
    "drain_timeout": duration,
    "client_header_timeout": duration,
    "client_body_timeout": duration,
    "send_timeout": duration,
    "max_connections": size(1, 1 << 20, "between 1 and 1048576"),
    "max_header_bytes": size(1024, 1 << 20, "between 1KiB (1024) and 1MiB (1048576) bytes"),
    "max_body_bytes": size(1, 1 << 62, "greater than 0"),
}
