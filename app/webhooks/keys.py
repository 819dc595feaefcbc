"""Webhook signing secrets and the key ring: re-encrypting them under the newest key
(``python -m app rotate-keys``) and the sample ``serve`` and ``check`` open at start.

Like connectors, a subscription's ``key_id`` names the key its sealed secrets are under (the
previous secret, during a rotation overlap, is sealed under the same key), and a row is rewritten
only if that key id is still the one read, so rotation is safe to interrupt, to run again and to
run while the service serves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import DecryptionError, KeyRing
from app.core.db import Database
from app.webhooks.models import WebhookSubscription
from app.webhooks.secrets import open_secret, seal_secret

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WebhookRotation:
    rotated: int = 0
    skipped: int = 0
    failed: int = 0


async def rotate_webhook_secrets(db: Database, keyring: KeyRing, *, batch_size: int = 100) -> WebhookRotation:
    report = WebhookRotation()
    primary = keyring.primary_key_id
    failed: set[uuid.UUID] = set()
    while True:
        async with db.write() as session:
            result = await session.execute(
                select(WebhookSubscription)
                .where(WebhookSubscription.key_id != primary)
                .order_by(WebhookSubscription.id)
                .limit(batch_size + len(failed))
            )
            rows = [row for row in result.scalars().all() if row.id not in failed][:batch_size]
            if not rows:
                return report
            for row in rows:
                try:
                    values = {"secret": _reseal(keyring, row, row.secret), "key_id": primary}
                    if row.previous_secret is not None:
                        values["previous_secret"] = _reseal(keyring, row, row.previous_secret)
                except DecryptionError:
                    log.error("cannot decrypt a webhook's signing secret", extra={"webhook": str(row.id)})
                    failed.add(row.id)
                    report.failed += 1
                    continue
                changed = await session.execute(
                    update(WebhookSubscription)
                    # Only the very ciphertexts read: a rotation of the secret meanwhile, even by a
                    # replica whose ring still puts the old key first, is never undone.
                    .where(
                        WebhookSubscription.id == row.id,
                        WebhookSubscription.key_id == row.key_id,
                        WebhookSubscription.secret == row.secret,
                        WebhookSubscription.previous_secret.is_not_distinct_from(row.previous_secret),
                    )
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if getattr(changed, "rowcount", 0):
                    report.rotated += 1
                else:
                    report.skipped += 1


def _reseal(keyring: KeyRing, row: WebhookSubscription, sealed: str) -> str:
    secret = open_secret(keyring, row.organization_id, row.id, sealed)
    return seal_secret(keyring, row.organization_id, row.id, secret)


async def webhook_samples(session: AsyncSession) -> Sequence[tuple[str, str, uuid.UUID, str]]:
    """One subscription per key id in use: (key id, organization, subscription, sealed secret)."""
    key_ids = (await session.execute(select(WebhookSubscription.key_id).distinct())).scalars().all()
    samples: list[tuple[str, str, uuid.UUID, str]] = []
    for key_id in sorted(key_ids):
        row = (
            await session.execute(
                select(
                    WebhookSubscription.organization_id, WebhookSubscription.id, WebhookSubscription.secret
                )
                .where(WebhookSubscription.key_id == key_id)
                .limit(1)
            )
        ).first()
        if row is not None:
            samples.append((key_id, row[0], row[1], row[2]))
    return samples
