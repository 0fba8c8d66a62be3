"""Who is calling the admin API, what they may do, and the audit trail.

Rules:
- With `admin.tokens`, a request carries `Authorization: Bearer <token>`; the
  token's roles (plus the implied `viewer`) decide. A missing or unknown token
  is 401; a known token without the role is 403. Tokens are compared in
  constant time. A browser cannot attach the token to a cross-site request
  without a CORS preflight, which this API never grants.
- Without tokens, a request is served only when all of these hold, else 403:
  the peer is a loopback address (127.0.0.0/8, ::1, also IPv4-mapped); the
  Host header, when present, names a loopback host (`localhost`, an address in
  127.0.0.0/8, `[::1]`, each with an optional port), so a DNS-rebound name is
  refused; an Origin header, when present, is a loopback origin (http or
  https, same hosts) on the Host's port, so a page of another site, or of
  another local program, open in a local browser is refused; a browser's
  Sec-Fetch-Site, when sent, is same-origin or none. Such callers may then do
  everything: the dashboard this listener serves is the one page that may.
- These rules cover the API (/status, /explain, /events, the actions). They
  do not apply to /metrics, /healthz and /readyz, which carry no secret and
  no action and are reached by pod IP (Prometheus, kubelet probes).
- Every action — allowed or refused — is appended to the audit log as one JSON
  line: when, who, what, the outcome and a detail, with control characters
  escaped (proxy.safetext). Refused calls (401, 403, 413, 415, 400) are
  written at most `REFUSED_PER_SECOND` a second; the rest of that second's
  refusals become one line `"K refused calls suppressed"`, so a flood of bad
  calls cannot grow the file faster than that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..config import Token
from ..safetext import escape

log = logging.getLogger("turnout.audit")

ANY_TOKEN = "any"  # the brake (rollback, pause): anyone authenticated may pull it
OPERATOR = "operator"  # resume, promote, reload: a role other than viewer
REFUSED_PER_SECOND = 20  # audit lines for refused calls, per second at most


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    everything: bool = False  # a loopback caller when no tokens are configured


class Denied(Exception):
    """A refused call: its HTTP status, the JSON error's message, the caller's name."""

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


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:]+)(?::\d{1,5})?")


def loopback_host(host: str) -> bool:
    """True for a Host header naming localhost, 127.0.0.0/8 or [::1], with an optional port."""
    m = _HOST.fullmatch(host.strip())
    if m is None:
        return False
    name = m[1].lower()
    if name == "localhost":
        return True
    if name.startswith("["):
        return _loopback(name[1:-1])
    return ":" not in name and _loopback(name)


def loopback_origin(origin: str) -> bool:
    """True for an Origin `http(s)://` + a loopback host (see loopback_host), nothing else."""
    try:
        parts = urlsplit(origin.strip())
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.username:
        return False
    return loopback_host(parts.netloc)


def _shown(value: str) -> str:
    return repr(value[:100] + ("…" if len(value) > 100 else ""))


def identify(request: web.Request, tokens: tuple[Token, ...]) -> Caller:
    """The caller of `request`, or Denied (401/403)."""
    if not tokens:
        return _local(request)
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


def _local(request: web.Request) -> Caller:
    """Without tokens: a loopback peer, Host and Origin (see the module's rules)."""
    if not _loopback(request.remote):
        raise Denied(403, "the admin API without tokens answers loopback callers only")
    host = request.headers.get("Host")
    if host is not None and not loopback_host(host):
        why = f"the admin API without tokens answers for a loopback Host only, got {_shown(host)}"
        raise Denied(403, why)
    origin = request.headers.get("Origin")
    if origin is not None and not loopback_origin(origin):
        why = f"cross-origin requests are refused (Origin {_shown(origin)} is not loopback)"
        raise Denied(403, why)
    if origin is not None and host is not None and _port(origin) != _port(host):
        # another local program's page (a dev server on localhost:3000, say) is another
        # origin: only the dashboard this listener serves may call it from a browser
        why = f"cross-origin requests are refused (Origin {_shown(origin)} is another port)"
        raise Denied(403, why)
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        why = f"requests from another site's page are refused (Sec-Fetch-Site {_shown(site)})"
        raise Denied(403, why)
    return Caller("local", frozenset({"viewer"}), everything=True)


def _port(where: str) -> int | None:
    """The port of an Origin (`http://h:p`) or a Host (`h:p`), the scheme's default if none."""
    text = where.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    try:
        return parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None


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
    """Appends one JSON line per admin action to the file `path_of()` names now."""

    def __init__(
        self,
        path_of: Callable[[], str],
        refused_per_second: int = REFUSED_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        copy: Callable[[str], None] | None = None,
    ) -> None:
        self.path_of = path_of  # follows reloads that move the state file
        self.copy = copy  # also given each line (the fleet's audit log in Redis)
        self.limit = refused_per_second
        self.clock = clock
        self.window = -1.0  # when the current one-second window of refusals began
        self.written = 0  # refusals written in this window
        self.suppressed = 0  # refusals not written in this window
        self.timer: asyncio.TimerHandle | None = None

    def record(self, actor: str, action: str, outcome: str, detail: str | None = None) -> dict:
        self.flush()  # a pending summary comes first: the file stays in time order
        return self._write(actor, action, outcome, detail)

    def refused(self, actor: str, action: str, status: int, detail: str) -> bool:
        """Audit a refused call, unless this second's quota is spent; True if written."""
        now = self.clock()
        if now - self.window >= 1.0:
            self.flush()
            self.window, self.written = now, 0
        if self.written >= self.limit:
            self.suppressed += 1
            self._flush_later(self.window + 1.0 - now)
            return False
        self.written += 1
        self._write(actor, action, f"refused {status}", detail)
        return True

    def flush(self) -> None:
        """Write the summary line of the refusals suppressed so far, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.suppressed:
            n, self.suppressed = self.suppressed, 0
            self._write("turnout", "audit", "suppressed", f"{n} refused calls suppressed")

    def _flush_later(self, delay: float) -> None:
        if self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a unit test): the next record writes the summary
            self.timer = loop.call_later(max(0.0, delay), self.flush)

    def _write(self, actor: str, action: str, outcome: str, detail: str | None) -> dict:
        entry = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "actor": escape(actor),
            "action": escape(action),
            "outcome": outcome,
        }
        if detail:
            entry["detail"] = escape(detail)
        path = self.path_of()
        line = json.dumps(entry)
        if self.copy is not None:
            self.copy(line)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as err:
            log.error("cannot append to audit log %s: %s", path, err)
        return entry
