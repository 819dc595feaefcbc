"""Re-encrypting stored secrets under the newest key.

Rows are taken in batches of those whose ciphertexts are not under the newest key, each batch in
its own short transaction. A row is rewritten only if its key id and version are still the ones
read: a concurrent update wrote new secrets meanwhile (under the newest key, or under the old one
by a replica not yet given the new ring), and re-encrypting what was read would undo it. Such a
row is read again in a later batch. So the command is safe to interrupt and to run again, and
safe to run while the service serves. Each rewritten row gets a ``rotate_keys``
audit event in the same transaction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from app.audit.repository import AuditRepository
from app.audit.schemas import SUCCEEDED
from app.connectors.grants import rotate_grant_keys
from app.connectors.repository import ConnectorRepository, RotationRepository
from app.core.clock import Clock, SystemClock
from app.core.config import Settings
from app.core.crypto import DecryptionError, KeyRing, secret_aad
from app.core.db import Database, build_engine
from app.webhooks.keys import rotate_webhook_secrets

log = logging.getLogger(__name__)

# The actor of the audit events this command records.
ACTOR = "rotate-keys"


@dataclass(slots=True)
class RotationReport:
    rotated: int = 0
    skipped: int = 0
    failed: int = 0


async def rotate(
    db: Database, keyring: KeyRing, *, batch_size: int = 100, clock: Clock | None = None
) -> RotationReport:
    clock = clock or SystemClock()
    report = RotationReport()
    primary = keyring.primary_key_id
    failed_ids: set[object] = set()
    while True:
        async with db.write() as session:
            repo = RotationRepository(session)
            audit = AuditRepository(session)
            rows = [row for row in await repo.batch_not_under(primary, batch_size + len(failed_ids))]
            rows = [row for row in rows if row.id not in failed_ids][:batch_size]
            if not rows:
                return report
            rotated: list[tuple[str, uuid.UUID]] = []
            for row in rows:
                try:
                    secrets = {
                        name: keyring.encrypt(
                            keyring.decrypt(token, aad=secret_aad(row.organization_id, row.id, name)),
                            aad=secret_aad(row.organization_id, row.id, name),
                        )
                        for name, token in row.secrets.items()
                    }
                except DecryptionError:
                    # A key that was removed from the ring too early: report, never guess.
                    log.error("cannot decrypt a connector's secrets", extra={"connector": str(row.id)})
                    failed_ids.add(row.id)
                    report.failed += 1
                    continue
                if await repo.replace_secrets(
                    row.organization_id, row.id, row.key_id, row.version, secrets, primary
                ):
                    await audit.record(
                        row.organization_id,
                        row.id,
                        action="rotate_keys",
                        actor=ACTOR,
                        changed_fields=[],
                        outcome=SUCCEEDED,
                        detail=f"re-encrypted under key {primary}",
                        at=clock.now(),
                    )
                    rotated.append((row.organization_id, row.id))
                    report.rotated += 1
                else:
                    report.skipped += 1
            if rotated:
                # Processes holding the old ciphertexts read the new ones. Numbered after every row
                # of the batch is locked, as every write takes the change counter last.
                await ConnectorRepository(session).record_changes(rotated, clock.now())


async def rotate_keys(settings: Settings, *, batch_size: int = 100) -> RotationReport:
    """Connectors' secrets, their grants and open consents, then webhooks' signing secrets; one
    report for all."""
    db = Database(build_engine(settings.effective_database_url))
    keyring = KeyRing.from_settings(settings)
    try:
        report = await rotate(db, keyring, batch_size=batch_size)
        grants = await rotate_grant_keys(db, keyring, batch_size=batch_size)
        webhooks = await rotate_webhook_secrets(db, keyring, batch_size=batch_size)
    finally:
        await db.dispose()
    for part in (grants, webhooks):
        report.rotated += part.rotated
        report.skipped += part.skipped
        report.failed += part.failed
    return report
