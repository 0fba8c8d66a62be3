"""The admin API's rules alone, in-process: which Host and Origin headers are loopback,
who a caller is with and without tokens (identify), and how text is escaped for logs.

Over real loopback sockets the same rules are tested in test_admin_security.py and
test_guard_live.py.
"""

from __future__ import annotations

import types

import pytest

from proxy.admin.auth import Caller, Denied, identify, loopback_host, loopback_origin
from proxy.config import Token
from proxy.safetext import escape

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ Host and Origin


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST:9901", "127.0.0.1", "127.0.0.1:9901", "127.9.8.7:1", "[::1]",
     "[::1]:9901", "[::ffff:127.0.0.1]:80"],
)  # fmt: skip
def test_loopback_hosts(host):
    assert loopback_host(host)


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:9901", "localhost.evil.example", "10.0.0.1:9901", "::1",
     "[::2]", "127.0.0.1:port", "", "127.1", "0.0.0.0:9901", "[fe80::1%25lo]"],
)  # fmt: skip
def test_other_hosts(host):
    assert not loopback_host(host)


def test_origins():
    for origin in ("http://localhost:9901", "https://127.0.0.1", "http://[::1]:8000"):
        assert loopback_origin(origin), origin
    for origin in ("null", "https://evil.example", "http://localhost.evil.example",
                   "file://", "http://localhost:9901/x", "http://user@localhost", ""):  # fmt: skip
        assert not loopback_origin(origin), origin


def test_escape():
    assert escape("plain é 中 ✓") == "plain é 中 ✓"
    assert escape("a\nb\r\tc\x1b[31m\x00\x7f\x9b\u2028\u202e\\") == (
        "a\\nb\\r\\tc\\x1b[31m\\x00\\x7f\\x9b\\u2028\\u202e\\\\"
    )


# ---------------------------------------------------------------- loopback peers


def _request(peer: str | None, authorization: str | None = None):
    headers = {"Authorization": authorization} if authorization else {}
    return types.SimpleNamespace(remote=peer, headers=headers)


@pytest.mark.parametrize(
    "peer", ["10.1.2.3", "192.168.0.10", "2001:db8::1", "::ffff:10.0.0.1", None, "garbage"]
)
def test_without_tokens_a_non_loopback_peer_is_refused(peer):
    with pytest.raises(Denied) as err:
        identify(_request(peer), ())
    assert err.value.status == 403


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_without_tokens_a_loopback_peer_may_do_everything(peer):
    caller = identify(_request(peer), ())
    assert caller == Caller("local", frozenset({"viewer"}), everything=True)


def test_with_tokens_the_peer_address_does_not_matter():
    token = Token("ci", "ENV", frozenset({"viewer", "engineer"}), "s3cret")
    for peer in ("127.0.0.1", "10.1.2.3"):
        with pytest.raises(Denied) as err:
            identify(_request(peer), (token,))
        assert err.value.status == 401
        caller = identify(_request(peer, "Bearer s3cret"), (token,))
        assert caller.name == "ci" and not caller.everything
