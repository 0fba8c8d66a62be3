"""Who is calling the admin API, what they may do, and the audit trail.

Rules:
- With `admin.tokens`, a request carries `Authorization: Bearer <token>`; the
  token's roles (plus the implied `viewer`) decide. A missing or unknown token
  is 401; a known token without the role is 403. Tokens are compared in
  constant time.
- Without tokens, only loopback peers are served (403 otherwise), and they may
  do everything.
- Every action — allowed or refused — is appended to the audit log as one JSON
  line: when, who, what, the outcome and a detail.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass

from aiohttp import web

from ..config import Token

log = logging.getLogger("turnout.audit")

ANY_TOKEN = "any"  # the brake (rollback, pause): anyone authenticated may pull it
OPERATOR = "operator"  # resume, promote, reload: a role other than viewer


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    everything: bool = False  # a loopback caller when no tokens are configured


class Denied(Exception):
    def __init__(self, status: int, message: str, caller: str = "anonymous") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.caller = caller


def _loopback(peer: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1, also as IPv4-mapped IPv6 (a dual-stack listener)."""
    if peer is None:
        return False
    try:
        ip = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # "::ffff:127.0.0.1"; not loopback to ipaddress before 3.13
    return ip.is_loopback


def identify(request: web.Request, tokens: tuple[Token, ...]) -> Caller:
    """The caller of `request`, or Denied (401/403)."""
    if not tokens:
        if not _loopback(request.remote):
            raise Denied(403, "the admin API without tokens answers loopback callers only")
        return Caller("local", frozenset({"viewer"}), everything=True)
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Denied(401, "missing bearer token")
    presented = presented.strip()
    found = None
    for token in tokens:  # compare with every token: timing tells nothing
        if token.value and hmac.compare_digest(token.value.encode(), presented.encode()):
            found = token
    if found is None:
        raise Denied(401, "unknown token")
    return Caller(found.name, frozenset(found.roles) | {"viewer"})


def allow(caller: Caller, need: str) -> None:
    """Raise Denied(403) unless `caller` may do what needs `need`."""
    if caller.everything or need in ("viewer", ANY_TOKEN):
        return
    if need == OPERATOR:
        if caller.roles - {"viewer"}:
            return
        raise Denied(403, "this action needs a role other than viewer", caller.name)
    if need not in caller.roles:
        raise Denied(403, f"this action needs role {need!r}", caller.name)


class Audit:
    """Appends one JSON line per admin action to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def record(self, actor: str, action: str, outcome: str, detail: str | None = None) -> dict:
        entry = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "actor": actor,
            "action": action,
            "outcome": outcome,
        }
        if detail:
            entry["detail"] = detail
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as err:
            log.error("cannot append to audit log %s: %s", self.path, err)
        return entry
