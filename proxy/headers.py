"""Header rewriting for both directions of an exchange.

Rules:
- Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in `Connection`
  are removed in both directions; the proxy writes its own framing headers.
- `TE` is dropped unless it is exactly `trailers`.
- `X-Forwarded-For` appends the peer; `X-Forwarded-Proto` and `X-Forwarded-Host`
  are set by the proxy, replacing what the client sent. `Host` passes through.
- An Upgrade handshake keeps `Upgrade` and gets `Connection: upgrade`.

Headers are handled as one block of bytes, `\\r\\nName: value` per line, with
C-speed searches (`bytes.find`, compiled regexes) instead of a Python loop per
header: the common request and response need no per-line work at all.
Pure functions; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from .framing import CHUNKED, LENGTH, PLAIN, Framing, judge_request

# Hop-by-hop (RFC 9110 §7.6.1, and the proxy credentials): removed in both directions.
HOP_BY_HOP_NAMES: Final = (
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
)  # fmt: skip
HOP_BY_HOP: Final = frozenset(HOP_BY_HOP_NAMES)
_HOP_ALT: Final = b"|".join(HOP_BY_HOP_NAMES)

_RESP_HOP: Final = re.compile(rb"\r\n(?:" + _HOP_ALT + rb"|x-turnout-version)[ \t]*:[^\r]*", re.I)
_LINE: Final = re.compile(rb"\r\n([^:\r]+):[ \t]*([^\r]*?)[ \t]*(?=\r\n)")


class HeaderError(ValueError):
    """A request whose headers cannot be forwarded safely (answered with 400)."""


def header_value(block: bytes, low: bytes, name: bytes) -> bytes | None:
    """First value of `name` (lower-case) in a block and its lower-cased copy."""
    i = low.find(b"\r\n" + name + b":")
    if i == -1:
        return None
    start = i + len(name) + 3
    end = low.find(b"\r\n", start)
    return block[start:end].strip()


def _tokens(value: bytes | None) -> frozenset[bytes]:
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def _drop_named(block: bytes, names: frozenset[bytes]) -> bytes:
    """Remove every line whose (lower-case) name is in `names`."""
    keep = []
    for m in _LINE.finditer(block):
        if m.group(1).strip().lower() not in names:
            keep.append(m.group(0))
    return b"".join(keep) + b"\r\n"


class RequestHead:
    """What the proxy learns from the client's request headers.

    Fields other than `block` and `routing` keep their class-level default for
    most requests; not assigning them keeps construction cheap.
    """

    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    expect_continue = False
    upgrade: bytes | None = None
    xff: bytes | None = None
    te_trailers = False
    special = False  # hop-by-hop, forwarding or framing headers were present
    framing: Framing = PLAIN  # what proxy.framing decided from every framing line

    def __init__(self, block: bytes) -> None:
        self.block = block  # "\r\nName: value" lines to forward, ending with "\r\n"
        self.routing: dict[str, str] = {}  # lower-case name -> value, for decide()


# Request lines the proxy removes or rewrites: finding one sends a head to the slow path.
_REWRITTEN: Final = (
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-turnout-shadow",
)
_REQ_NAMES: Final = (b"host", b"content-length", b"expect", *HOP_BY_HOP_NAMES, *_REWRITTEN)
_SLOW: Final = frozenset(_REQ_NAMES[2:])


# What a line the scanner found is, as bits (the names routing reads may be any).
_WANTED: Final = 1  # routing reads it
_HOST: Final = 2
_LENGTH: Final = 4  # Content-Length
_SPECIAL: Final = 8  # hop-by-hop, forwarding or Expect: the slow path
_CODING: Final = 16  # Transfer-Encoding
_CONNECTION: Final = 32
_COOKIE: Final = 64
SPELLINGS_MAX: Final = 256  # spellings of names remembered; then the memory starts afresh


def _alternation(names: list[bytes]) -> bytes:
    """A regex alternation of `names`, factored by their first bytes (a trie), so a
    line is tried against the few names sharing its first letter, not against all."""
    if b"" in names:
        rest = [n for n in names if n]
        return b"(?:" + _alternation(rest) + b")?" if rest else b""
    first: dict[bytes, list[bytes]] = {}
    for n in names:
        first.setdefault(n[:1].lower(), []).append(n[1:])
    alts = [re.escape(c) + _alternation(sorted(tails)) for c, tails in sorted(first.items())]
    return alts[0] if len(alts) == 1 else b"(?:" + b"|".join(alts) + b")"


class Scanner:
    """Finds, in a header block, every line the proxy must look at, and says what
    each is: one regex (names matched case-insensitively), and what each spelling
    of a name seen lately stands for, so a repeated one costs a dictionary lookup."""

    __slots__ = ("pattern", "wanted", "spellings")

    def __init__(self, wanted: frozenset[bytes]) -> None:
        self.wanted = wanted  # lower-case names routing reads
        names = sorted(set(_REQ_NAMES) | wanted)
        self.pattern = re.compile(
            rb"\r\n(" + _alternation(names) + rb")[ \t]*+:[ \t]*+([^\r]*+)", re.I
        )
        self.spellings: dict[bytes, tuple[int, str]] = {}  # name as sent -> (bits, key)

    def learn(self, name: bytes) -> tuple[int, str]:
        """What a name found by the pattern is: its bits and its lower-case text."""
        low = name.lower()
        bits = _WANTED if low in self.wanted else 0
        if low == b"host":
            bits |= _HOST
        elif low == b"content-length":
            bits |= _LENGTH
        elif low in _SLOW:
            bits |= _SPECIAL
            if low == b"transfer-encoding":
                bits |= _CODING
            elif low == b"connection":
                bits |= _CONNECTION
        if low == b"cookie":
            bits |= _COOKIE
        found = (bits, low.decode("latin-1"))
        if len(self.spellings) >= SPELLINGS_MAX:
            self.spellings.clear()
        self.spellings[name] = found
        return found


def request_scanner(wanted: Iterable[bytes]) -> Scanner:
    """The scanner of header blocks for a routing table reading `wanted` (lower-case)."""
    return Scanner(frozenset(wanted))


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Parsed (name, value) pairs back into a block of lines."""
    if not headers:
        return b"\r\n"
    return b"\r\n" + b"\r\n".join(map(b": ".join, headers)) + b"\r\n"


