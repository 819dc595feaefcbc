"""Secrets at rest: AES-256-GCM under a key ring, bound to the row and field they belong to.

A stored secret is one ASCII string::

    v1:<key id>:<base64url(nonce || ciphertext || tag)>

* ``v1`` names this format, so a later format can be introduced without guessing what an old
  value is.
* ``<key id>`` names the key that encrypted the value. The ring holds several keys, newest first:
  the newest encrypts, every key decrypts, so keys are rotated by adding a new one in front,
  re-encrypting stored values (``python -m app rotate-keys`` uses :meth:`KeyRing.key_id_of` to find
  the ones still under an old key) and only then dropping the old key.
* The nonce is 12 random bytes per encryption; base64url is written without padding and must be
  canonical, so every character of a stored value matters.

The associated data authenticated with every value is the format version, the key id and the
*location* of the secret (organization, connector and field, see :func:`secret_aad`), each part
length-prefixed so that no two different locations encode to the same bytes. As a result a
ciphertext copied into another connector, another organization or another field of the same row,
or one whose key id was edited, fails to decrypt instead of yielding somebody else's secret: a
database write alone cannot move secrets around.

Errors never contain key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.core.config import ConfigError, Settings

FORMAT_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_KEY_ID_LENGTH = 32


class DecryptionError(Exception):
    """A stored value cannot be decrypted: malformed, tampered, misplaced or under an unknown key."""


def _frame(*parts: bytes) -> bytes:
    """Concatenate ``parts`` unambiguously: each is preceded by its length as 4 big-endian bytes."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _canonical_connector_id(connector_id: UUID | str) -> str:
    # A connector id may arrive as a UUID or as the text a database driver returns; both spellings
    # of the same id must give the same associated data.
    if isinstance(connector_id, UUID):
        return str(connector_id)
    try:
        return str(UUID(connector_id))
    except ValueError:
        return connector_id


def secret_aad(organization_id: str, connector_id: UUID | str, field: str) -> bytes:
    """The associated data that ties a secret to one field of one connector of one organization."""
    return _frame(
        b"connector-secret",
        organization_id.encode(),
        _canonical_connector_id(connector_id).encode(),
        field.encode(),
    )


def _valid_key_id(key_id: str) -> bool:
    return (
        0 < len(key_id) <= MAX_KEY_ID_LENGTH
        and key_id.isascii()
        and key_id.isprintable()
        and ":" not in key_id
        and not any(char.isspace() for char in key_id)
    )


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: anything but the one canonical spelling is refused."""
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("stored secret is not valid base64url") from None
    # Unused low bits of the last character would otherwise let two spellings decode alike.
    if _b64encode(data) != text:
        raise DecryptionError("stored secret is not valid base64url") from None
    return data


def _split(token: str) -> tuple[str, str, str]:
    version, sep1, rest = token.partition(":")
    key_id, sep2, body = rest.partition(":")
    if not (sep1 and sep2):
        raise DecryptionError("stored secret is not in a known format")
    if version != FORMAT_VERSION:
        raise DecryptionError("stored secret has an unsupported format version")
    if not _valid_key_id(key_id):
        raise DecryptionError("stored secret has a malformed key id")
    return version, key_id, body


class KeyRing:
    """AES-256-GCM keys by id, newest first: the newest encrypts, all of them decrypt."""

    __slots__ = ("_ciphers", "_primary")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _valid_key_id(key_id):
                raise ValueError(
                    f"key ids are 1-{MAX_KEY_ID_LENGTH} printable ASCII characters without ':' or spaces"
                )
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must be {KEY_BYTES} bytes (AES-256)")
            if key_id in ciphers:
                raise ValueError(f"key id {key_id!r} appears twice")
            ciphers[key_id] = AESGCM(key)
        self._ciphers = ciphers
        self._primary = keys[0][0]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The ring configured by ``CONNECTORS_ENCRYPTION_KEYS`` (``ConfigError`` when unset)."""
        try:
            return cls(settings.key_ring())
        except ValueError as error:
            raise ConfigError(f"CONNECTORS_ENCRYPTION_KEYS: {error}") from None

    @property
    def primary_key_id(self) -> str:
        """The id of the key that encrypts new values."""
        return self._primary

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id in the ring, newest first."""
        return tuple(self._ciphers)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r})"

    def encrypt(self, plaintext: str, *, aad: bytes) -> str:
        """Encrypt under the newest key; ``aad`` is normally :func:`secret_aad` of the value's place."""
        try:
            data = plaintext.encode("utf-8")
        except UnicodeEncodeError:
            # The exception would carry the whole plaintext in its ``object`` attribute.
            raise ValueError("plaintext is not valid Unicode text") from None
        key_id = self._primary
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(
            nonce, data, _frame(FORMAT_VERSION.encode(), key_id.encode(), aad)
        )
        return f"{FORMAT_VERSION}:{key_id}:{_b64encode(nonce + sealed)}"

    def decrypt(self, token: str, *, aad: bytes) -> str:
        """Decrypt a value written by :meth:`encrypt` with the same ``aad``; else ``DecryptionError``."""
        version, key_id, body = _split(token)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionError(f"stored secret is under key id {key_id!r}, which is not in the key ring")
        raw = _b64decode(body)
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError("stored secret is truncated")
        nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        try:
            data = cipher.decrypt(nonce, sealed, _frame(version.encode(), key_id.encode(), aad))
        except InvalidTag:
            raise DecryptionError(
                "stored secret failed authentication (tampered, or stored for another connector or field)"
            ) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError("stored secret does not decode to text") from None

    def key_id_of(self, token: str) -> str:
        """The id of the key a stored value was encrypted under, read without decrypting.

        The id is returned even when it is not in this ring; ``DecryptionError`` when the value is
        not in a known format.
        """
        return _split(token)[1]
