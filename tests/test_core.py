"""The data plane's core in process: a client connection, its exchanges and their
upstream connections, over fake transports (tests/core_harness.py).

Each test scripts both peers' bytes and asserts the exact bytes each side got,
the exchange's phases as sampled after every step (the harness also checks that
every change is a walk through proxy.phases' tables), what the recorder counted,
and what became of the upstream connections (pooled, reused, closed).
"""

from __future__ import annotations

import contextlib
import time

import pytest

from proxy.http import outbox
from proxy.phases import RequestPhase as R
from proxy.phases import ResponsePhase as S

from .core_harness import CLIENT_PEER, FakeTransport, Harness, body_json

pytestmark = pytest.mark.unit

BLUE, BLUE2, GREEN = "127.0.0.1:9001", "127.0.0.1:9003", "127.0.0.1:9002"


def config(blue: tuple[str, ...] = (BLUE,), extra: str = "") -> str:
    """Blue stable, green canary at weight 0, sticky on X-User-Id; `extra` is more YAML."""
    endpoints = ", ".join(f'"http://{e}"' for e in blue)
    return f"""
stable: blue
canary: green
versions:
  blue: {{endpoints: [{endpoints}]}}
  green: {{endpoints: ["http://{GREEN}"]}}
routing: {{weight: 0, sticky: {{key: "header:X-User-Id"}}}}
{extra}"""


MIRROR = """
mirror:
  percent: 100
  compare: {}
"""

# What the proxy adds to a request from 127.0.0.1 with "Host: shop.test".
FWD = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: shop.test\r\n"
OK_HI = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
OK_HI_TO_CLIENT = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Turnout-Version: blue\r\n\r\nhi"


def get(path: str = "/", *lines: str) -> bytes:
    head = [f"GET {path} HTTP/1.1", "Host: shop.test", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def forwarded(request_line: bytes, *lines: bytes) -> bytes:
    """The head the upstream gets for a request with `Host: shop.test` and `lines`."""
    return request_line + b"\r\nHost: shop.test\r\n" + b"".join(lines) + FWD + b"\r\n"


# -- a plain GET, and its connection reused ------------------------------------------------


async def test_a_get_is_forwarded_answered_and_its_connection_reused():
    h = Harness(config())
    client = h.client()
    await client.send(get("/a?x=1", "X-Custom: kept", "X-Forwarded-Proto: https"))

    assert h.dialer.dials == [BLUE]
    (up,) = h.dialer.made
    # Host passes through; X-Forwarded-Proto is the proxy's, not the client's.
    assert up.received == forwarded(b"GET /a?x=1 HTTP/1.1", b"X-Custom: kept\r\n")
    assert client.received == b""

    await up.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT
    (first,) = client.exchanges
    assert h.phases(first) == [
        (R.BUFFERED, S.AWAITING),  # read whole, the dial under way
        (R.SENT, S.AWAITING),
        (R.SENT, S.COMPLETE),
    ]
    assert h.pool(BLUE).idle == [up.conn]
    assert h.requests() == {("blue", 200): 1}
    assert h.failures() == {}

    # The next request takes the pooled connection: no second dial. A client's
    # X-Forwarded-For is kept, the peer appended.
    await client.send(get("/b", "X-Forwarded-For: 203.0.113.7"))
    assert h.dialer.dials == [BLUE]
    assert h.pool(BLUE).idle == []
    second_head = (
        b"GET /b HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: shop.test\r\n\r\n"
    )
    assert up.received == forwarded(b"GET /a?x=1 HTTP/1.1", b"X-Custom: kept\r\n") + second_head
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
    assert client.received == OK_HI_TO_CLIENT + (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Turnout-Version: blue\r\n\r\nbye"
    )
    second = client.exchanges[1]
    # attached at once: no phase in which it waited for a connection
    assert h.phases(second) == [(R.SENT, S.AWAITING), (R.SENT, S.COMPLETE)]
    assert h.pool(BLUE).idle == [up.conn]
    assert h.requests() == {("blue", 200): 2}
    assert not client.transport.closing and not up.transport.closing


async def test_without_expose_version_the_client_gets_the_upstream_head_as_it_is():
    h = Harness(config(extra="expose_version: false\n"))
    client = h.client()
    await client.send(get())
    await h.dialer.made[0].reply(OK_HI)
    assert client.received == OK_HI


async def test_hop_by_hop_headers_are_removed_both_ways():
    h = Harness(config())
    client = h.client()
    await client.send(get("/", "Connection: keep-alive, X-Drop", "X-Drop: 1", "Keep-Alive: 5"))
    (up,) = h.dialer.made
    assert up.received == forwarded(b"GET / HTTP/1.1")
    await up.reply(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert client.received == OK_HI_TO_CLIENT
    assert h.pool(BLUE).idle == [up.conn]


# -- pipelining ----------------------------------------------------------------------------


async def test_pipelined_requests_go_upstream_one_at_a_time_and_are_answered_in_order():
    h = Harness(config())
    client = h.client()
    await client.send(get("/1") + get("/2"))

    (up,) = h.dialer.made
    assert up.received == forwarded(b"GET /1 HTTP/1.1")  # /2 waits its turn
    assert client.transport.reading is False  # paused while a request is queued
    first, second = client.exchanges
    assert h.phases(second) == [(R.BUFFERED, S.AWAITING)]

    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert up.received == forwarded(b"GET /1 HTTP/1.1") + forwarded(b"GET /2 HTTP/1.1")
    assert h.dialer.dials == [BLUE]  # the second went on the first's connection
    assert client.transport.reading is True
    assert (client.transport.pauses, client.transport.resumes) == (1, 1)

    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    assert client.received == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Turnout-Version: blue\r\n\r\none"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Turnout-Version: blue\r\n\r\ntwo"
    )
    assert h.phases(first) == [(R.BUFFERED, S.AWAITING), (R.SENT, S.AWAITING), (R.SENT, S.COMPLETE)]
    assert h.phases(second) == [
        (R.BUFFERED, S.AWAITING),
        (R.SENT, S.AWAITING),
        (R.SENT, S.COMPLETE),
    ]
    assert h.requests() == {("blue", 200): 2}


# -- responses without a body, interim responses -------------------------------------------


async def test_an_answer_to_head_has_no_body_and_leaves_the_connection_reusable():
    h = Harness(config())
    client = h.client()
    await client.send(b"HEAD /h HTTP/1.1\r\nHost: shop.test\r\n\r\n")
    (up,) = h.dialer.made
    assert up.received == forwarded(b"HEAD /h HTTP/1.1")
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert client.received == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Turnout-Version: blue\r\n\r\n"
    )
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    assert h.pool(BLUE).idle == [up.conn]

    await client.send(get("/after"))
    assert h.dialer.dials == [BLUE]
    await up.reply(OK_HI)
    assert client.received.endswith(OK_HI_TO_CLIENT)
    assert h.pool(BLUE).idle == [up.conn]


