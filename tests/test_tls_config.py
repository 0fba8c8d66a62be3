"""The `tls` section and the contexts made from it: a pair is checked as OpenSSL will
serve it, every problem is reported at its key path, SNI picks the right context,
and a failed handshake maps to a bounded reason."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest

from proxy.config import ConfigError, load
from proxy.metrics import TLS_FAILURE_REASONS
from proxy.tls import Terminator, failure_reason

from .support import Authority

pytestmark = pytest.mark.unit

BASE = """\
stable: blue
canary: green
versions:
  blue: {endpoints: [http://127.0.0.1:9001]}
  green: {endpoints: [http://127.0.0.1:9002]}
"""


def write(tmp_path: Path, tls: str) -> Path:
    path = tmp_path / "turnout.yaml"
    path.write_text(BASE + tls)
    return path


def problems(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(str(path))
    return str(info.value)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def test_a_pair_loads_with_its_names_defaults_and_digests(tmp_path, authority):
    authority.issue("shop", "shop.example", "*.Shop.Example")
    authority.issue("api", "api.example")
    cfg = load(str(write(tmp_path, """\
tls:
  certificates:
    - {cert: shop.pem, key: shop.key}
    - {cert: api.pem, key: api.key}
""")))  # fmt: skip
    assert cfg.tls is not None
    shop, api = cfg.tls.certificates
    assert shop.cert == str(tmp_path / "shop.pem") and shop.key == str(tmp_path / "shop.key")
    assert shop.names == ("shop.example", "*.shop.example") and api.names == ("api.example",)
    assert shop.chain == (tmp_path / "shop.pem").read_bytes()
    assert cfg.tls.alpn == ("http/1.1",) and cfg.tls.min_version == "1.2"
    assert cfg.tls.handshake_timeout == 10.0
    # Every file read is watched by the reloader: its digest is in the sources.
    for name in ("shop.pem", "shop.key", "api.pem", "api.key"):
        assert str(tmp_path / name) in cfg.sources
    assert cfg.warnings == ()
    assert "BEGIN" not in repr(cfg.tls)  # the key never shows in a repr


def test_settings_are_parsed_and_checked(tmp_path, authority):
    authority.issue("shop", "shop.example")
    pair = "  certificates: [{cert: shop.pem, key: shop.key}]\n"
    ok = load(str(write(tmp_path, "tls:\n" + pair + """\
  alpn: [h2, http/1.1]
  min_version: 1.3
  handshake_timeout: 500ms
http2: {cleartext: true, max_concurrent_streams: 8}
""")))  # fmt: skip
    assert ok.tls is not None and ok.tls.min_version == "1.3"
    assert ok.tls.handshake_timeout == 0.5 and ok.tls.alpn == ("h2", "http/1.1")
    assert ok.http2.cleartext and ok.http2.max_concurrent_streams == 8
    for extra, expected in [
        ("  alpn: [spdy/3]\n", "tls.alpn[0]: must be 'h2' or 'http/1.1', got 'spdy/3'"),
        ("  alpn: [h2, h2]\n", "tls.alpn[1]"),
        ("http2: {max_concurrent_streams: 0}\n", "http2.max_concurrent_streams: must be"),
        ("http2: {push: true}\n", "http2.push: unknown key"),
        ("  alpn: []\n", "tls.alpn: must be a non-empty list"),
        ("  min_version: 1.1\n", "tls.min_version: must be '1.2' or '1.3', got '1.1'"),
        ("  handshake_timeout: 0s\n", "tls.handshake_timeout: must be a duration greater"),
        ("  ciphers: ALL\n", "tls.ciphers: unknown key"),
    ]:
        assert expected in problems(write(tmp_path, "tls:\n" + pair + extra)), extra
    assert "tls.certificates: is required" in problems(write(tmp_path, "tls: {}\n"))
    empty = problems(write(tmp_path, "tls: {certificates: []}\n"))
    assert "tls.certificates: must be a non-empty list" in empty


def test_a_pair_that_cannot_be_served_is_an_error_at_its_path(tmp_path, authority):
    authority.issue("shop", "shop.example")
    authority.issue("other", "other.example")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    # An encrypted key: OpenSSL must not stop to ask for a passphrase.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((tmp_path / "shop.key").read_bytes(), None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "locked.key").write_bytes(locked)
    for pair, expected in [
        ("{cert: shop.pem, key: other.key}", "the key does not match the certificate"),
        ("{cert: garbage.pem, key: shop.key}", "not a PEM certificate"),
        ("{cert: shop.pem, key: garbage.pem}", "not a PEM private key"),
        ("{cert: shop.pem, key: locked.key}", "the key is encrypted"),
        ("{cert: missing.pem, key: shop.key}", f"cannot read certificate file {tmp_path}"),
        ("{cert: shop.pem}", "tls.certificates[0].key: is required"),
        ("{cert: shop.pem, key: shop.key, chain: x}", "tls.certificates[0].chain: unknown key"),
    ]:
        text = problems(write(tmp_path, f"tls:\n  certificates:\n    - {pair}\n"))
        assert expected in text, (pair, text)
        assert "tls.certificates[0]" in text, text
    # The problem names the line of the pair, and the file read is still watched.
    with pytest.raises(ConfigError) as info:
        load(
            str(write(tmp_path, "tls:\n  certificates:\n    - {cert: shop.pem, key: other.key}\n"))
        )
    assert [p.line for p in info.value.problems] == [8]
    assert str(tmp_path / "other.key") in info.value.sources


def test_expired_or_nameless_certificates_are_warnings(tmp_path, authority):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    authority.issue("old", "old.example", not_before=past, not_after=past + dt.timedelta(days=10))
    cfg = load(str(write(tmp_path, "tls:\n  certificates: [{cert: old.pem, key: old.key}]\n")))
    assert len(cfg.warnings) == 1 and "expired 20 days ago" in cfg.warnings[0], cfg.warnings


def contexts(tmp_path: Path, authority: Authority) -> Terminator:
    authority.issue("shop", "shop.example", "*.shop.example")
    authority.issue("api", "api.example", "www.shop.example")
    cfg = load(str(write(tmp_path, """\
tls:
  certificates:
    - {cert: shop.pem, key: shop.key}
    - {cert: api.pem, key: api.key}
""")))  # fmt: skip
    assert cfg.tls is not None
    return Terminator(cfg.tls)


def test_sni_picks_exact_names_then_one_label_wildcards_then_the_first(tmp_path, authority):
    term = contexts(tmp_path, authority)
    shop, api = term.front, term.exact["api.example"]
    assert shop is not api
    for name, expected in [
        ("shop.example", shop),
        ("SHOP.example.", shop),  # case and a trailing dot do not matter
        ("api.example", api),
        ("a.shop.example", shop),  # the wildcard
        ("www.shop.example", api),  # an exact name beats a wildcard listed earlier
        ("a.b.shop.example", shop),  # no match (a wildcard covers one label): the default
        (".shop.example", shop),
        ("unknown.example", shop),
        (None, shop),
        ("", shop),
    ]:
        assert term.context_for(name) is expected, name
    assert term.front.sni_callback is not None
    authority.issue("one", "one.example")
    single = load(str(write(tmp_path, "tls:\n  certificates: [{cert: one.pem, key: one.key}]\n")))
    assert single.tls is not None and Terminator(single.tls).front.sni_callback is None
    assert [s.names for s in term.served] == [
        ("shop.example", "*.shop.example"),
        ("api.example", "www.shop.example"),
    ]


def test_contexts_refuse_old_protocols_and_renegotiation(tmp_path, authority):
    term = contexts(tmp_path, authority)
    for ctx in (term.front, term.exact["api.example"]):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request"), "other"),  # no reason code
        (ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds"), "timeout"),
        (ConnectionResetError(), "closed"),
        (BrokenPipeError(), "closed"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "closed"),
        (ValueError("anything else"), "other"),
    ],
)
def test_failure_reasons_are_a_bounded_set(exc, reason):
    assert failure_reason(exc) == reason
    assert reason in TLS_FAILURE_REASONS


def test_openssl_reason_codes_map_to_their_labels():
    for code, reason in [
        ("HTTP_REQUEST", "http_request"),
        ("WRONG_VERSION_NUMBER", "protocol_version"),
        ("UNSUPPORTED_PROTOCOL", "protocol_version"),
        ("NO_SHARED_CIPHER", "no_shared_cipher"),
        ("TLSV1_ALERT_UNKNOWN_CA", "certificate_rejected"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "certificate_rejected"),
        ("TLSV1_ALERT_INTERNAL_ERROR", "client_alert"),
        ("SOMETHING_NEW", "other"),
    ]:
        err = ssl.SSLError(1, code)
        err.reason = code
        assert failure_reason(err) == reason, code
        assert reason in TLS_FAILURE_REASONS
