"""Webhook signing secrets and the key ring: `rotate-keys` re-seals them under the newest key,
and the start-up check opens one per key id. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import secrets

from pydantic import SecretStr
from sqlalchemy import select

from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.keycheck import check_key_ring
from app.rotation import rotate_keys
from app.webhooks.models import WebhookSubscription
from app.webhooks.secrets import open_secret
from tests.webhooks.test_outbox import subscribe


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))


async def _subscriptions(db: Database) -> list[WebhookSubscription]:
    async with db.read() as session:
        return list((await session.execute(select(WebhookSubscription))).scalars().all())


async def test_rotate_keys_reseals_webhook_secrets_under_the_newest_key(settings: Settings) -> None:
    assert settings.encryption_keys is not None
    old = settings.encryption_keys.get_secret_value()  # "k1:..."
    db = Database(build_engine(settings.effective_database_url))
    try:
        first = await subscribe(db, settings)
        second = await subscribe(db, settings, types=["connector.deleted"])
        before = {
            row.id: open_secret(KeyRing.from_settings(settings), row.organization_id, row.id, row.secret)
            for row in await _subscriptions(db)
        }

        k2 = _key()
        rotated = settings.model_copy(update={"encryption_keys": SecretStr(f"k2:{k2},{old}")})
        report = await rotate_keys(rotated)

        assert report.rotated == 2 and report.failed == 0
        new_ring = KeyRing([("k2", _raw(k2))])
        after = await _subscriptions(db)
        assert {row.id for row in after} == {first, second}
        for row in after:
            assert row.key_id == "k2"
            opened = open_secret(new_ring, row.organization_id, row.id, row.secret)
            assert opened.get_secret_value() == before[row.id].get_secret_value()
        # A second run finds nothing left to do.
        assert (await rotate_keys(rotated)).rotated == 0

        # The start-up check opens the new sample with the new key, and names a ring without it.
        assert (await check_key_ring(db, new_ring)).ok
        lacking = await check_key_ring(db, KeyRing([("k9", _raw(_key()))]))
        assert lacking.missing == ("k2",)
    finally:
        await db.dispose()


async def test_the_key_ring_check_names_a_webhook_whose_secret_it_cannot_open(settings: Settings) -> None:
    db = Database(build_engine(settings.effective_database_url))
    try:
        webhook_id = await subscribe(db, settings)
        other_bytes = KeyRing([("k1", _raw(_key()))])

        found = await check_key_ring(db, other_bytes)

        assert not found.ok
        assert found.unreadable_webhooks == (("k1", webhook_id),)
        [problem] = found.problems()
        assert str(webhook_id) in problem and "signing secret of webhook" in problem
    finally:
        await db.dispose()