def scan_request(block: bytes, scanner: Scanner, http11: bool = True) -> RequestHead:
    """Classify the client's headers: framing, routing inputs, the block to forward.

    `block` is "\\r\\nName: value" lines ending "\\r\\n" in the strict grammar
    (proxy.framing.REQUEST_HEAD); `scanner` comes from `request_scanner(wanted)`,
    `wanted` being the lower-case names routing reads. The one scan also collects
    every framing line, and proxy.framing.judge_request decides the body's length
    from them (raising FramingError for a request that must not be forwarded).
    """
    head = RequestHead(block)
    slow = False
    routing = head.routing
    lengths: list[bytes] = _NOTHING
    codings: list[bytes] = _NOTHING
    options: frozenset[bytes] = _NO_OPTIONS
    spellings = scanner.spellings
    for name, value in scanner.pattern.findall(block):
        found = spellings.get(name)
        bits, key = found if found is not None else scanner.learn(name)
        value = value.rstrip()
        if bits & _WANTED:
            if bits & _COOKIE and key in routing:  # several Cookie lines: one list
                routing[key] += "; " + value.decode("latin-1")
            elif key not in routing:
                routing[key] = value.decode("latin-1")
        if bits & _HOST:
            if head.host is not None:
                raise HeaderError("duplicate Host header")
            head.host = value
        elif bits & _LENGTH:
            lengths = [*lengths, value]
        elif bits & _SPECIAL:
            slow = True
            if bits & _CODING:
                codings = [*codings, value]
            elif bits & _CONNECTION:
                options = options | _tokens(value)
    if lengths or codings or options:
        framing = judge_request(lengths, codings, options, http11)
        head.framing = framing
        if framing.mode == LENGTH:
            head.content_length = framing.length
        elif framing.mode == CHUNKED:
            head.chunked = True
    if slow:
        head.special = True
        _scan_special(head, block.lower(), options)
    return head


_NOTHING: Final[list[bytes]] = []  # never appended to: a line found makes a new list
_NO_OPTIONS: Final[frozenset[bytes]] = frozenset()


_XFF: Final = re.compile(rb"\r\nx-forwarded-for[ \t]*:[ \t]*([^\r]*)", re.I)


