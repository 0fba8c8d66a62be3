"""The exchange's phases and their transition tables, and the client framing decision."""

from __future__ import annotations

import itertools

import pytest

from proxy import answers, phases
from proxy.phases import (
    ENDED,
    REQUEST_NEXT,
    RESPONSE_NEXT,
    PhaseError,
    RequestPhase,
    ResponsePhase,
    request_to,
    response_to,
)

pytestmark = pytest.mark.unit

R, S = RequestPhase, ResponsePhase


def _reachable(table: dict, start) -> set:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("table, enum", [(REQUEST_NEXT, R), (RESPONSE_NEXT, S)])
def test_every_phase_has_a_row_and_the_rows_name_only_phases(table, enum):
    assert set(table) == set(enum)
    assert all(nxt in enum and nxt != phase for phase, row in table.items() for nxt in row)


@pytest.mark.parametrize("table, start", [(REQUEST_NEXT, R.BUFFERING), (RESPONSE_NEXT, S.AWAITING)])
def test_every_phase_is_reachable_from_the_first(table, start):
    assert _reachable(table, start) == set(table)


def test_the_endings_of_a_response_have_no_way_out_and_every_other_phase_reaches_one():
    endings = {p for p in S if p >= ENDED}
    assert endings == {S.TUNNEL, S.COMPLETE, S.FAILED, S.CANCELLED}
    for phase in S:
        if phase in endings:
            assert RESPONSE_NEXT[phase] == frozenset()
        else:
            assert _reachable(RESPONSE_NEXT, phase) & endings
            # a client can always go away, and a failure can always be answered
            assert {S.FAILED, S.CANCELLED} <= RESPONSE_NEXT[phase]


def test_a_request_ends_sent_switched_or_dropped_and_can_always_be_dropped():
    finals = {p for p in R if not REQUEST_NEXT[p]}
    assert finals == {R.SWITCHED, R.DROPPED}
    for phase in R:
        if phase not in finals:
            assert R.DROPPED in REQUEST_NEXT[phase]


def test_only_a_request_sent_whole_may_switch_protocols_or_be_sent_again():
    assert [p for p in R if R.SWITCHED in REQUEST_NEXT[p]] == [R.SENT]
    # the stale pooled connection: back to BUFFERED, the only way backwards from SENT
    assert REQUEST_NEXT[R.SENT] - {R.SWITCHED, R.DROPPED} == {R.BUFFERED}


def test_a_body_sent_on_the_wire_never_goes_back_to_the_buffer():
    assert R.BUFFERING not in REQUEST_NEXT[R.STREAMING] | REQUEST_NEXT[R.SENT]


@pytest.mark.parametrize(
    "move, enum, table",
    [(request_to, R, REQUEST_NEXT), (response_to, S, RESPONSE_NEXT)],
)
def test_the_checks_allow_exactly_the_table(move, enum, table):
    for old, new in itertools.product(enum, enum):
        if new in table[old]:
            assert move(int(old), int(new)) == new
        else:
            with pytest.raises(PhaseError, match=f"{old.name} -> {new.name}"):
                move(int(old), int(new))


def test_the_native_constants_are_the_enum_values():
    for enum in (R, S):
        for member in enum:
            assert getattr(phases, member.name) == member.value


# -- client_framing: how a relayed response is framed towards the client ---------------

C, K, U = b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Connection: upgrade\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
LENGTH, CHUNKED, UNTIL_CLOSE, NONE = (
    answers.LENGTH,
    answers.CHUNKED,
    answers.UNTIL_CLOSE,
    answers.NONE,
)

# status, sized, head_request, http11, upgrade_asked, upgrading, close -> mode, lines, closes
FRAMING = [
    # a sized body is relayed as it is
    (200, True, False, True, False, False, False, LENGTH, b"", False),
    (200, True, False, True, False, False, True, LENGTH, C, True),
    (200, True, False, False, False, False, False, LENGTH, K, False),
    (200, True, False, False, False, False, True, LENGTH, C, True),
    # unsized: chunked to HTTP/1.1, until close to HTTP/1.0
    (200, False, False, True, False, False, False, CHUNKED, TE, False),
    (200, False, False, True, False, False, True, CHUNKED, TE + C, True),
    (200, False, False, False, False, False, False, UNTIL_CLOSE, C, True),
    # no body: HEAD, 204, 304, whatever the upstream's framing said
    (200, True, True, True, False, False, False, NONE, b"", False),
    (200, False, True, True, False, False, False, NONE, b"", False),
    (204, False, False, True, False, False, False, NONE, b"", False),
    (304, True, False, False, False, False, False, NONE, K, False),
    (304, False, False, True, False, False, True, NONE, C, True),
    # a switch of protocols: Connection: upgrade, no Connection: close even when closing
    (101, False, False, True, True, True, False, NONE, U, False),
    (101, False, False, True, True, True, True, NONE, U, True),
    # an upgrade the upstream refused: the client connection closes
    (200, True, False, True, True, False, False, LENGTH, C, True),
    (400, False, False, True, True, False, False, CHUNKED, TE + C, True),
]


@pytest.mark.parametrize(
    "status, sized, head, http11, asked, upgrading, close, mode, lines, closes", FRAMING
)
def test_client_framing(status, sized, head, http11, asked, upgrading, close, mode, lines, closes):
    got = answers.client_framing(status, sized, head, http11, asked, upgrading, close)
    assert got == (mode, lines, closes)


def test_a_proxy_made_error_names_the_version_and_the_cause_and_closes():
    data = answers.error_response(502, "green", "connect failed: refused", True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    assert b"Connection: close" in head and b"X-Turnout-Version: green" in head
    assert (
        body
        == b'{"error": "Bad Gateway", "version": "green", "cause": "connect failed: refused"}\n'
    )
    assert b"Content-Length: %d" % len(body) in head
    only_head = answers.error_response(502, "green", "x", False, head_only=True)
    assert only_head.endswith(b"\r\n\r\n") and b"X-Turnout-Version" not in only_head
