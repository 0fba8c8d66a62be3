"""TLS: the listener's server contexts, the upstreams' client contexts, and failures.

Rules:
- One `ssl.SSLContext` per certificate, all with the same protocol settings
  (`min_version`, ALPN, no renegotiation, no compression). The first
  certificate's is the front context every handshake starts on; its SNI
  callback moves the handshake to the first certificate naming the host, exact
  names before wildcards (`*.example.com` covers one label), and keeps the
  first certificate when nothing matches or no name was sent. With one
  certificate there is no callback. A name that is not ASCII fails the
  handshake (CPython cannot decode it for the callback; its report is dropped).
- A `Terminator` is made whole from one `Tls` config and never changes: a
  reload makes a new one, and handshakes already begun finish on the old.
- A client context (`client_context`, for a version's https:// endpoints)
  verifies the upstream's certificate and name unless `verify: false`: against
  `ca` alone when it is given, else the system's store; it presents the client
  certificate when one is configured; TLS 1.2 at least, ALPN `http/1.1` (or
  `h2` for a version with `protocol: h2`).
- `describe` says why an upstream's TLS failed, for the 502's `cause`
  (`tls: certificate verify failed: ...`).
- `failure_reason` maps a failed handshake to one of `TLS_FAILURE_REASONS`
  (proxy.metrics), a fixed set of label values; what OpenSSL said beyond that
  is for debug logging only (a failing client must not flood the log).
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass
from typing import Any

from .config import Certificate, Tls, UpstreamTls, load_pair

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: Tls, cert: Certificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(list(tls.alpn))
    load_pair(ctx, cert.chain, cert.secret)
    return ctx


@dataclass(frozen=True, slots=True)
class Served:
    """What /status says of one certificate in force."""

    cert: str
    names: tuple[str, ...]
    not_after: float


class Terminator:
    """The contexts of one `Tls` config; `front` is the one to hand to a handshake."""

    def __init__(self, tls: Tls) -> None:
        self.tls = tls
        self.timeout = tls.handshake_timeout
        contexts = [server_context(tls, cert) for cert in tls.certificates]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wild: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for cert, ctx in zip(tls.certificates, contexts, strict=True):
            for name in cert.names:
                if name.startswith("*."):
                    self.wild.setdefault(name[2:], ctx)
                else:
                    self.exact.setdefault(name, ctx)
        self.front = contexts[0]
        if len(contexts) > 1:  # one certificate needs no choosing
            quiet_bad_server_names()
            self.front.sni_callback = self._pick
        self.served = tuple(Served(c.cert, c.names, c.not_after) for c in tls.certificates)

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.front
        name = server_name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None:
            label, dot, parent = name.partition(".")
            if label and dot:
                found = self.wild.get(parent)
        return self.front if found is None else found

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        chosen = self.context_for(server_name)
        if chosen is not self.front:
            sslobj.context = chosen


def client_context(tls: UpstreamTls, alpn: str = "http/1.1") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, and checks the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols([alpn])
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif tls.ca_pem is not None:
        ctx.load_verify_locations(cadata=tls.ca_pem.decode("ascii"))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.chain is not None and tls.secret is not None:
        load_pair(ctx, tls.chain, tls.secret)
    return ctx


class TlsFailure(OSError):
    """A TLS handshake with an upstream failed; `str()` says why, in words. (Here,
    not beside the dialer: a compiled module cannot define an OSError subclass.)"""


def describe(exc: ssl.SSLError) -> str:
    """`exc` in words, without OpenSSL's source locations."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    code = getattr(exc, "reason", None)
    if code:
        return str(code).lower().replace("_", " ")
    return str(exc.args[1] if len(exc.args) > 1 else exc)


def quiet_bad_server_names() -> None:
    """A server name that is not ASCII never reaches an SNI callback: CPython reports
    its UnicodeDecodeError through sys.unraisablehook (a traceback on stderr per
    connection, whatever the log level) and the handshake fails (counted). Drop those
    reports, and only those; installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "turnout_sni", False):
        return

    def hook(report: Any) -> None:
        if isinstance(report.exc_value, UnicodeDecodeError) and isinstance(report.object, bytes):
            return
        previous(report)

    hook.turnout_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


# Mapped from OpenSSL's reason codes (ssl.SSLError.reason).
_BY_CODE = {
    "HTTP_REQUEST": "http_request",
    "HTTPS_PROXY_REQUEST": "http_request",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "UNKNOWN_PROTOCOL": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_rejected",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate_rejected",
    "UNEXPECTED_EOF_WHILE_READING": "closed",
}


def failure_reason(exc: BaseException) -> str:
    """The label value of a failed handshake (see TLS_FAILURE_REASONS)."""
    if isinstance(exc, ssl.SSLError):
        code = getattr(exc, "reason", None) or ""
        found = _BY_CODE.get(code)
        if found is not None:
            return found
        if isinstance(exc, ssl.SSLEOFError):
            return "closed"
        if code.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_")):
            return "client_alert"
        return "other"
    if isinstance(exc, ConnectionAbortedError | TimeoutError):  # uvloop: handshake too long
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    return "other"
