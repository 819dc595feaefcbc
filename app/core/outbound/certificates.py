"""Client certificates for mutual TLS (RFC 8705 ``tls_client_auth``).

A ``ClientCertificate`` is the PEM chain a request presents and the private key that goes with it.
The key is a secret like any other: it travels as ``SecretStr``, never appears in a repr, a log
line or an error, and never touches a regular file. ``ssl.SSLContext.load_cert_chain`` only reads
paths, so on Linux the PEM text is written to anonymous memory (``memfd_create``) and handed to
OpenSSL as ``/proc/self/fd/N``; the descriptor is closed as soon as the context holds the key.
Where that is not available, the fallback is a file created with mode 0600 in a private temporary
directory, both removed as soon as the key is loaded.

The context is the same as the one that verifies servers (``build_ssl_context``: the same trust
store, TLS 1.2 at least, hostname checks), with the certificate added: presenting a certificate
changes who we are, never whom we trust.

A server that refuses the certificate says so with a TLS alert. Its reason is what
``certificate_refusal`` reads; with TLS 1.3 the alert arrives after the client has finished its
side of the handshake, so it surfaces on the first read rather than during the handshake.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from app.core.outbound.transport import build_ssl_context

__all__ = ["ClientCertificate", "InvalidClientCertificate"]

# OpenSSL's reasons for the alerts a server sends about the certificate it was shown, with the
# words a detail uses for each.
_REFUSAL_ALERTS: Final = {
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown certificate authority",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
}


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The certificate chain a request presents (PEM, leaf first) and its private key (PEM)."""

    certificate_pem: str
    private_key_pem: SecretStr

    def digest(self) -> bytes:
        """SHA-256 over the certificate and the key: tells pairs apart without keeping the key."""
        certificate = self.certificate_pem.encode()
        key = self.private_key_pem.get_secret_value().encode()
        # The length prefix keeps the boundary between the two from moving.
        return hashlib.sha256(len(certificate).to_bytes(8, "big") + certificate + key).digest()


class InvalidClientCertificate(ValueError):
    """The certificate and key could not be loaded; the message never quotes either."""


class _EncryptedKeyError(Exception):
    pass


def build_client_ssl_context(ca_bundle: Path | None, certificate: ClientCertificate) -> ssl.SSLContext:
    """The server-verifying context of ``build_ssl_context`` that also presents ``certificate``.

    Raises ``InvalidClientCertificate`` for a pair OpenSSL refuses (garbage, a key that does not
    belong to the certificate, an encrypted key). Blocking: it reads the system trust store.
    """
    context = build_ssl_context(ca_bundle)
    chain = certificate.certificate_pem.encode()
    key = certificate.private_key_pem.get_secret_value().encode()
    problem: str | None = None
    with _pem_paths(chain, key) as (chain_path, key_path):
        try:
            context.load_cert_chain(chain_path, key_path, password=_no_password)
        except _EncryptedKeyError:
            problem = "the private key is encrypted; an unencrypted key is needed"
        except ssl.SSLError as error:
            # OpenSSL's reason names the check that failed, never the material.
            if error.reason == "KEY_VALUES_MISMATCH":
                problem = "the private key does not belong to the certificate"
            else:
                problem = "the certificate or its private key is not valid PEM"
    if problem is not None:
        # Raised outside the handler, so no OpenSSL error rides along as the context.
        raise InvalidClientCertificate(f"the client certificate could not be loaded: {problem}")
    return context


def certificate_refusal(error: ssl.SSLError) -> str | None:
    """The server's reason for refusing our certificate, if ``error`` is such an alert."""
    reason = getattr(error, "reason", None)
    return _REFUSAL_ALERTS.get(reason) if isinstance(reason, str) else None


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKeyError


@contextmanager
def _pem_paths(chain: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can read ``chain`` and ``key`` from, valid only inside the block."""
    descriptors = _memory_files(chain, key)
    if descriptors is not None:
        try:
            yield _fd_path(descriptors[0]), _fd_path(descriptors[1])
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        return
    # mkdtemp makes the directory 0700; the files are 0600 and gone with it at the end of the block.
    with tempfile.TemporaryDirectory(prefix="connectors-tls-") as directory:
        chain_path = os.path.join(directory, "chain.pem")
        key_path = os.path.join(directory, "key.pem")
        _write_private(chain_path, chain)
        _write_private(key_path, key)
        yield chain_path, key_path


def _memory_files(*contents: bytes) -> tuple[int, ...] | None:
    """One anonymous in-memory file per item, or None where that (or /proc) is not available."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return None
    descriptors: list[int] = []
    try:
        for content in contents:
            descriptor = memfd_create("connectors-tls", os.MFD_CLOEXEC)
            descriptors.append(descriptor)
            _write_all(descriptor, content)
            if not os.path.exists(_fd_path(descriptor)):
                raise OSError("/proc is not mounted")
    except OSError:
        for descriptor in descriptors:
            with suppress(OSError):
                os.close(descriptor)
        return None
    return tuple(descriptors)


def _fd_path(descriptor: int) -> str:
    # Opening this path opens the memory file anew, from its start.
    return f"/proc/self/fd/{descriptor}"


def _write_private(path: str, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, 0o600)
    try:
        _write_all(descriptor, content)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view) :]