@pytest.mark.parametrize(
    "answer, relayed",
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 204 No Content\r\n"),
        (
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n',
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n',
        ),
    ],
)
async def test_204_and_304_end_at_their_head(answer: bytes, relayed: bytes):
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(answer)
    assert client.received == relayed + b"X-Turnout-Version: blue\r\n\r\n"
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.COMPLETE)
    assert h.pool(BLUE).idle == [up.conn]
    await client.send(get("/next"))
    assert h.dialer.dials == [BLUE]


async def test_100_continue_is_relayed_when_the_client_asked_for_it():
    h = Harness(config())
    client = h.client()
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    (up,) = h.dialer.made
    head = (
        b"POST /up HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n"
        + FWD
        + b"\r\n"
    )
    assert up.received == head
    (ex,) = client.exchanges
    assert h.phases(ex) == [(R.BUFFERING, S.AWAITING), (R.STREAMING, S.AWAITING)]

    await up.reply(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.received == b"HTTP/1.1 100 Continue\r\n\r\n"
    await client.send(b"data")
    assert up.received == head + b"data"
    await up.reply(OK_HI)
    assert client.received == b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HI_TO_CLIENT
    assert h.phases(ex)[-2:] == [(R.SENT, S.AWAITING), (R.SENT, S.COMPLETE)]


async def test_100_continue_is_not_relayed_when_the_client_did_not_ask():
    h = Harness(config())
    client = h.client()
    await client.send(b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\ndata")
    (up,) = h.dialer.made
    assert up.received.endswith(b"\r\n\r\ndata")
    await up.reply(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.received == b""
    await up.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT


async def test_103_goes_to_an_http11_client_then_the_final_response():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n")
    (ex,) = client.exchanges
    assert client.received == b"HTTP/1.1 103 Early Hints\r\n\r\n"  # its status line only
    assert h.phases(ex)[-1] == (R.SENT, S.AWAITING)  # still waiting for the final head
    await up.reply(OK_HI)
    assert client.received == b"HTTP/1.1 103 Early Hints\r\n\r\n" + OK_HI_TO_CLIENT
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)


async def test_103_is_not_sent_to_an_http10_client():
    h = Harness(config())
    client = h.client()
    await client.send(b"GET / HTTP/1.0\r\nHost: shop.test\r\n\r\n")
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n" + OK_HI)
    assert client.received == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
        b"X-Turnout-Version: blue\r\n\r\nhi"
    )


# -- chunked both ways ---------------------------------------------------------------------


async def test_a_small_chunked_request_body_is_held_until_whole_then_sent_rechunked():
    h = Harness(config())
    client = h.client()
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
    )
    assert h.dialer.dials == []  # held: nothing goes upstream before the body parsed whole
    (ex,) = client.exchanges
    assert h.phases(ex) == [(R.HELD, S.AWAITING)]

    await client.send(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    (up,) = h.dialer.made
    assert up.received == (
        b"POST /up HTTP/1.1\r\nHost: shop.test\r\n" + FWD + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    assert h.phases(ex) == [(R.HELD, S.AWAITING), (R.BUFFERED, S.AWAITING), (R.SENT, S.AWAITING)]
    await up.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT
    assert h.pool(BLUE).idle == [up.conn]


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_chunked_response_goes_chunked_to_an_http11_client():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(CHUNKED_HEAD + b"4\r\nabcd\r\n")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Turnout-Version: blue\r\n\r\n"
    assert client.received == head + b"4\r\nabcd\r\n"
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.BODY)

    await up.reply(b"3;ext\r\nefg\r\n0\r\n\r\n")
    assert client.received == head + b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
    assert h.phases(ex)[-2:] == [(R.SENT, S.BODY), (R.SENT, S.COMPLETE)]
    assert h.pool(BLUE).idle == [up.conn]
    assert not client.transport.closing


async def test_a_chunked_response_goes_until_close_to_an_http10_client():
    h = Harness(config())
    client = h.client()
    await client.send(b"GET /old HTTP/1.0\r\n\r\n")
    (up,) = h.dialer.made
    # No Host from the client: the upstream gets the endpoint's.
    assert up.received == (
        b"GET /old HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    )
    await up.reply(CHUNKED_HEAD + b"4\r\nabcd\r\n")
    await up.reply(b"3\r\nefg\r\n0\r\n\r\n")
    assert client.received == (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Turnout-Version: blue\r\n\r\nabcdefg"
    )
    assert client.transport.eof_written  # the end of the body is the end of the connection
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    assert h.pool(BLUE).idle == [up.conn]  # the upstream's side ended cleanly


# -- a reset mid-body ----------------------------------------------------------------------


async def test_an_upstream_reset_mid_body_cuts_the_client_off_and_counts_a_failure():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(CHUNKED_HEAD + b"4\r\nabcd\r\n")
    await up.close()

    assert client.received == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Turnout-Version: blue\r\n\r\n"
        b"4\r\nabcd\r\n"  # never a last chunk: the client sees the body cut short
    )
    assert client.transport.how == "abort"
    (ex,) = client.exchanges
    assert h.phases(ex)[-2:] == [(R.SENT, S.BODY), (R.SENT, S.FAILED)]
    counts = h.recorder.counts()
    assert counts["requests"] == [["blue", 502, 1]]
    assert counts["upstream_errors"] == [["blue", "reset", 1]]
    assert counts["failures"] == {"blue": 1}
    assert h.pool(BLUE).idle == []
    assert client.conn not in h.registry  # the aborted connection reported its loss


async def test_an_upstream_close_before_the_head_is_a_502():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-")
    await up.close()
    assert client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert body_json(client.received) == {
        "error": "Bad Gateway",
        "version": "blue",
        "cause": "upstream closed the connection",
    }
    assert h.dialer.dials == [BLUE]  # a fresh connection is never resent on
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.FAILED)


