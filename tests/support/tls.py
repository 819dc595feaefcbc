"""A throwaway certificate authority, so test servers speak TLS the client really verifies."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

# Names every test server certificate covers. The ``*.example.test`` names never resolve for real:
# tests map them to 127.0.0.1 with an injected resolver to show the certificate is checked
# against the name in the URL, not against the address connected to.
SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1", "idp.example.test", "api.example.test")


class LocalCA:
    """A CA whose certificate is written to ``ca_bundle`` for the client under test to trust."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_bundle = directory / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_bundle))

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side context with a certificate for ``names`` (default: ``SERVER_NAMES``)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(names or SERVER_NAMES)).configure_cert(context)
        return context
