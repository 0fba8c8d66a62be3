"""What the client is sent: proxy-made errors, and how a relayed response is framed.

Rules:
- Proxy-made answers (400/413/502/504, ...) carry a short JSON body naming the
  version and the cause, `Connection: close`, and no body for an answer to HEAD.
- `client_framing` is the one decision of how an upstream response's body is
  framed towards the client and whether the client connection stays open: a
  pure function of the facts, tested as a table (tests/test_phases.py).
  - A switch of protocols the client asked for: `Connection: upgrade`, no body.
  - An answer to HEAD, a 204 or a 304: no body; a Content-Length from the
    upstream is relayed as it is.
  - A body sized by Content-Length: relayed as it is.
  - Otherwise (chunked or until close upstream): chunked to an HTTP/1.1
    client; to an HTTP/1.0 client, until the connection closes.
  - A refused upgrade closes the client connection: the client may already be
    sending frames of the other protocol.
  - `Connection: close` when the connection will close; `Connection:
    keep-alive` to an HTTP/1.0 client that keeps it.
"""

from __future__ import annotations

import json
from typing import Final

# The body framings are proxy.framing's: the same four ways a body can end, towards
# the client as from the upstream.
from .framing import CHUNKED, LENGTH, NONE, UNTIL_CLOSE

__all__ = ["CHUNKED", "LENGTH", "NONE", "UNTIL_CLOSE", "client_framing", "error_response"]

REASONS: Final = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

NO_BODY_STATUS: Final = frozenset({204, 304})


_UPGRADE: Final = b"Connection: upgrade\r\n"
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_KEEP: Final = b"Connection: keep-alive\r\n"


def error_response(
    status: int, version: str | None, cause: str, expose: bool, head_only: bool = False
) -> bytes:
    """A proxy-made error: a JSON document, or only its head for an answer to HEAD."""
    body = json.dumps({"error": REASONS[status].decode(), "version": version, "cause": cause})
    data = body.encode() + b"\n"
    extra = b"X-Turnout-Version: %s\r\n" % version.encode() if version and expose else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n%s\r\n%s"
    ) % (status, REASONS[status], len(data), extra, b"" if head_only else data)


# A gRPC call answered without a gRPC status (a proxy-made error, an upstream that
# answered plain HTTP): its code, as gRPC's own HTTP-to-gRPC table gives it. A
# client that went away (499) is CANCELLED; anything else is UNKNOWN.
_GRPC_FOR_HTTP: Final = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 499: 1, 502: 14, 503: 14,
                         504: 14}  # fmt: skip


def grpc_for_http(status: int) -> int:
    return _GRPC_FOR_HTTP.get(status, 2)


def client_framing(
    status: int,
    sized: bool,
    head_request: bool,
    http11: bool,
    upgrade_asked: bool,
    upgrading: bool,
    close: bool,
) -> tuple[int, bytes, bool]:
    """(body mode, the lines to add to the relayed head, whether the client connection
    closes after this response).

    `sized`: the upstream framed the body by Content-Length; `upgrade_asked`: the
    request asked to switch protocols, `upgrading`: this is the 101 switching them;
    `close`: the connection closes anyway (the client asked, the proxy drains, ...).
    """
    if upgrading:
        return NONE, _UPGRADE, close
    if head_request or status in NO_BODY_STATUS:
        mode, lines = NONE, b""
    elif sized:
        mode, lines = LENGTH, b""
    elif http11:
        mode, lines = CHUNKED, _CHUNKED
    else:
        mode, lines, close = UNTIL_CLOSE, b"", True
    if upgrade_asked:
        close = True
    if close:
        return mode, lines + _CLOSE, True
    if not http11:
        return mode, lines + _KEEP, False
    return mode, lines, False