# -- a stale pooled connection -------------------------------------------------------------


async def test_a_get_on_a_stale_pooled_connection_is_resent_once_on_a_fresh_one():
    h = Harness(config())
    stale = h.seed(BLUE)
    client = h.client()
    await client.send(get("/again"))
    assert h.dialer.dials == []
    assert stale.received == forwarded(b"GET /again HTTP/1.1")

    await stale.close()  # closed before one byte of an answer
    assert h.dialer.dials == [BLUE]
    (fresh,) = h.dialer.made
    assert fresh.received == stale.received  # the same request, byte for byte
    assert client.received == b""
    (ex,) = client.exchanges
    assert h.phases(ex) == [
        (R.SENT, S.AWAITING),  # on the pooled connection
        (R.BUFFERED, S.AWAITING),  # rewound for the resend
        (R.SENT, S.AWAITING),  # on the fresh one
    ]

    await fresh.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    assert h.requests() == {("blue", 200): 1}


async def test_a_resent_request_is_not_resent_again():
    h = Harness(config())
    stale = h.seed(BLUE)
    client = h.client()
    await client.send(get())
    await stale.close()
    (fresh,) = h.dialer.made
    await fresh.close()  # the fresh connection also closes unanswered
    assert h.dialer.dials == [BLUE]
    assert client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert body_json(client.received)["cause"] == "upstream closed the connection"
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.FAILED)


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
async def test_a_request_with_a_body_on_a_stale_pooled_connection_is_not_resent(method: bytes):
    h = Harness(config())
    stale = h.seed(BLUE)
    client = h.client()
    await client.send(
        method + b" /save HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\ndata"
    )
    assert stale.received == (
        method + b" /save HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n" + FWD + b"\r\ndata"
    )
    await stale.close()
    assert h.dialer.dials == []
    body = (
        b'{"error": "Bad Gateway", "version": "blue", "cause": "upstream closed the connection"}\n'
    )
    assert client.received == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\nX-Turnout-Version: blue\r\n\r\n%s" % (len(body), body)
    )
    (ex,) = client.exchanges
    assert h.phases(ex) == [(R.SENT, S.AWAITING), (R.SENT, S.FAILED)]
    assert h.recorder.counts()["upstream_errors"] == [["blue", "reset", 1]]
    assert client.transport.eof_written  # closed after the answer (lingering)


