"""Certificates and keys: reading a pair, checking it, the names it serves.

Rules:
- A pair is checked with the bytes that were read (and digested for the
  reloader), never by reading the files a second time: `load_pair` hands those
  bytes to OpenSSL through an anonymous in-memory file.
- A key must not be encrypted: a proxy that restarts on its own cannot type a
  passphrase (OpenSSL would otherwise prompt on the terminal).
- The names a certificate serves are its subjectAltName DNS entries,
  lower-case; without any, its subject's common name. `*.example.com` stands
  for exactly one label (`a.example.com`, not `example.com` or `a.b.example.com`).
- `cryptography` is imported only here, and only when a config has `tls`.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


class PairError(ValueError):
    """Why a certificate and key cannot be served, in words."""


@dataclass(frozen=True, slots=True)
class CertFacts:
    names: tuple[str, ...]  # lower-case DNS names, wildcards as written
    not_before: float  # UNIX time
    not_after: float


def facts(chain: bytes) -> CertFacts:
    """The leaf (first) certificate's names and validity; PairError if it is not PEM."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError as e:
        raise PairError(f"not a PEM certificate ({e})") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    unique = tuple(dict.fromkeys(n.lower().rstrip(".") for n in names if n))
    return CertFacts(
        unique, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    )


def _no_passphrase() -> str:
    raise PairError("the key is encrypted: give an unencrypted key (readable by this user only)")


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data` and nothing else can change."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("turnout-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="turnout-pem-")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


_REASONS = {
    "KEY_VALUES_MISMATCH": "the key does not match the certificate",
    "NO_START_LINE": "no PEM data where a certificate or key was expected",
    "EE_KEY_TOO_SMALL": "the key is too small for OpenSSL's security level",
    "CA_MD_TOO_WEAK": "the certificate's signature digest is too weak",
}


def load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """`context.load_cert_chain` from bytes; PairError saying why it failed."""
    try:
        with _in_memory(chain) as chain_path, _in_memory(key) as key_path:
            context.load_cert_chain(chain_path, key_path, password=_no_passphrase)
    except ssl.SSLError as e:
        code = getattr(e, "reason", None) or ""
        raise PairError(_REASONS.get(code) or code.lower().replace("_", " ") or str(e)) from None
    except OSError as e:
        raise PairError(f"cannot hand the pair to OpenSSL: {e.strerror or e}") from None


def _check_key(key: bytes) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        # Whether the key matches its certificate OpenSSL checks next; the RSA
        # validation skipped here holds the interpreter lock for tens of ms a key
        # (every reload re-checks every pair).
        load_pem_private_key(key, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # "Password was not given but private key is encrypted"
        _no_passphrase()
    except ValueError as e:
        raise PairError(f"not a PEM private key ({e})") from None
    except Exception as e:  # noqa: BLE001 -- an unsupported key type, say: a reason, not a crash
        raise PairError(f"not a usable private key ({e})") from None


def check_ca(pem: bytes) -> None:
    """PairError unless `pem` holds CA certificates a client context can trust."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise PairError("no PEM certificate in it")
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise PairError(f"not PEM certificates OpenSSL accepts ({e})") from None


def check_pair(chain: bytes, key: bytes) -> CertFacts:
    """The certificate's facts; PairError unless a TLS server could serve this
    certificate with this key (each file parsed first, for a precise reason)."""
    found = facts(chain)
    _check_key(key)
    load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key)
    return found
