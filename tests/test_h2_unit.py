"""The pure parts of gRPC: which content types are gRPC, where a grpc-status is, and
how an HTTP answer maps to a gRPC code. (proxy.http.parts is driven by the live
HTTP/2 tests: a compiled trait cannot be given a fake sink from a test.)"""

from __future__ import annotations

import pytest

from proxy.answers import grpc_for_http
from proxy.headers import grpc_status
from proxy.http.h2 import _is_grpc

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc; charset=utf-8", True),
        (b"Application/GRPC", True),
        (b"application/grpc-web", False),
        (b"application/grpc-web+proto", False),
        (b"application/json", False),
    ],
)
def test_which_requests_are_grpc(value: bytes, grpc: bool):
    assert _is_grpc([(b"x", b"y"), (b"content-type", value)]) is grpc
    assert _is_grpc([]) is False


def test_grpc_status_in_trailers_or_a_head():
    assert grpc_status(b"grpc-status: 14\r\ngrpc-message: down\r\n") == 14
    assert grpc_status(b"HTTP/1.1 200 \r\ncontent-type: application/grpc\r\nGRPC-Status:0\r\n") == 0
    assert grpc_status(b"x-grpc-status: 3\r\n") == -1  # another field's name
    assert grpc_status(b"grpc-status: 99\r\n") == 2  # outside gRPC's codes: UNKNOWN
    assert grpc_status(b"content-type: text/plain\r\n") == -1


def test_http_answers_map_to_grpc_codes_as_grpc_says():
    table = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14, 499: 1}
    for status, code in table.items():
        assert grpc_for_http(status) == code
    assert grpc_for_http(500) == 2 and grpc_for_http(413) == 2