# -- a copy beside the primary -------------------------------------------------------------


async def test_a_copy_goes_to_the_canary_and_matches():
    h = Harness(config(extra=MIRROR))
    client = h.client()
    await client.send(get("/m"))

    assert h.dialer.dials == [BLUE, GREEN]
    (primary,) = h.dialer.to(BLUE)
    (copy,) = h.dialer.to(GREEN)
    assert primary.received == forwarded(b"GET /m HTTP/1.1")
    assert copy.received == forwarded(b"GET /m HTTP/1.1")[:-2] + b"X-Turnout-Shadow: 1\r\n\r\n"
    assert h.recorder.mirror == {"sent": 1, "dropped": 0, "failed": 0}

    await primary.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT  # the primary does not wait for the copy
    assert h.recorder.comparisons == {"match": 0, "mismatch": 0}
    await copy.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT  # the copy's answer never reaches the client
    assert h.recorder.comparisons == {"match": 1, "mismatch": 0}
    assert h.recorder.shadow_requests == {"green": 1}
    assert h.recorder.shadow_failures == {}
    assert h.mismatches == []
    assert h.requests() == {("blue", 200): 1}
    assert h.tap is not None and h.tap.in_flight == 0
    assert h.pool(GREEN).idle == [copy.conn]
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.COMPLETE)


