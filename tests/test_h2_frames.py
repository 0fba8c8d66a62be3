"""HTTP/2 frame sequences in the manner of h2spec's cases (RFC 9113 section by section),
sent as raw bytes after a hand-made preface: each must end as the RFC says (a GOAWAY
or a RST_STREAM with the right error code, or nothing at all, the connection still
answering a PING), and nothing malformed may reach the upstream."""

from __future__ import annotations

import asyncio
import struct

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

from .conftest import LOOPBACK, versions_config

pytestmark = pytest.mark.live

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def raw(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame as bytes, whatever it says (hyperframe would refuse some)."""
    return (
        struct.pack("!I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack("!I", sid)
        + payload
    )


def headers(sid: int, fields=GET, end: bool = True, encoder: Encoder | None = None) -> bytes:
    frame = HeadersFrame(sid)
    frame.data = (encoder or Encoder()).encode(fields)
    frame.flags.add("END_HEADERS")
    if end:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def data(sid: int, payload: bytes, end: bool = False) -> bytes:
    frame = DataFrame(sid)
    frame.data = payload
    if end:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def window(sid: int, increment: int) -> bytes:
    return raw(0x8, 0, sid, struct.pack("!I", increment))


# (case, frames after the preface, the outcome: ("goaway" | "rst", code) or ("alive",))
CASES = [
    ("3.4 a preface not followed by SETTINGS", [PingFrame(0).serialize()], ("goaway", 1)),
    ("4.2 a frame over SETTINGS_MAX_FRAME_SIZE", [data(1, b"x" * 16_385)], ("goaway", 6)),
    ("5.1 DATA on an idle stream", [data(1, b"x")], ("goaway", 1)),
    ("5.1.1 a stream id the client may not use (even)", [headers(2)], ("goaway", 1)),
    ("5.1.1 a stream id lower than one used", [headers(5), headers(3)], ("goaway", 1)),
    ("5.1 RST_STREAM on an idle stream", [RstStreamFrame(1).serialize()], ("goaway", 1)),
    ("5.1 DATA after END_STREAM", [headers(1), data(1, b"x")], ("rst_or_goaway", 5)),
    (
        "5.3.1 a stream that depends on itself",
        [PriorityFrame(1, depends_on=1).serialize()],
        ("rst_or_goaway", 1),
    ),
    ("5.5 an unknown frame type is ignored", [raw(0xBE, 0, 0, b"what")], ("alive",)),
    ("6.1 DATA on stream 0", [raw(0x0, 0, 0, b"x")], ("goaway", 1)),
    ("6.2 HEADERS on stream 0", [raw(0x1, 0x4, 0, b"\x82")], ("goaway", 1)),
    (
        "6.4 RST_STREAM of 3 bytes",
        [headers(1, end=False), raw(0x3, 0, 1, b"\x00\x00\x08")],
        ("goaway", 6),
    ),
    # RFC 9113 asks for FRAME_SIZE_ERROR here, and COMPRESSION_ERROR for bad HPACK below:
    # the h2 library answers both with PROTOCOL_ERROR (the connection ends all the same).
    ("6.5 SETTINGS with an ACK and a payload", [raw(0x4, 0x1, 0, b"\x00" * 6)], ("goaway", 1)),
    ("6.5 SETTINGS of 5 bytes", [raw(0x4, 0, 0, b"\x00" * 5)], ("goaway", 6)),
    (
        "6.5.2 SETTINGS_ENABLE_PUSH of 2",
        [raw(0x4, 0, 0, b"\x00\x02\x00\x00\x00\x02")],
        ("goaway", 1),
    ),
    (
        "6.5.2 SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
        [raw(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00")],
        ("goaway", 3),
    ),
    (
        "6.5.2 SETTINGS_MAX_FRAME_SIZE under 16384",
        [raw(0x4, 0, 0, b"\x00\x05\x00\x00\x3f\xff")],
        ("goaway", 1),
    ),
    (
        "6.5.2 an unknown setting is ignored",
        [raw(0x4, 0, 0, b"\x00\xff\x00\x00\x00\x01")],
        ("alive",),
    ),
    ("6.7 PING of 6 bytes", [raw(0x6, 0, 0, b"\x00" * 6)], ("goaway", 6)),
    ("6.7 PING on a stream", [raw(0x6, 0, 1, b"\x00" * 8)], ("goaway", 1)),
    ("6.9 WINDOW_UPDATE of 0 on the connection", [window(0, 0)], ("goaway", 1)),
    ("6.9.1 a connection window past 2^31-1", [window(0, 2**31 - 1)], ("goaway", 3)),
    ("6.10 CONTINUATION without HEADERS", [ContinuationFrame(1).serialize()], ("goaway", 1)),
    (
        "6.10 another frame inside a header block",
        [raw(0x1, 0, 1, Encoder().encode(GET)), PingFrame(0).serialize()],
        ("goaway", 1),
    ),
    (
        "4.3 a header block HPACK cannot decode",
        [raw(0x1, 0x5, 1, b"\xff\xff\xff\xff")],
        ("goaway", 1),
    ),
    (
        "8.2.1 an upper-case field name",
        [headers(1, [*GET, (b"X-Upper", b"v")])],
        ("rst_or_goaway", 1),
    ),
    (
        "8.2.2 a connection-specific field",
        [headers(1, [*GET, (b"connection", b"close")])],
        ("rst_or_goaway", 1),
    ),
    ("8.2.2 TE other than trailers", [headers(1, [*GET, (b"te", b"gzip")])], ("rst_or_goaway", 1)),
    (
        "8.3 a pseudo-header after a field",
        [headers(1, [*GET[:3], (b"x", b"y"), GET[3]])],
        ("rst_or_goaway", 1),
    ),
    ("8.3.1 no :path", [headers(1, GET[:3])], ("rst_or_goaway", 1)),
    (
        "8.3.1 an unknown pseudo-header",
        [headers(1, [*GET, (b":nope", b"v")])],
        ("rst_or_goaway", 1),
    ),
    ("8.3.1 :method twice", [headers(1, [*GET, (b":method", b"POST")])], ("rst_or_goaway", 1)),
    (
        "8.1.1 content-length shorter than DATA",
        [headers(1, [*GET, (b"content-length", b"1")], end=False), data(1, b"xy", end=True)],
        ("rst_or_goaway", 1),
    ),
]


async def read_frames(
    reader: asyncio.StreamReader, until: float
) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame read, up to a GOAWAY, a RST_STREAM,
    shortly after the ACK of our PING, EOF or `until` (the loop's clock)."""
    frames = []
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            head = await asyncio.wait_for(reader.readexactly(9), until - loop.time())
            frame, length = Frame.parse_frame_header(memoryview(head))
            payload = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            break
        kind = head[3]
        frames.append((kind, head[4], frame.stream_id, payload))
        if kind in (0x7, 0x3):
            break
        if kind == 0x6 and head[4] & 0x1 and payload == b"turnout!":
            # Our PING's ACK: h2 writes the ACKs of what it read before a GOAWAY that
            # follows them; a little longer for one.
            until = min(until, loop.time() + 0.3)
    return frames


@pytest.fixture
async def proxy(proxies, blue, green):
    return await proxies.start(versions_config(blue.url, green.url, http2={"cleartext": True}))


@pytest.mark.parametrize(("case", "frames", "outcome"), CASES, ids=[c[0] for c in CASES])
async def test_frame_sequences(proxy, blue, case, frames, outcome):
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        hello = b"" if case.startswith("3.4") else SettingsFrame(0).serialize()
        writer.write(PREFACE + hello)
        ack = SettingsFrame(0)
        ack.flags.add("ACK")
        if hello:
            writer.write(ack.serialize())
        writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))
        ping = PingFrame(0)
        ping.opaque_data = b"turnout!"
        writer.write(ping.serialize())  # answered (ACK) only if the connection lives on
        until = asyncio.get_running_loop().time() + 5
        got = await read_frames(reader, until)
    finally:
        writer.close()
    kinds = [(kind, sid) for kind, _, sid, _ in got]
    goaway = [payload for kind, _, _, payload in got if kind == 0x7]
    resets = [payload for kind, _, _, payload in got if kind == 0x3]
    alive = any(kind == 0x6 and flags & 0x1 for kind, flags, _, _ in got)
    if outcome[0] == "alive":
        assert alive and not goaway and not resets, kinds
        return
    code = outcome[1]
    codes = [struct.unpack("!I", p[4:8])[0] for p in goaway] + [
        struct.unpack("!I", p[:4])[0] for p in resets
    ]
    if outcome[0] == "goaway":
        assert goaway, kinds
        assert struct.unpack("!I", goaway[0][4:8])[0] == code, (ErrorCodes(code), codes)
    else:  # a stream error, or the connection error h2 makes of it (RFC 9113 §5.4.1)
        assert codes and codes[0] in (code, ErrorCodes.PROTOCOL_ERROR), codes
    # Nothing malformed was forwarded (a valid GET before a later fault may be).
    assert all(r.path == "/" and r.method == "GET" for r in blue.requests)
    assert not any(r.header("X-Upper") or r.header("te") for r in blue.requests)
