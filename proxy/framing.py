"""HTTP/1.1 framing: the one place that decides whether a message is acceptable
and where its body ends, for requests from clients and responses from upstreams.

Rules:
- A head is accepted only in the strict grammar of RFC 9112: CRLF line ends,
  token header names directly followed by the colon, values of visible ASCII,
  obs-text, SP and HTAB. Bare CR or LF, obs-fold, NUL and other controls,
  whitespace before a colon: rejected, never repaired.
- The body's length comes from every framing line of the head, all at once:
  at most one `Content-Length` (digits only) or one `Transfer-Encoding` whose
  value is exactly `chunked`, never both. Anything else is rejected, so no
  reader of the same bytes (the upstream, another proxy) can frame them
  differently from Turnout.
- Chunked bodies are decoded strictly: hex sizes of at most 16 digits,
  well-formed extensions (dropped), CRLF after every size line and every
  chunk, trailer lines in the header grammar (dropped) and none of them a
  framing field.
- Connection options are the union of every `Connection` line.
Pure functions and one small decoder; no I/O. A rejection is a `FramingError`
carrying the status to answer (requests) and a short cause.
"""

from __future__ import annotations

import re
from typing import Final

TOKEN: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# One header line as it follows the previous line's CRLF (values are trimmed later).
# The quantifiers of the heads are possessive (`++`, `*+`): each class stops at a
# byte the next part must start with (a token at ":" or SP, a value at CR), so
# giving bytes back could never make a match, and not keeping the means to do it
# makes the check of every head cheaper.
_TOKEN_P: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_FIELD: Final = rb"\r\n" + _TOKEN_P + rb":[\t -~\x80-\xff]*+"

# A request head: request line and header lines, without the blank line's CRLF.
REQUEST_HEAD: Final = re.compile(
    rb"(" + _TOKEN_P + rb") ([!-~]++) HTTP/([0-9])\.([0-9])((?:" + _FIELD + rb")*+)\r\n"
)
# A response head likewise; a missing reason phrase (and its SP) is tolerated.
RESPONSE_HEAD: Final = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t -~\x80-\xff]*+)?+((?:" + _FIELD + rb")*+)\r\n"
)
_FRAMING_LINE: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*?)[ \t]*(?=\r\n)", re.I
)
_CODINGS: Final = re.compile(TOKEN + rb"(?:[ \t]*,[ \t]*" + TOKEN + rb")*")
_QUOTED: Final = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_EXT: Final = rb"(?:;" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + _QUOTED + rb"))?)*"
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})" + _CHUNK_EXT)
_FIELD_RE: Final = re.compile(TOKEN + rb":[\t -~\x80-\xff]*")

MAX_CHUNK_LINE: Final = 4096  # a chunk-size line with its extensions
MAX_TRAILERS: Final = 16384  # all trailer lines of one body

# Body framing.
NONE: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

# ChunkedReader states.
_IN_SIZE: Final = 0
_IN_DATA: Final = 1
_IN_DATA_END: Final = 2
_IN_TRAILER: Final = 3
_IN_DONE: Final = 4


class FramingError(ValueError):
    """A message that must not be forwarded: `status` for a request's answer."""

    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause


class Framing:
    """What every framing line of a head says, taken together."""

    __slots__ = ("mode", "length", "options")

    def __init__(self, mode: int, length: int, options: frozenset[bytes]) -> None:
        self.mode = mode  # NONE, LENGTH, CHUNKED or UNTIL_CLOSE
        self.length = length  # the body's length in LENGTH mode
        self.options = options  # lower-case tokens of every Connection line

    def keep_alive(self, http11: bool) -> bool:
        """Whether the connection stays open after this message (RFC 9112 §9.3)."""
        options = self.options
        if b"close" in options:
            return False
        return http11 or b"keep-alive" in options


_NO_OPTIONS: Final[frozenset[bytes]] = frozenset()
PLAIN: Final = Framing(NONE, 0, _NO_OPTIONS)


