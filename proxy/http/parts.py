"""An HTTP/1.1 message the proxy wrote itself, read back into its parts.

Where HTTP/2 meets the exchange, the exchange still speaks HTTP/1.1: it writes a
response to an HTTP/2 client (proxy.http.h2) and a request to an HTTP/2 upstream
(proxy.http.h2up) as the bytes it would write to a socket. `PartsReader` reads
those bytes back into a head, body pieces and trailers, for the side that sends
them as frames.

Rules:
- The bytes are the proxy's own: framed by Content-Length, chunked, or with no
  body, as proxy.answers and proxy.headers make them. This is not a parser of
  hostile input; it still stops at anything it does not expect rather than guess.
- Field names are given in lower case, without the hop-by-hop ones (HTTP/2 has
  none); `te: trailers` is kept (HTTP/2 allows it, and gRPC needs it).
- The `PartsSink` decides how the body after a head is framed (`head` returns
  it): a request and a response differ (an answer to HEAD has none, a request
  without framing has none, a response without framing runs to its end).
"""

from __future__ import annotations

from typing import Final, Protocol

from ..headers import HOP_BY_HOP

# What PartsSink.head returns: how the body after the head is framed (or a length).
ANOTHER_HEAD: Final = -3  # an interim (1xx) head: the final head follows
CHUNKED_BODY: Final = -2
UNTIL_END: Final = -1  # the body ends when the writer says so (`finish`)
NO_BODY: Final = 0

# What PartsReader expects next.
_HEAD: Final = 0
_LENGTH: Final = 1  # `left` bytes of a Content-Length body
_SIZE: Final = 2  # a chunk-size line
_DATA: Final = 3  # `left` bytes of a chunk
_CRLF: Final = 4  # the CRLF after a chunk
_TRAILERS: Final = 5  # the trailer section after the last chunk
_UNTIL: Final = 6  # a body that ends with the writer
_DONE: Final = 7

Fields = list[tuple[bytes, bytes]]


class PartsSink(Protocol):
    """Where a PartsReader delivers a message's parts, in order."""

    def head(self, line: bytes, found: Fields, length: int, chunked: bool) -> int:
        """The first line, the fields, the Content-Length (-1: none) and whether the body
        is chunked; returns the body's framing (the constants above, or a length)."""
        ...

    def body(self, data: bytes) -> None: ...

    def ended(self, trailer_fields: Fields | None) -> None:
        """The message is whole; `trailer_fields`: a chunked body's trailers, if any."""
        ...


def fields(block: bytes, start: int) -> Fields:
    """The fields of a head's lines (each ending CRLF) from `start`, named in lower
    case, without the hop-by-hop ones (but `te: trailers`)."""
    return read_fields(block, start)[0]


def read_fields(block: bytes, start: int) -> tuple[Fields, int, bool]:
    """(the fields, as `fields` gives them; the Content-Length or -1; whether the body
    is chunked), in one pass over the lines."""
    out: Fields = []
    length = -1
    chunked = False
    for line in block[start:].split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        if name and (name not in HOP_BY_HOP or (name == b"te" and value == b"trailers")):
            out.append((name, value))
    return out, length, chunked


class PartsReader:
    """Reads one message (after interim heads) from the bytes fed to it."""

    __slots__ = ("sink", "state", "left", "buf")

    def __init__(self, sink: PartsSink) -> None:
        self.sink = sink
        self.state = _HEAD
        self.left = 0
        self.buf = b""

    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        size = len(buf)
        while pos < size:
            state = self.state
            if state in (_LENGTH, _DATA):
                n = min(self.left, size - pos)
                self.sink.body(buf[pos : pos + n])
                self.left -= n
                pos += n
                if not self.left:
                    if state == _DATA:
                        self.state = _CRLF
                    else:
                        self.state = _DONE
                        self.sink.ended(None)
            elif state in (_HEAD, _TRAILERS):
                if state == _TRAILERS and buf.startswith(b"\r\n", pos):
                    pos += 2
                    self.state = _DONE
                    self.sink.ended(None)
                    continue
                end = buf.find(b"\r\n\r\n", pos)
                if end == -1:
                    break
                block = buf[pos : end + 2]
                pos = end + 4
                if state == _HEAD:
                    self.head(block)
                else:
                    self.state = _DONE
                    self.sink.ended(fields(block, 0))
            elif state == _SIZE:
                nl = buf.find(b"\r\n", pos)
                if nl == -1:
                    break
                n = int(buf[pos:nl].split(b";", 1)[0], 16)
                pos = nl + 2
                self.state = _DATA if n else _TRAILERS
                self.left = n
            elif state == _CRLF:
                if size - pos < 2:
                    break
                pos += 2
                self.state = _SIZE
            elif state == _UNTIL:
                self.sink.body(buf[pos:])
                pos = size
            else:
                pos = size  # _DONE: nothing more belongs to this message
        self.buf = buf[pos:]

    def head(self, block: bytes) -> None:
        sle = block.find(b"\r\n")
        found, length, chunked = read_fields(block, sle + 2)
        mode = self.sink.head(block[:sle], found, length, chunked)
        if mode == ANOTHER_HEAD:
            return
        if mode == CHUNKED_BODY:
            self.state = _SIZE
        elif mode == UNTIL_END:
            self.state = _UNTIL
        elif mode > 0:
            self.state = _LENGTH
            self.left = mode
        else:
            self.state = _DONE  # the sink's head ended the message

    def finish(self) -> None:
        """The writer is done: a body that ran until then ends here."""
        if self.state == _UNTIL:
            self.state = _DONE
            self.sink.ended(None)
