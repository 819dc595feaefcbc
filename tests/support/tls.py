"""A throwaway certificate authority, so test servers speak TLS the client really verifies."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
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

    def issue_client_certificate(self, common_name: str, *, expired: bool = False) -> tuple[str, str]:
        """A client certificate for ``common_name``: its PEM chain (leaf first) and private key.

        ``expired`` gives one whose validity ended a day ago.
        """
        not_before = not_after = None
        if expired:
            now = datetime.now(UTC)
            not_before, not_after = now - timedelta(days=30), now - timedelta(days=1)
        leaf = self.ca.issue_cert(
            f"{common_name}.clients.example.test",
            common_name=common_name,
            not_before=not_before,
            not_after=not_after,
        )
        chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
        return chain, leaf.private_key_pem.bytes().decode()

    def verify_client_certificates(self, context: ssl.SSLContext, *, required: bool = True) -> None:
        """Make a server ``context`` ask for client certificates and verify them against this CA."""
        self.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL

    def issue_client_certificate_between(
        self, common_name: str, not_before: datetime, not_after: datetime
    ) -> tuple[str, str]:
        """A client certificate for ``common_name`` valid from ``not_before`` to ``not_after``:
        its PEM chain (leaf first) and private key."""
        leaf = self.ca.issue_cert(
            f"{common_name}.clients.example.test",
            common_name=common_name,
            not_before=not_before,
            not_after=not_after,
        )
        chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
        return chain, leaf.private_key_pem.bytes().decode()

    def issue_client_certificate_via_intermediate(self, common_name: str) -> tuple[str, str]:
        """A client certificate for ``common_name`` issued by an intermediate CA of this one: the
        PEM chain (leaf, then the intermediate) and the leaf's private key."""
        leaf = self.ca.create_child_ca().issue_cert(
            f"{common_name}.clients.example.test", common_name=common_name
        )
        chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
        return chain, leaf.private_key_pem.bytes().decode()
