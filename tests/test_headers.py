"""Header rewriting, without sockets."""

from __future__ import annotations

import pytest

from proxy.framing import ChunkedReader, FramingError, response_framing
from proxy.headers import (
    HeaderError,
    header_block,
    relayed_trailers,
    request_scanner,
    scan_request,
    scan_response,
    upstream_request,
)
from proxy.leg import sized_response

pytestmark = pytest.mark.unit

WANTED = frozenset({b"x-user-id", b"cookie"})
SCANNER = request_scanner(tuple(sorted(WANTED)))


def relayed(block):
    """A 200 response head's block, as the upstream side reads it."""
    return scan_response(block, False, response_framing(block, 200, False))


def scan(headers):
    return scan_request(header_block(headers), SCANNER)


def test_plain_request_keeps_every_header_and_adds_forwarding():
    head = scan([(b"Host", b"shop.example"), (b"X-User-Id", b"alice"), (b"Accept", b"*/*")])
    assert head.host == b"shop.example"
    assert head.routing == {"x-user-id": "alice"}
    out = upstream_request(b"GET", b"/a?b=1", head, b"10.1.2.3", b"http", False)
    assert out.startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\n")
    assert b"X-User-Id: alice\r\nAccept: */*\r\n" in out
    assert b"X-Forwarded-For: 10.1.2.3\r\n" in out
    assert b"X-Forwarded-Proto: http\r\n" in out
    assert b"X-Forwarded-Host: shop.example\r\n" in out
    assert out.endswith(b"\r\n\r\n")


def test_hop_by_hop_and_connection_listed_headers_are_removed():
    head = scan(
        [
            (b"Host", b"h"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"s"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"gzip"),
            (b"Upgrade", b"h2c"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"X-Keep", b"yes"),
        ]
    )
    out = upstream_request(b"GET", b"/", head, b"127.0.0.1", b"http", False).lower()
    for gone in (
        b"x-secret",
        b"keep-alive:",
        b"proxy-connection",
        b"te:",
        b"upgrade",
        b"https",
        b"evil",
    ):
        assert gone not in out, gone
    assert b"x-keep: yes" in out
    assert b"x-forwarded-for: 1.1.1.1, 127.0.0.1\r\n" in out


