"""Parsers of the transport settings: `tls` on the listener, `versions.<name>.tls`.

Rules:
- Every certificate and key file is read once, with the side-file limit, and
  its digest goes into `Ctx.sources`: the reloader then watches it, so a
  renewed certificate is a changed config (and a broken one a rejected reload,
  the pair in force kept).
- A pair is checked here, as OpenSSL will serve it (`certs.check_pair`): a key
  that does not match its certificate, an encrypted key or a file that is not
  PEM is an error at its key path. An expired or not yet valid certificate is a
  warning (it is served: clients decide).
- `versions.<name>.tls`: `ca` (trust only it), `cert` and `key` (a client
  certificate, the two together), `server_name`, `verify`. The CA file must
  hold at least one PEM certificate OpenSSL accepts.
- `alpn` lists what the listener offers, in order of preference: `h2`
  (HTTP/2) and `http/1.1`, each at most once.
- `http2`: `cleartext` (h2c prior knowledge on a plain listener) and
  `max_concurrent_streams` (1 to 10,000).
"""

from __future__ import annotations

import re
import time

from yaml.nodes import Node

from .certs import PairError, check_ca, check_pair
from .model import MAX_COHORT_BYTES, Certificate, Http2, Tls, UpstreamTls
from .values import boolean, duration, file_path, size, string
from .walker import (
    BAD,
    Bad,
    Ctx,
    Parser,
    digest,
    parse_fields,
    parse_list,
    read_limited,
    unreadable,
)

SERVED_ALPN = ("h2", "http/1.1")
TLS_VERSIONS = ("1.2", "1.3")


def tls(ctx: Ctx, node: Node, path: str) -> Tls | Bad:
    fields = parse_fields(ctx, node, path, TLS_FIELDS, ("certificates",))
    if "certificates" not in fields:
        return BAD
    return Tls(**fields)


def certificates(ctx: Ctx, node: Node, path: str) -> tuple[Certificate, ...] | Bad:
    found = parse_list(ctx, node, path, certificate, "certificates ({cert: FILE, key: FILE})")
    return BAD if found is BAD or not found else tuple(found)


def certificate(ctx: Ctx, node: Node, path: str) -> Certificate | Bad:
    fields = parse_fields(ctx, node, path, CERTIFICATE_FIELDS, ("cert", "key"))
    if "cert" not in fields or "key" not in fields:
        return BAD
    (cert, chain), (key, secret) = fields["cert"], fields["key"]
    try:
        leaf = check_pair(chain, secret)
    except PairError as e:
        return ctx.error(path, node, f"cannot serve {cert} with {key}: {e}")
    now = time.time()
    if leaf.not_after < now:
        ctx.warn(path, node, f"{cert} expired {_ago(now - leaf.not_after)} ago")
    elif leaf.not_before > now:
        ctx.warn(path, node, f"{cert} is not valid for another {_ago(leaf.not_before - now)}")
    if not leaf.names:
        ctx.warn(path, node, f"{cert} names no host (no DNS subjectAltName or common name)")
    return Certificate(cert, key, chain, secret, leaf.names, leaf.not_after)


def _ago(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / 3600:.1f} hours"


def pem_file(what: str) -> Parser:
    """(absolute path, bytes) of a PEM file, digested for the reloader."""

    def parse(ctx: Ctx, node: Node, path: str) -> tuple[str, bytes] | Bad:
        if (resolved := file_path(ctx, node, path)) is BAD:
            return BAD
        try:
            data = read_limited(resolved, MAX_COHORT_BYTES)
        except (OSError, ValueError) as e:
            ctx.sources[resolved] = unreadable(e)
            why = e.strerror if isinstance(e, OSError) else e
            return ctx.error(path, node, f"cannot read {what} {resolved}: {why}")
        ctx.sources[resolved] = digest(data)
        return resolved, data

    return parse


def alpn(ctx: Ctx, node: Node, path: str) -> tuple[str, ...] | Bad:
    found = parse_list(ctx, node, path, string, "protocol names", key=lambda name: name)
    if found is BAD:
        return BAD
    for i, name in enumerate(found):
        if name not in SERVED_ALPN:
            why = f"must be 'h2' or 'http/1.1', got {name!r}"
            return ctx.error(f"{path}[{i}]", node.value[i], why)
    return tuple(found)


def http2(ctx: Ctx, node: Node, path: str) -> Http2 | Bad:
    return Http2(**parse_fields(ctx, node, path, HTTP2_FIELDS))


def min_version(ctx: Ctx, node: Node, path: str) -> str | Bad:
    text = string(ctx, node, path)  # "1.2", quoted or not (a YAML float is read as written)
    if text is not BAD and text not in TLS_VERSIONS:
        return ctx.error(path, node, f"must be '1.2' or '1.3', got {text!r}")
    return text


def upstream_tls(ctx: Ctx, node: Node, path: str) -> UpstreamTls | Bad:
    fields = parse_fields(ctx, node, path, UPSTREAM_TLS_FIELDS)
    kw: dict[str, object] = {}
    if "ca" in fields:
        ca, pem = fields["ca"]
        try:
            check_ca(pem)
        except PairError as e:
            return ctx.error(f"{path}.ca", node, f"cannot trust {ca}: {e}")
        kw.update(ca=ca, ca_pem=pem)
    if ("cert" in fields) != ("key" in fields):
        missing = "key" if "cert" in fields else "cert"
        return ctx.error(f"{path}.{missing}", node, "is required with a client certificate")
    if "cert" in fields:
        (cert, chain), (key, secret) = fields["cert"], fields["key"]
        try:
            check_pair(chain, secret)
        except PairError as e:
            return ctx.error(path, node, f"cannot present {cert} with {key}: {e}")
        kw.update(cert=cert, chain=chain, key=key, secret=secret)
    if "server_name" in fields:
        kw["server_name"] = fields["server_name"]
    if "verify" in fields:
        kw["verify"] = fields["verify"]
    return UpstreamTls(**kw)  # type: ignore[arg-type]


def server_name(ctx: Ctx, node: Node, path: str) -> str | Bad:
    text = string(ctx, node, path)
    if text is not BAD and not _HOSTNAME.fullmatch(text):
        return ctx.error(path, node, f"must be a host name, got {text!r}")
    return text


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")  # fmt: skip
UPSTREAM_TLS_FIELDS: dict[str, Parser] = {
    "ca": pem_file("CA file"),
    "cert": pem_file("certificate file"),
    "key": pem_file("key file"),
    "server_name": server_name,
    "verify": boolean,
}
HTTP2_FIELDS: dict[str, Parser] = {
    "cleartext": boolean,
    "max_concurrent_streams": size(1, 10_000, "between 1 and 10000"),
}
TLS_FIELDS: dict[str, Parser] = {
    "certificates": certificates,
    "alpn": alpn,
    "min_version": min_version,
    "handshake_timeout": duration,
}
CERTIFICATE_FIELDS: dict[str, Parser] = {
    "cert": pem_file("certificate file"),
    "key": pem_file("key file"),
}
