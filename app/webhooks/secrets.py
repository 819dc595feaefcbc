"""Webhook signing secrets: made here, shown once, stored sealed with the key ring.

A secret is ``whsec_`` followed by the base64 of 32 random bytes, the form Standard Webhooks
libraries take. It is sealed like a connector's secrets, bound to the organization and the
subscription, so a sealed value copied to another row does not open.
"""

from __future__ import annotations

import base64
import secrets
import uuid

from pydantic import SecretStr

from app.core.crypto import KeyRing, secret_aad

PREFIX = "whsec_"
_FIELD = "webhook_secret"


def generate_secret() -> SecretStr:
    return SecretStr(PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii"))


def seal_secret(keyring: KeyRing, organization_id: str, subscription_id: uuid.UUID, secret: SecretStr) -> str:
    return keyring.encrypt(
        secret.get_secret_value(), aad=secret_aad(organization_id, subscription_id, _FIELD)
    )


def open_secret(keyring: KeyRing, organization_id: str, subscription_id: uuid.UUID, sealed: str) -> SecretStr:
    """Raises ``app.core.crypto.DecryptionError`` when the key ring cannot open it."""
    return SecretStr(keyring.decrypt(sealed, aad=secret_aad(organization_id, subscription_id, _FIELD)))