async def test_a_copy_answered_differently_is_a_mismatch_reported_to_on_mismatch():
    h = Harness(config(extra=MIRROR))
    client = h.client()
    await client.send(get("/m"))
    (primary,) = h.dialer.to(BLUE)
    (copy,) = h.dialer.to(GREEN)
    await copy.reply(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
    assert h.recorder.comparisons == {"match": 0, "mismatch": 0}  # the primary is not over
    await primary.reply(OK_HI)

    assert client.received == OK_HI_TO_CLIENT
    assert h.recorder.comparisons == {"match": 0, "mismatch": 1}
    assert h.recorder.shadow_failures == {"green": 1}  # a 500 counts against the canary
    assert h.mismatches == [
        {
            "request": "GET /m",
            "difference": "status",
            "primary_status": 200,
            "shadow_status": 500,
            "detail": {"primary": 200, "shadow": 500},
            "version": "green",
        }
    ]
    assert h.tap is not None and list(h.tap.mismatches)[0]["difference"] == "status"


# -- flow control --------------------------------------------------------------------------


async def test_back_pressure_crosses_the_proxy_both_ways():
    h = Harness(config())
    client = h.client()
    await client.send(b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 10\r\n\r\n01234")
    (up,) = h.dialer.made
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.STREAMING, S.AWAITING)

    # The upstream's send buffer fills: the client is no longer read.
    await up.pause_writing()
    assert client.transport.reading is False
    await up.resume_writing()
    assert client.transport.reading is True
    assert (client.transport.pauses, client.transport.resumes) == (1, 1)
    await client.send(b"56789")
    assert up.received.endswith(b"\r\n\r\n0123456789")

    # The client stops reading: the upstream is no longer read.
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    await client.pause_writing()
    assert up.transport.reading is False
    await client.resume_writing()
    assert up.transport.reading is True
    assert (up.transport.pauses, up.transport.resumes) == (1, 1)
    await up.reply(b"def")
    assert client.received == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Turnout-Version: blue\r\n\r\nabcdef"
    )
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    assert h.pool(BLUE).idle == [up.conn]


async def test_a_client_that_stops_reading_mid_response_pauses_the_upstream_until_it_reads():
    h = Harness(config())
    client = h.client()
    client.transport.limit(1000)
    await client.send(get("/dl"))
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + b"a" * 1500)
    assert client.transport.write_paused
    assert up.transport.reading is False
    await client.drain()
    assert up.transport.reading is True
    await up.reply(b"b" * 1500)
    assert client.received.endswith(b"\r\n\r\n" + b"a" * 1500 + b"b" * 1500)
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.COMPLETE)


async def test_a_connection_paused_for_a_slow_client_is_not_pooled_paused():
    """The last piece of a body, written large to a client whose buffer then fills,
    pauses the upstream connection within the read that ends the response."""
    h = Harness(config())
    client = h.client()
    await client.send(get("/dl"))
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
    client.transport.limit(64 * 1024)
    await up.reply(b"b" * 99000)  # the rest of the body: the response is complete
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    assert h.pool(BLUE).idle == [up.conn]
    await client.drain()  # the client reads everything

    # Another client's request takes the pooled connection: its answer must be read.
    other = h.client(("127.0.0.1", 40001))
    await other.send(get("/next"))
    assert h.dialer.dials == [BLUE]
    assert up.received.endswith(forwarded(b"GET /next HTTP/1.1"))
    assert up.transport.reading is True


async def test_an_upstream_slow_to_read_does_not_leave_the_client_paused_after_the_exchange():
    """The request is written whole into a full send buffer; the upstream answers before
    that buffer drains, then reads the rest."""
    h = Harness(config())
    h.dialer.high_water = 64 * 1024
    client = h.client()
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100000
    )
    (up,) = h.dialer.made
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.AWAITING)
    assert client.transport.reading is False  # back-pressure from the upstream

    await up.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT
    assert h.phases(ex)[-1] == (R.SENT, S.COMPLETE)
    await up.drain()
    # The exchange is over and the connection keeps alive: its next request must be read.
    assert not client.transport.closing
    assert client.transport.reading is True


# -- dials that fail -----------------------------------------------------------------------


async def test_a_refused_dial_with_one_endpoint_is_a_502_naming_the_cause():
    h = Harness(config())
    h.dialer.fail(BLUE, ConnectionRefusedError(111, "Connection refused"))
    client = h.client()
    await client.send(get())
    assert h.dialer.dials == [BLUE]  # no other endpoint to try
    assert client.received.startswith(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
    )
    assert b"\r\nConnection: close\r\nX-Turnout-Version: blue\r\n\r\n" in client.received
    assert body_json(client.received) == {
        "error": "Bad Gateway",
        "version": "blue",
        "cause": "connect failed: Connection refused",
    }
    (ex,) = client.exchanges
    assert h.phases(ex) == [(R.BUFFERED, S.AWAITING), (R.DROPPED, S.FAILED)]
    assert h.recorder.counts()["upstream_errors"] == [["blue", "connect", 1]]
    assert h.requests() == {("blue", 502): 1}
    assert client.transport.eof_written


async def test_a_dial_timeout_is_a_504():
    h = Harness(config())
    h.dialer.fail(BLUE, TimeoutError())
    client = h.client()
    await client.send(get())
    assert client.received.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert body_json(client.received)["cause"] == "upstream connect timeout"
    assert h.recorder.counts()["upstream_errors"] == [["blue", "timeout", 1]]


