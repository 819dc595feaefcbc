"""Re-encrypting stored secrets under the newest key.

Rows are taken in batches of those whose ciphertexts are not under the newest key, each batch in
its own short transaction. A row is rewritten only if its key id and version are still the ones
read: a concurrent update wrote new secrets meanwhile (under the newest key, or under the old one
by a replica not yet given the new ring), and re-encrypting what was read would undo it. Such a
row is read again in a later batch. So the command is safe to interrupt and to run again, and
safe to run while the service serves. Each rewritten row gets a ``rotate_keys``
audit event in the same transaction. The grants of authorization code connectors and the consents
under way are re-encrypted the same way (``rotate_grant_keys``), without audit events: a grant is
rewritten only at the generation read, so a renewal's rotation is never undone.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import cast

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.repository import AuditRepository
from app.audit.schemas import SUCCEEDED
from app.connectors.models import ConnectorGrant, ConsentRequest
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


@dataclass(slots=True)
class GrantRotation:
    rotated: int = 0
    skipped: int = 0
    failed: int = 0


async def rotate_grant_keys(db: Database, keyring: KeyRing, *, batch_size: int = 100) -> GrantRotation:
    """Re-encrypt grants and open consents under the newest key (``connectors rotate-keys``).

    A grant is rewritten only if its generation and key id are still the ones read, so a renewal
    that rotated its refresh token meanwhile is never undone; a consent is used once and gone in
    minutes, and is rewritten only if it is still there.
    """
    report = GrantRotation()
    primary = keyring.primary_key_id
    tables: tuple[type[ConnectorGrant] | type[ConsentRequest], ...] = (ConnectorGrant, ConsentRequest)
    for table in tables:
        failed: set[object] = set()
        while True:
            async with db.write() as session:
                result = await session.execute(
                    select(table).where(table.key_id != primary).limit(batch_size + len(failed))
                )
                found = cast(list[ConnectorGrant | ConsentRequest], list(result.scalars().all()))
                rows = [row for row in found if _row_key(row) not in failed][:batch_size]
                if not rows:
                    break
                for row in rows:
                    try:
                        values = _resealed(keyring, row)
                    except DecryptionError:
                        log.error(
                            "cannot decrypt a connector's grant", extra={"connector": str(row.connector_id)}
                        )
                        failed.add(_row_key(row))
                        report.failed += 1
                        continue
                    if await _rewrite(session, row, {**values, "key_id": primary}):
                        report.rotated += 1
                    else:
                        report.skipped += 1
    return report


def _row_key(row: ConnectorGrant | ConsentRequest) -> object:
    return row.connector_id if isinstance(row, ConnectorGrant) else row.state_hash


_SEALED_FIELDS = {ConnectorGrant: ("refresh_token", "access_token"), ConsentRequest: ("code_verifier",)}


def _resealed(keyring: KeyRing, row: ConnectorGrant | ConsentRequest) -> dict[str, str]:
    values: dict[str, str] = {}
    for field in _SEALED_FIELDS[type(row)]:
        sealed = getattr(row, field)
        if sealed is not None:
            aad = secret_aad(row.organization_id, row.connector_id, field)
            values[field] = keyring.encrypt(keyring.decrypt(sealed, aad=aad), aad=aad)
    return values


async def _rewrite(
    session: AsyncSession, row: ConnectorGrant | ConsentRequest, values: dict[str, str]
) -> bool:
    if isinstance(row, ConnectorGrant):
        statement = update(ConnectorGrant).where(
            ConnectorGrant.connector_id == row.connector_id,
            ConnectorGrant.generation == row.generation,
            ConnectorGrant.key_id == row.key_id,
        )
    else:
        statement = update(ConsentRequest).where(
            ConsentRequest.state_hash == row.state_hash, ConsentRequest.key_id == row.key_id
        )
    result = await session.execute(statement.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(result, "rowcount", 0))
