"""Checking the configured key ring against the secrets stored in the database.

A key ring that lacks a key id the data is under, or holds the right id with other bytes, lets
the service start and answer health checks, and then fail every call that needs a secret. The
check finds both before anything is served: one query for the key ids in use (an indexed column),
then one connector per key id, whose secrets are decrypted with their associated data. Stored
values name their own key id (``KeyRing.key_id_of``), so a partly finished ``rotate-keys`` that
left several key ids in use is checked key by key.

A sample is one connector, so the check costs the same whatever the number of rows; it proves a
key right or wrong, not every row sound. Webhook signing secrets are sampled the same way, one
subscription per key id. What it reports names key ids, connector ids and webhook ids only,
never a secret or a ciphertext.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.connectors.repository import KeyUsageRepository
from app.core.config import ConfigError, Settings
from app.core.crypto import DecryptionError, KeyRing, secret_aad
from app.core.db import Database, build_engine
from app.core.errors import DatabaseUnavailable
from app.webhooks.keys import webhook_samples
from app.webhooks.secrets import open_secret


@dataclass(frozen=True, slots=True)
class KeyRingCheck:
    """What the check found: key ids whose sample was opened, missing ones and wrong ones."""

    opened: tuple[str, ...] = ()
    # Key ids stored secrets are under that the ring does not hold.
    missing: tuple[str, ...] = ()
    # (key id, connector id): the ring holds the id, but its key does not open that connector's
    # secret under it.
    unreadable: tuple[tuple[str, uuid.UUID], ...] = ()
    # (key id, webhook subscription id): the same for a webhook's signing secret.
    unreadable_webhooks: tuple[tuple[str, uuid.UUID], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable and not self.unreadable_webhooks

    def problems(self) -> list[str]:
        """One sentence per problem, for an operator."""
        found: list[str] = []
        if self.missing:
            noun = "key id" if len(self.missing) == 1 else "key ids"
            found.append(
                f"the stored secrets need {noun} {', '.join(self.missing)},"
                " which CONNECTORS_ENCRYPTION_KEYS does not hold"
            )
        found += [
            f"key id {key_id} of CONNECTORS_ENCRYPTION_KEYS cannot open the stored secrets of connector"
            f" {connector_id} (other key bytes than those they were encrypted with, or a damaged value)"
            for key_id, connector_id in self.unreadable
        ]
        found += [
            f"key id {key_id} of CONNECTORS_ENCRYPTION_KEYS cannot open the signing secret of webhook"
            f" {webhook_id} (other key bytes than those it was encrypted with, or a damaged value)"
            for key_id, webhook_id in self.unreadable_webhooks
        ]
        return found


async def check_key_ring(db: Database, keyring: KeyRing) -> KeyRingCheck:
    """Try ``keyring`` on one stored connector per key id in use; see the module docstring."""
    async with db.read() as session:
        repo = KeyUsageRepository(session)
        samples = [(key_id, await repo.sample(key_id)) for key_id in await repo.key_ids()]
        webhooks = await webhook_samples(session)
    held = set(keyring.key_ids)
    opened: set[str] = set()
    missing: set[str] = set()
    unreadable: dict[str, uuid.UUID] = {}
    for column_key_id, sample in samples:
        if sample is None:
            continue  # deleted since the key ids were read
        organization_id, connector_id, secrets = sample
        if column_key_id not in held:
            missing.add(column_key_id)
            continue
        for name, token in secrets.items():
            try:
                key_id = keyring.key_id_of(token)
            except DecryptionError:
                unreadable.setdefault(column_key_id, connector_id)
                continue
            if key_id not in held:
                missing.add(key_id)
                continue
            try:
                keyring.decrypt(token, aad=secret_aad(organization_id, connector_id, name))
            except DecryptionError:
                unreadable.setdefault(key_id, connector_id)
            else:
                opened.add(key_id)
    unreadable_webhooks: dict[str, uuid.UUID] = {}
    for key_id, organization_id, webhook_id, sealed in webhooks:
        if key_id not in held:
            missing.add(key_id)
            continue
        try:
            open_secret(keyring, organization_id, webhook_id, sealed)
        except DecryptionError:
            unreadable_webhooks.setdefault(key_id, webhook_id)
        else:
            opened.add(key_id)
    return KeyRingCheck(
        opened=tuple(sorted(opened - unreadable.keys() - unreadable_webhooks.keys())),
        missing=tuple(sorted(missing)),
        unreadable=tuple(sorted(unreadable.items())),
        unreadable_webhooks=tuple(sorted(unreadable_webhooks.items())),
    )


async def require_readable_secrets(settings: Settings) -> None:
    """``ConfigError`` (one line) unless the configured key ring opens the stored secrets."""
    keyring = KeyRing.from_settings(settings)
    db = Database(build_engine(settings.effective_database_url))
    try:
        found = await check_key_ring(db, keyring)
    except DatabaseUnavailable:
        raise ConfigError("cannot reach the database to check the stored secrets") from None
    finally:
        await db.dispose()
    if not found.ok:
        raise ConfigError("; ".join(found.problems()))
