"""The framing authority (proxy.framing) without sockets: heads, framing lines, chunks."""

from __future__ import annotations

import pytest

from proxy.framing import (
    CHUNKED,
    LENGTH,
    NONE,
    REQUEST_HEAD,
    RESPONSE_HEAD,
    UNTIL_CLOSE,
    ChunkedReader,
    FramingError,
    head_fault,
    request_framing,
    response_framing,
)

pytestmark = pytest.mark.unit


def block(*lines: bytes) -> bytes:
    return b"".join(b"\r\n" + line for line in lines) + b"\r\n"


# (header lines, expected mode and length, or the status of the refusal)
REQUESTS = [
    ((b"Host: a",), (NONE, 0)),
    ((b"Host: a", b"Content-Length: 5"), (LENGTH, 5)),
    ((b"Host: a", b"content-length:5"), (LENGTH, 5)),
    ((b"Host: a", b"Content-Length: 0"), (NONE, 0)),
    ((b"Host: a", b"Transfer-Encoding: chunked"), (CHUNKED, 0)),
    ((b"Host: a", b"Transfer-Encoding: Chunked "), (CHUNKED, 0)),
    ((b"Content-Length: 5", b"Content-Length: 5"), 400),
    ((b"Content-Length: 5", b"Content-Length: 6"), 400),
    ((b"Content-Length: 5, 5",), 400),
    ((b"Content-Length: +5",), 400),
    ((b"Content-Length: -1",), 400),
    ((b"Content-Length: 0x5",), 400),
    ((b"Content-Length: 1" + b"0" * 19,), 400),
    ((b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
    ((b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"), 400),
    ((b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
    ((b"Transfer-Encoding: gzip, chunked",), 501),
    ((b"Transfer-Encoding: identity",), 501),
    ((b"Transfer-Encoding: chunked, identity",), 501),
    ((b"Transfer-Encoding: chunked,",), 400),
    ((b"Transfer-Encoding: \x0bchunked",), 400),
    ((b'Transfer-Encoding: "chunked"',), 400),
]


@pytest.mark.parametrize(("lines", "expected"), REQUESTS)
def test_request_framing_from_every_line(lines, expected):
    if isinstance(expected, int):
        with pytest.raises(FramingError) as e:
            request_framing(block(*lines), True)
        assert e.value.status == expected
    else:
        f = request_framing(block(*lines), True)
        assert (f.mode, f.length) == expected


def test_transfer_encoding_in_http10_is_refused():
    with pytest.raises(FramingError):
        request_framing(block(b"Transfer-Encoding: chunked"), False)


def test_connection_options_are_the_union_of_every_line():
    f = request_framing(block(b"Connection: keep-alive", b"connection: X-A, close"), True)
    assert f.options == {b"keep-alive", b"x-a", b"close"}


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost : a\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: a\0\r\n",  # NUL
        b"GET / HTTP/1.1\r\nHo(st: a\r\n",  # not a token
        b"GET / HTTP/1.1\r\n: a\r\n",  # empty name
        b"GET  / HTTP/1.1\r\nHost: a\r\n",  # two spaces
        b"GET /\xff HTTP/1.1\r\nHost: a\r\n",  # obs-text in the target
        b"GET / http/1.1\r\nHost: a\r\n",
        b"GET /\r\n",  # HTTP/0.9
    ],
)
def test_request_heads_outside_the_strict_grammar_are_refused(head):
    assert REQUEST_HEAD.fullmatch(head) is None
    assert head_fault(head)


@pytest.mark.parametrize(
    ("lines", "status", "bodiless", "expected"),
    [
        ((b"Content-Length: 3",), 200, False, (LENGTH, 3)),
        ((b"Content-Length: 3",), 200, True, (NONE, 0)),
        ((b"Content-Length: 3",), 304, False, (NONE, 0)),
        ((b"Transfer-Encoding: chunked",), 200, False, (CHUNKED, 0)),
        ((), 200, False, (UNTIL_CLOSE, 0)),
        ((), 204, False, (NONE, 0)),
        ((b"Content-Length: 3", b"Content-Length: 4"), 200, False, None),
        ((b"Content-Length: 3", b"Content-Length: 3"), 200, False, None),
        ((b"Content-Length: 3", b"Transfer-Encoding: chunked"), 200, False, None),
        ((b"Transfer-Encoding: gzip",), 200, False, None),
        ((b"Content-Length: x",), 200, True, None),
    ],
)
def test_response_framing(lines, status, bodiless, expected):
    if expected is None:
        with pytest.raises(FramingError) as e:
            response_framing(block(*lines), status, bodiless)
        assert e.value.status == 502
    else:
        f = response_framing(block(*lines), status, bodiless)
        assert (f.mode, f.length) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n",
        b"HTTP/1.1 200 O\nK\r\nX: a\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/2 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nX : a\r\n",
    ],
)
def test_response_heads_outside_the_grammar_are_refused(head):
    assert RESPONSE_HEAD.fullmatch(head) is None


def decode(data: bytes, pieces_at: int = 0) -> tuple[bytes, bytes | None]:
    """Feed `data` whole, or in `pieces_at`-byte pieces; the body and what follows."""
    reader = ChunkedReader(400)
    out: list[bytes] = []
    step = pieces_at or len(data)
    rest = None
    for i in range(0, len(data), step):
        rest = reader.feed(data[i : i + step], out)
        if rest is not None:
            rest += data[i + step :]
            break
    return b"".join(out), rest


@pytest.mark.parametrize("step", [0, 1, 2, 3, 7])
def test_chunked_bodies_decode_in_any_pieces(step):
    data = b'5\r\nhello\r\n6;name=v;q="a b"\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT'
    assert decode(data, step) == (b"hello world", b"NEXT")


@pytest.mark.parametrize(
    "data",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
        b"ffffffffffffffffff\r\n",  # more than 16 hex digits
        b"-1\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5 ;x\r\nhello\r\n0\r\n\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"0\r\nX : 1\r\n\r\n",  # a malformed trailer
        b"0\r\nContent-Length: 5\r\n\r\n",  # a framing field as a trailer
        b"0\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5" * 5000 + b"\r\n",  # a size line past its limit
    ],
)
def test_malformed_chunked_bodies_are_refused(data):
    with pytest.raises(FramingError):
        decode(data, 0)
    with pytest.raises(FramingError):
        decode(data, 1)