async def test_a_refused_dial_is_tried_once_on_the_other_endpoint():
    h = Harness(config(blue=(BLUE, BLUE2)))
    h.dialer.fail(BLUE, ConnectionRefusedError(111, "Connection refused"))
    client = h.client()
    await client.send(get())
    assert h.dialer.dials == [BLUE, BLUE2]
    (up,) = h.dialer.made
    assert up.endpoint == BLUE2
    assert up.received == forwarded(b"GET / HTTP/1.1")
    await up.reply(OK_HI)
    assert client.received == OK_HI_TO_CLIENT
    assert h.requests() == {("blue", 200): 1}
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.COMPLETE)


async def test_when_both_endpoints_refuse_each_is_dialled_once_then_502():
    h = Harness(config(blue=(BLUE, BLUE2)))
    h.dialer.fail(BLUE, ConnectionRefusedError(111, "Connection refused"))
    h.dialer.fail(BLUE2, ConnectionRefusedError(111, "Connection refused"))
    client = h.client()
    await client.send(get())
    assert h.dialer.dials == [BLUE, BLUE2]
    assert body_json(client.received)["cause"] == "connect failed: Connection refused"
    assert h.phases(client.exchanges[0])[-1] == (R.DROPPED, S.FAILED)


async def test_while_the_only_endpoint_backs_off_a_request_is_refused_without_a_dial():
    h = Harness(config())
    h.pool(BLUE).down_until = time.monotonic() + 60  # as after refusals in a row
    client = h.client()
    await client.send(get())
    assert h.dialer.dials == []
    assert client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert body_json(client.received)["cause"] == "no endpoint available"
    assert h.recorder.counts()["upstream_errors"] == [["blue", "unavailable", 1]]


# -- a connection that answered with Connection: close reads nothing more ------------------


async def test_after_a_413_for_its_length_nothing_more_is_read_from_the_connection():
    h = Harness(config(extra="limits: {max_body_bytes: 10}\n"))
    client = h.client()
    await client.send(
        b"POST /big HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 20\r\n\r\n"
        + b"x" * 20
        + get("/next")
    )
    assert client.received.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"\r\nConnection: close\r\n" in client.received
    assert client.transport.eof_written
    assert h.dialer.dials == []  # the request after the refused one is never forwarded
    assert h.requests() == {("blue", 413): 1}


async def test_after_a_502_without_a_dial_a_pipelined_request_is_not_read():
    h = Harness(config())
    h.pool(BLUE).down_until = time.monotonic() + 60
    client = h.client()
    await client.send(get("/1") + get("/2"))
    assert client.received.count(b"HTTP/1.1 502 ") == 1
    assert client.received.endswith(b'"cause": "no endpoint available"}\n')
    assert h.requests() == {("blue", 502): 1}


# -- the write queue -----------------------------------------------------------------------


async def test_a_write_that_raises_does_not_take_other_connections_writes_with_it():
    half_closed = FakeTransport(None, CLIENT_PEER)
    half_closed.write_eof()  # a write to it raises, as a real transport's does
    other = FakeTransport(None, CLIENT_PEER)
    outbox.send(half_closed, b"late")
    outbox.send(other, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    with contextlib.suppress(RuntimeError):
        outbox.flush()
    assert bytes(other.data) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# -- more endings --------------------------------------------------------------------------


async def test_bytes_past_the_length_spoil_the_connection_it_is_closed_not_pooled():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    await up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    await up.reply(b"hiEXTRA")
    assert client.received == OK_HI_TO_CLIENT
    assert h.pool(BLUE).idle == []
    assert up.transport.how == "abort"
    assert h.phases(client.exchanges[0])[-1] == (R.SENT, S.COMPLETE)


async def test_a_client_gone_while_waiting_cancels_the_exchange_and_its_upstream_connection():
    h = Harness(config())
    client = h.client()
    await client.send(get())
    (up,) = h.dialer.made
    client.conn.connection_lost(None)
    await h.settle()
    (ex,) = client.exchanges
    assert h.phases(ex)[-1] == (R.SENT, S.CANCELLED)
    assert up.transport.how == "abort"  # a half-sent exchange's connection is not reused
    assert h.requests() == {("blue", 499): 1}
    assert h.pool(BLUE).idle == []