def test_te_trailers_is_kept_and_chunked_reframed():
    head = scan([(b"Host", b"h"), (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked")])
    assert head.chunked
    out = upstream_request(b"POST", b"/", head, b"p", b"http", False)
    assert b"TE: trailers\r\n" in out and b"Transfer-Encoding: chunked\r\n" in out


def test_several_cookie_lines_are_one_list():
    head = scan([(b"Host", b"h"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")])
    assert head.routing["cookie"] == "a=1; b=2"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Host", b"a"), (b"Host", b"b")],
        [(b"Host", b"a"), (b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Host", b"a"), (b"Content-Length", b"-1")],
    ],
)
def test_unsafe_requests_are_refused(headers):
    with pytest.raises((HeaderError, FramingError)):
        scan(headers)


def test_upgrade_keeps_upgrade_and_sets_connection():
    head = scan([(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    out = upstream_request(b"GET", b"/ws", head, b"p", b"http", True)
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in out


def test_response_hop_by_hop_removed_and_length_found():
    block = (
        b"\r\nServer: x\r\nContent-Length: 12\r\nConnection: keep-alive, X-Drop\r\n"
        b"X-Drop: 1\r\nKeep-Alive: timeout=5\r\nX-Turnout-Version: spoofed\r\nX-Ok: 1\r\n"
    )
    rh = relayed(block)
    assert rh.content_length == 12 and not rh.chunked
    low = rh.block.lower()
    assert b"connection" not in low and b"x-drop" not in low and b"keep-alive" not in low
    assert b"spoofed" not in low
    assert b"x-ok: 1\r\n" in low and b"content-length: 12\r\n" in low


def test_response_chunked_detected_and_te_removed():
    rh = relayed(b"\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n")
    assert rh.chunked and b"transfer-encoding" not in rh.block.lower()


def test_plain_response_block_untouched():
    block = b"\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    assert relayed(block).block is block


def test_common_keep_alive_line_is_cut_and_the_rest_kept():
    block = b"\r\nServer: nginx\r\nContent-Length: 3\r\nConnection: keep-alive\r\nX-A: 1\r\n"
    rh = relayed(block)
    assert rh.block == b"\r\nServer: nginx\r\nContent-Length: 3\r\nX-A: 1\r\n"
    assert rh.content_length == 3 and not rh.close
    closing = relayed(b"\r\nConnection: close\r\nContent-Length: 0\r\n")
    assert closing.close and b"onnection" not in closing.block


@pytest.mark.parametrize(
    "block",
    [
        b"\r\nContent-Length: 2\nX-A: b\r\n",  # a bare LF
        b"\r\nContent-Length: 2\r\nX-A: b\rX-B: c\r\n",  # a bare CR
        b"\r\nContent-Length: 2\r\nX-A: b\r\n c\r\n",  # a folded line
        b"\r\nContent-Length: 2\r\nX-A: b\0\r\n",  # a NUL
    ],
)
def test_odd_heads_are_refused_every_time(block):
    whole = b"HTTP/1.1 200 OK" + block + b"\r\nok"
    end = whole.find(b"\r\n\r\n")
    assert sized_response(whole, end) is None
    assert sized_response(whole, end) is None  # the remembered verdict is the same


def test_a_sized_response_matches_scan_response_and_its_head_is_remembered():
    block = (
        b"\r\nDate: Sun, 22 Nov 2026 02:16:28 GMT\r\nContent-Length: 5\r\n"
        b"Connection: keep-alive\r\n"
    )
    whole = b"HTTP/1.1 200 OK" + block + b"\r\nhello"
    end = whole.find(b"\r\n\r\n")
    status, sle, first = sized_response(whole, end)
    assert (status, sle) == (200, 15)
    fresh = relayed(block)
    assert (first.content_length, first.chunked, first.close, first.block) == (
        fresh.content_length, fresh.chunked, fresh.close, fresh.block,
    )  # fmt: skip
    again = bytes(bytearray(whole))  # an equal head, not re-scanned
    assert sized_response(again, end)[2] is first
    assert sized_response(whole + b"!", end) is None  # the body must be exactly as long


@pytest.mark.parametrize(
    "whole",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",  # no body by its status
        b"HTTP/1.1 101 Switching\r\nContent-Length: 0\r\n\r\n",  # interim
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",  # not HTTP/1.1
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # not sized
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",  # not a status
    ],
)
def test_other_responses_go_to_the_parser(whole):
    assert sized_response(whole, whole.find(b"\r\n\r\n")) is None


@pytest.mark.parametrize(
    ("headers", "length", "chunked"),
    [
        ([(b"Host", b"a"), (b"cOnTeNt-LeNgTh", b"5")], 5, False),
        ([(b"Host", b"a"), (b"TRANSFER-ENCODING", b"chunked")], None, True),
        ([(b"Host", b"a"), (b"X-A", b"content-length: 5")], None, False),  # a value, not a line
    ],
)
def test_framing_lines_are_found_whatever_their_case(headers, length, chunked):
    head = scan(headers)
    assert (head.content_length, head.chunked) == (length, chunked)


def test_framing_lines_in_any_case_still_conflict():
    with pytest.raises(FramingError):
        scan([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked"), (b"transfer-ENCODING", b"x")])


def test_the_scanner_finds_every_name_it_looks_for_in_any_spelling_and_only_those():
    scanner = request_scanner((b"x-user-id", b"x-tenant"))
    names = sorted(scanner.wanted | {b"host", b"content-length", b"expect", b"te", b"trailer",
                                     b"transfer-encoding", b"x-forwarded-for"})  # fmt: skip
    for n in names:
        for spelled in {n, n.upper(), n.title(), n[:1].upper() + n[1:]}:
            block = b"\r\n" + spelled + b": v\r\n"
            assert scanner.pattern.findall(block) == [(spelled, b"v")]
    # prefixes and extensions of names it looks for are other headers
    for other in (b"t", b"tex", b"hos", b"hosts", b"x-user", b"x-user-idx", b"content-len"):
        assert scanner.pattern.findall(b"\r\n" + other + b": v\r\n") == []


def test_a_name_is_judged_the_same_however_it_is_spelled_and_the_memory_is_bounded():
    from proxy.headers import SPELLINGS_MAX

    scanner = request_scanner((b"x-user-id",))
    with pytest.raises(HeaderError):  # two Host lines, spelled differently
        scan_request(b"\r\nHost: a\r\nHOST: b\r\n", scanner)
    head = scan_request(b"\r\nx-USER-id: alice\r\ncontent-LENGTH: 3\r\n", scanner)
    assert head.routing == {"x-user-id": "alice"} and head.content_length == 3
    assert set(scanner.spellings) == {b"Host", b"HOST", b"x-USER-id", b"content-LENGTH"}
    # an attacker sending ever new spellings only makes the memory start afresh
    for i in range(3 * SPELLINGS_MAX):
        spelled = bytes(c ^ 0x20 if (i >> k) & 1 else c for k, c in enumerate(b"connection"))
        scan_request(b"\r\n" + spelled + b": close\r\nHost: a\r\n", scanner)
        assert len(scanner.spellings) <= SPELLINGS_MAX
    head = scan_request(b"\r\nCoNNection: close\r\nHost: a\r\n", scanner)
    assert head.special and head.framing.options == frozenset({b"close"})


def test_relayed_trailers_drop_hop_by_hop_fields_and_the_version_header() -> None:
    block = (
        b"grpc-status: 0\r\nConnection: close\r\nTE: trailers\r\n"
        b"X-Turnout-Version: forged\r\nX-Checksum: abc\r\n"
    )
    assert relayed_trailers(block) == b"grpc-status: 0\r\nX-Checksum: abc\r\n"
    assert relayed_trailers(b"Keep-Alive: 5\r\n") == b""
    assert relayed_trailers(b"grpc-message: a b\r\n") == b"grpc-message: a b\r\n"


def test_the_chunked_reader_keeps_checked_trailer_lines() -> None:
    reader = ChunkedReader(502)
    out: list[bytes] = []
    rest = reader.feed(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nX-A: b\r\n\r\nNEXT", out)
    assert out == [b"abc"] and rest == b"NEXT"
    assert reader.kept == b"grpc-status: 0\r\nX-A: b\r\n"
    split = ChunkedReader(502)
    for piece in (b"0\r\ngrpc-sta", b"tus: 2\r", b"\n\r\n"):
        split.feed(piece, out)
    assert split.done() and split.kept == b"grpc-status: 2\r\n"