def framing_lines(block: bytes) -> tuple[list[bytes], list[bytes], frozenset[bytes]]:
    """Every Content-Length and Transfer-Encoding value, and the Connection options."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    options: frozenset[bytes] = _NO_OPTIONS
    for name, value in _FRAMING_LINE.findall(block):
        kind = len(name)
        if kind == 14:  # content-length
            lengths.append(value)
        elif kind == 17:  # transfer-encoding
            codings.append(value)
        else:
            options = options | frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
    return lengths, codings, options


def _length(values: list[bytes], status: int, what: str) -> int:
    if len(values) > 1:
        raise FramingError(status, f"more than one Content-Length in the {what}")
    value = values[0]
    if not value.isdigit() or len(value) > 18:
        raise FramingError(status, f"invalid Content-Length in the {what}")
    return int(value)


def _chunked(codings: list[bytes], status: int, what: str) -> None:
    if len(codings) > 1:
        raise FramingError(status, f"more than one Transfer-Encoding line in the {what}")
    value = codings[0]
    if value.lower() == b"chunked":
        return
    if status != 502 and _CODINGS.fullmatch(value):
        raise FramingError(501, f"unsupported transfer coding {value[:40]!r}")
    raise FramingError(status, f"invalid Transfer-Encoding in the {what}")


def judge_request(
    lengths: list[bytes], codings: list[bytes], options: frozenset[bytes], http11: bool
) -> Framing:
    """How long a request body is, from the values of every Content-Length and
    Transfer-Encoding line of its head and its Connection options."""
    if codings:
        if lengths:
            raise FramingError(400, "both Content-Length and Transfer-Encoding")
        if not http11:
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        _chunked(codings, 400, "request")
        return Framing(CHUNKED, 0, options)
    if lengths:
        n = _length(lengths, 400, "request")
        return Framing(LENGTH if n else NONE, n, options)
    return Framing(NONE, 0, options) if options else PLAIN


def request_framing(block: bytes, http11: bool) -> Framing:
    """`judge_request` for a strict head's header `block` on its own. (The client
    side gets the same lines from the one scan it makes of a head: see
    headers.scan_request.)"""
    lengths, codings, options = framing_lines(block)
    return judge_request(lengths, codings, options, http11)


def response_framing(block: bytes, status: int, bodiless: bool) -> Framing:
    """How the body of an upstream response ends; `bodiless`: an answer to HEAD."""
    lengths, codings, options = framing_lines(block)
    if codings and lengths:
        raise FramingError(502, "both Content-Length and Transfer-Encoding in the response")
    if codings:
        _chunked(codings, 502, "response")
    n = _length(lengths, 502, "response") if lengths else 0
    if bodiless or status < 200 or status in (204, 304):
        return Framing(NONE, 0, options)
    if codings:
        return Framing(CHUNKED, 0, options)
    if lengths:  # LENGTH even at 0: the Content-Length line is relayed as the framing
        return Framing(LENGTH, n, options)
    return Framing(UNTIL_CLOSE, 0, options)


def bare_lf_end(buf: bytes | bytearray, old: int) -> bool:
    """An unfinished head already ended by bare LFs, which would otherwise wait for a
    CRLF that never comes; only the bytes after the first `old` (those already
    looked at) are searched, so a head trickled in pieces costs linear time."""
    start = max(0, old - 2)
    return buf.find(b"\n\n", start) != -1 or buf.find(b"\n\r\n", start) != -1


def head_fault(head: bytes) -> str:
    """Why a head (request or response) failed the strict grammar, for the error."""
    first = head.find(b"\r\n")
    if b"\0" in head:
        return "NUL in the head"
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return "bare CR or LF in the head"
    lines = head[first + 2 :].split(b"\r\n") if first != -1 else []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding"
        name, colon, _ = line.partition(b":")
        if not colon:
            return "header line without a colon"
        if name[-1:] in (b" ", b"\t"):
            return "whitespace before a header colon"
        if not re.fullmatch(TOKEN, name):
            return "invalid header name"
        if line and not _FIELD_RE.fullmatch(line):
            return "control character in a header value"
    return "invalid start line"


class ChunkedReader:
    """Decodes one chunked body, strictly, as its bytes arrive."""

    __slots__ = ("state", "left", "line", "trailers", "status", "limit", "declared", "kept")

    def __init__(self, status: int, limit: int = 0) -> None:
        self.limit = limit  # the most body bytes its chunk sizes may add up to; 0: no limit
        self.declared = 0  # what the chunk sizes so far add up to
        self.state = _IN_SIZE
        self.left = 0  # bytes of the current chunk still to come
        self.line = b""  # a size or trailer line still being received
        self.trailers = 0
        self.kept = b""  # the trailer lines, each with its CRLF (checked as each arrives)
        self.status = status  # answered on a fault: 400 (request) or 502 (response)

    def feed(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Append the body's data pieces to `out`; the bytes after the body once it has
        ended (b"" when none), else None. Raises FramingError."""
        i = 0
        n = len(data)
        while i < n:
            state = self.state
            if state == _IN_DATA:
                take = min(self.left, n - i)
                out.append(data[i : i + take])
                i += take
                self.left -= take
                if not self.left:
                    self.state = _IN_DATA_END
                continue
            if state == _IN_DATA_END:
                got = self.line + data[i : i + 2 - len(self.line)]
                i += len(got) - len(self.line)
                if got != b"\r\n"[: len(got)]:
                    raise FramingError(self.status, "chunk data not followed by CRLF")
                self.line = b"" if len(got) == 2 else got
                if len(got) == 2:
                    self.state = _IN_SIZE
                continue
            end = data.find(b"\n", i)
            if end == -1:
                self.line += data[i:]
                self.check_line_size()
                return None
            line = self.line + data[i : end + 1]
            self.line = b""
            i = end + 1
            self.check_line_size(line)
            if line[-2:] != b"\r\n" or line.find(b"\r", 0, len(line) - 2) != -1:
                raise FramingError(self.status, "bare CR or LF in chunked framing")
            if state == _IN_SIZE:
                self.size_line(line[:-2])
            elif len(line) == 2:
                self.state = _IN_DONE
                return data[i:]
            elif not _FIELD_RE.fullmatch(line[:-2]):
                raise FramingError(self.status, "malformed trailer line")
            elif line[:15].lower() == b"content-length:" or line[:18].lower() == (
                b"transfer-encoding:"
            ):
                # Framing fields may not be trailers (RFC 9110 §6.5.1): no reader may
                # take one for the framing of anything.
                raise FramingError(self.status, "a framing field among the trailers")
            else:
                self.kept += line
        return None

    def done(self) -> bool:
        return self.state == _IN_DONE

    def check_line_size(self, line: bytes | None = None) -> None:
        size = len(self.line if line is None else line)
        if self.state == _IN_SIZE and size > MAX_CHUNK_LINE:
            raise FramingError(self.status, "chunk-size line too long")
        if self.state == _IN_TRAILER:
            if line is not None:
                self.trailers += size
            if self.trailers + len(self.line) > MAX_TRAILERS:
                raise FramingError(self.status, "trailers too large")

    def size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE.fullmatch(line)
        if m is None:
            raise FramingError(self.status, "malformed chunk size")
        size = int(m.group(1), 16)
        self.declared += size
        if self.limit and self.declared > self.limit:
            # Refused when announced, not after waiting for bytes that may never come.
            raise FramingError(413, "request body exceeds max_body_bytes")
        if size:
            self.left = size
            self.state = _IN_DATA
        else:
            self.state = _IN_TRAILER