def _scan_special(head: RequestHead, low: bytes, options: frozenset[bytes]) -> None:
    """The slow path: hop-by-hop, forwarding and upgrade headers are present."""
    block = head.block
    head.upgrade = header_value(block, low, b"upgrade")
    te_value = header_value(block, low, b"te")
    head.te_trailers = te_value is not None and te_value.lower() == b"trailers"
    expect = header_value(block, low, b"expect")
    head.expect_continue = expect is not None and expect.lower() == b"100-continue"
    xff = [v.rstrip() for v in _XFF.findall(block)]
    head.xff = b", ".join(xff) if xff else None
    drop = set(options)  # every header any Connection line names
    drop.update(HOP_BY_HOP_NAMES)
    drop.update(_REWRITTEN)
    drop.discard(b"host")
    drop.discard(b"content-length")
    head.block = _drop_named(block, frozenset(drop))


def relayed_trailers(block: bytes) -> bytes:
    """Trailer lines (each ending CRLF, checked by the chunked reader) as they are
    relayed: without hop-by-hop fields or X-Turnout-Version."""
    kept = _RESP_HOP.sub(b"", b"\r\n" + block[:-2])
    return kept[2:] + b"\r\n" if kept else b""


def upstream_request(
    method: bytes, target: bytes, head: RequestHead, peer: bytes, scheme: bytes, upgrade: bool
) -> bytes:
    """Serialize the request head sent to the upstream (always HTTP/1.1); `scheme` is
    the listener's, b"http" or b"https"."""
    xff = peer if head.xff is None else head.xff + b", " + peer
    extra = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (xff, scheme)
    if head.host is not None:
        extra += b"X-Forwarded-Host: %s\r\n" % head.host
    if head.te_trailers:
        extra += b"TE: trailers\r\n"
    if upgrade:
        extra += b"Connection: upgrade\r\nUpgrade: %s\r\n" % head.upgrade
    elif head.chunked:
        extra += b"Transfer-Encoding: chunked\r\n"
    return b"%s %s HTTP/1.1%s%s\r\n" % (method, target, head.block, extra)


class ResponseHead:
    """Framing facts of an upstream response, and the header block to relay."""

    __slots__ = ("content_length", "chunked", "block", "close")

    def __init__(self, block: bytes) -> None:
        self.content_length: int | None = None
        self.chunked = False
        self.close = False  # the upstream will close the connection after this response
        self.block = block  # "\r\nName: value" lines, ending with "\r\n"


_RESP_SCAN: Final = re.compile(
    rb"\r\n(" + _HOP_ALT + rb"|x-turnout-version|content-length)[ \t]*:[ \t]*([^\r]*)", re.I
)


def scan_response(block: bytes, keep_upgrade: bool, framing: Framing) -> ResponseHead:
    """`block` is the raw header lines of a response, starting "\\r\\n" (no status
    line); `framing` is what proxy.framing decided from them, the only source of the
    body's length and of the Connection options."""
    head = ResponseHead(block)
    if framing.mode == LENGTH:
        head.content_length = framing.length
    elif framing.mode == CHUNKED:
        head.chunked = True
    tokens = framing.options
    head.close = b"close" in tokens
    hop = 0
    upgrade = None
    for name, value in _RESP_SCAN.findall(block):
        if len(name) == 14 and name.lower() == b"content-length":
            continue  # relayed as it is
        hop += 1
        if len(name) == 7 and name.lower() == b"upgrade":
            upgrade = value
    if hop == 1 and block.find(b"\r\nConnection: keep-alive\r\n") != -1:
        # What most servers send, and the only hop-by-hop line: cut it at C speed.
        head.block = block.replace(b"\r\nConnection: keep-alive", b"", 1)
    elif hop:
        block = _RESP_HOP.sub(b"", block)
        extra = tokens - {b"close", b"keep-alive", b"upgrade", b"content-length"}
        if extra:
            block = _drop_named(block, frozenset(extra))
        if keep_upgrade and upgrade is not None:
            block = block + b"Upgrade: %s\r\n" % upgrade
        head.block = block
    return head


_GRPC_STATUS: Final = re.compile(
    rb"(?:^|\r\n)grpc-status[ \t]*:[ \t]*([0-9]{1,3})[ \t]*(?=\r\n)", re.I
)


def grpc_status(block: bytes) -> int:
    """The `grpc-status` of a head's or a trailer section's lines; -1 when none. A code
    outside gRPC's (0 to 16) is UNKNOWN (2)."""
    m = _GRPC_STATUS.search(block)
    if m is None:
        return -1
    code = int(m.group(1))
    return code if code <= 16 else 2
