"""All SQL about audit events. Every method takes the organization; nothing here commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.models import AuditEvent

_MAX_TEXT = 255


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        *,
        action: str,
        actor: str | None,
        changed_fields: Iterable[str],
        outcome: str,
        at: datetime,
        detail: str | None = None,
    ) -> None:
        """Add one event to the session's transaction: it commits, or rolls back, with the change."""
        self.session.add(
            AuditEvent(
                organization_id=organization_id,
                connector_id=connector_id,
                action=action,
                actor=_clip(actor),
                changed_fields=list(changed_fields),
                outcome=outcome,
                detail=_clip(detail),
                created_at=at,
            )
        )
        await self.session.flush()

    async def for_connector(
        self, organization_id: str, connector_id: uuid.UUID, *, limit: int
    ) -> Sequence[AuditEvent]:
        """The connector's events, newest first."""
        result = await self.session.execute(
            select(AuditEvent)
            .where(AuditEvent.organization_id == organization_id, AuditEvent.connector_id == connector_id)
            .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
            .limit(limit)
        )
        return result.scalars().all()


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= _MAX_TEXT else value[:_MAX_TEXT]
