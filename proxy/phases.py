"""The phases of one exchange, and the transitions between them, as data.

An exchange has two sides, each in exactly one phase at a time:

- the **request** side (client -> upstream) says where the request is: read
  in part or whole, held, on an upstream connection, switched to a tunnel;
- the **response** side (upstream -> client) says what the client has been
  sent: nothing yet, a head held back to go out with the first body bytes,
  the head and part of the body, or an ending.

`REQUEST_NEXT` and `RESPONSE_NEXT` list every transition allowed; the
exchange moves only through `request_to` / `response_to`, which refuse any
other (`PhaseError`: a bug, never an input problem). Phases are small ints so
that the compiled exchange compares native integers; `RequestPhase` and
`ResponsePhase` name them for tables, tests and messages. The response
phases from TUNNEL on are the exchange's endings: it has been counted once.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# -- request phases ---------------------------------------------------------------------
BUFFERING: Final = 0  # no upstream connection yet; body bytes still arriving are kept
BUFFERED: Final = 1  # no upstream connection yet; the request was read whole
HELD: Final = 2  # a chunked body is read whole (or past the buffer) before it is sent
STREAMING: Final = 3  # on an upstream connection; body bytes go on as they arrive
SENT: Final = 4  # on an upstream connection, read whole and sent
SWITCHED: Final = 5  # the upstream switched protocols: bytes pass both ways
DROPPED: Final = 6  # the exchange ended before its request was sent whole

# -- response phases --------------------------------------------------------------------
AWAITING: Final = 0  # no final head yet (interim 1xx heads pass through)
HEAD_HELD: Final = 1  # the client's head is made, held for the first body bytes
BODY: Final = 2  # the head went out; body bytes follow
TUNNEL: Final = 3  # ending: 101 relayed, the connection is a tunnel now
COMPLETE: Final = 4  # ending: the response went out whole
FAILED: Final = 5  # ending: a proxy-made error was sent, or the client was cut off
CANCELLED: Final = 6  # ending: the client went away, or the request never started

ENDED: Final = TUNNEL  # response phases >= ENDED are endings


class RequestPhase(IntEnum):
    BUFFERING = BUFFERING
    BUFFERED = BUFFERED
    HELD = HELD
    STREAMING = STREAMING
    SENT = SENT
    SWITCHED = SWITCHED
    DROPPED = DROPPED


class ResponsePhase(IntEnum):
    AWAITING = AWAITING
    HEAD_HELD = HEAD_HELD
    BODY = BODY
    TUNNEL = TUNNEL
    COMPLETE = COMPLETE
    FAILED = FAILED
    CANCELLED = CANCELLED


R, S = RequestPhase, ResponsePhase

REQUEST_NEXT: Final[dict[RequestPhase, frozenset[RequestPhase]]] = {
    # read whole / held for its chunked body / dialled and attached / ended
    R.BUFFERING: frozenset({R.BUFFERED, R.HELD, R.STREAMING, R.DROPPED}),
    R.BUFFERED: frozenset({R.SENT, R.DROPPED}),
    # released by the end of its body (now whole) or by its size (dialled, still reading)
    R.HELD: frozenset({R.BUFFERED, R.BUFFERING, R.DROPPED}),
    R.STREAMING: frozenset({R.SENT, R.DROPPED}),
    # a stale pooled connection: the request goes again on a fresh one
    R.SENT: frozenset({R.BUFFERED, R.SWITCHED, R.DROPPED}),
    R.SWITCHED: frozenset(),
    R.DROPPED: frozenset(),
}

RESPONSE_NEXT: Final[dict[ResponsePhase, frozenset[ResponsePhase]]] = {
    # a head held for its body, a whole response in one piece, a switch, an error
    S.AWAITING: frozenset({S.HEAD_HELD, S.COMPLETE, S.TUNNEL, S.FAILED, S.CANCELLED}),
    S.HEAD_HELD: frozenset({S.BODY, S.COMPLETE, S.TUNNEL, S.FAILED, S.CANCELLED}),
    S.BODY: frozenset({S.COMPLETE, S.FAILED, S.CANCELLED}),
    S.TUNNEL: frozenset(),
    S.COMPLETE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def _masks(table: dict) -> list[int]:
    """The table as one bitmask of allowed next phases per phase (for native checks)."""
    masks = [0] * len(table)
    for phase, nexts in table.items():
        for nxt in nexts:
            masks[phase] |= 1 << nxt
    return masks


_REQUEST_MASKS: Final = _masks(REQUEST_NEXT)
_RESPONSE_MASKS: Final = _masks(RESPONSE_NEXT)


class PhaseError(Exception):
    """A transition the tables do not allow."""


def request_to(current: int, new: int) -> int:
    """`new`, when the request may move there from `current`; else PhaseError."""
    if not (_REQUEST_MASKS[current] >> new) & 1:
        raise PhaseError(f"request {RequestPhase(current).name} -> {RequestPhase(new).name}")
    return new


def response_to(current: int, new: int) -> int:
    """`new`, when the response may move there from `current`; else PhaseError."""
    if not (_RESPONSE_MASKS[current] >> new) & 1:
        raise PhaseError(f"response {ResponsePhase(current).name} -> {ResponsePhase(new).name}")
    return new
