"""Sealing a connector's secrets: encrypted under the key ring's primary key, bound to the
organization, the connector and the field (``app.core.crypto.secret_aad``), and opened again.

A stored value the key ring cannot open is ``SecretUnreadable``, logged once per value (with the
organization, connector, key id and field; never the value): every authorize of an OAuth
connector would otherwise log it again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from pydantic import SecretStr

from app.connectors.models import Connector
from app.core.crypto import DecryptionError, KeyRing, secret_aad
from app.core.errors import SecretUnreadable
from app.core.lru import LRU

log = logging.getLogger("app.connectors.service")

UNREADABLE = "the connector's stored secrets cannot be decrypted with the service's keys"


class SecretSealer:
    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring
        # Stored values found unreadable, each logged once (with its connector and key id).
        self._unreadable_logged: LRU[tuple[uuid.UUID, str, str], bool] = LRU(1024)

    def seal(
        self, organization_id: str, connector_id: uuid.UUID, secrets: Mapping[str, SecretStr]
    ) -> dict[str, str]:
        return {
            name: self.keyring.encrypt(
                value.get_secret_value(), aad=secret_aad(organization_id, connector_id, name)
            )
            for name, value in secrets.items()
        }

    def open_row(self, row: Connector) -> dict[str, SecretStr]:
        return self.open(row.organization_id, row.id, row.secrets)

    def open(
        self, organization_id: str, connector_id: uuid.UUID, sealed: Mapping[str, str]
    ) -> dict[str, SecretStr]:
        """Decrypt a connector's stored secrets; ``SecretUnreadable`` if one cannot be opened."""
        secrets: dict[str, SecretStr] = {}
        for name, token in sealed.items():
            try:
                secrets[name] = SecretStr(
                    self.keyring.decrypt(token, aad=secret_aad(organization_id, connector_id, name))
                )
            except DecryptionError as error:
                if (connector_id, name, token) not in self._unreadable_logged:
                    self._unreadable_logged.put((connector_id, name, token), True)
                    self._log_unreadable(organization_id, connector_id, name, token, error)
                raise SecretUnreadable(UNREADABLE) from None
        return secrets

    def _log_unreadable(
        self, organization_id: str, connector_id: uuid.UUID, name: str, token: str, error: DecryptionError
    ) -> None:
        try:
            key_id: str | None = self.keyring.key_id_of(token)
        except DecryptionError:
            key_id = None  # not in a known format: there is no key id to name
        log.error(
            "a stored secret cannot be decrypted",
            extra={
                "organization": organization_id,
                "connector": str(connector_id),
                "key_id": key_id,
                "key_in_ring": key_id in self.keyring.key_ids,
                "field": name,
                # DecryptionError's text names no key material, ciphertext or plaintext.
                "reason": str(error),
            },
        )
