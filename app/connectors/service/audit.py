"""The connector's audit trail: recording events in a write's transaction, recording refused
attempts in a transaction of their own, and reading a connector's history. A part of
``ConnectorService`` (``Auditing``): what it needs of the rest of the service is ``_Service``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.repository import AuditRepository
from app.audit.schemas import AuditAction, AuditEvent, AuditEventList
from app.connectors.models import Connector
from app.connectors.repository import ConnectorRepository
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import AppError, ConnectorNotFound, DatabaseUnavailable

__all__ = ["Auditing"]

log = logging.getLogger("app.connectors.service")


class _Service(Protocol):
    """What auditing uses of the service it is part of."""

    db: Database
    clock: Clock

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector: ...

    async def _audit(
        self,
        session: AsyncSession,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        changed_fields: Sequence[str],
        outcome: str,
        *,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None: ...


class Auditing:
    async def history(
        self: _Service, organization_id: str, connector_id: uuid.UUID, *, limit: int
    ) -> AuditEventList:
        """The connector's audit events, newest first; still readable after a delete.

        Not found only when the organization has neither the connector nor any event for it.
        """
        async with self.db.read() as session:
            events = await AuditRepository(session).for_connector(organization_id, connector_id, limit=limit)
            if not events:
                await self._require(ConnectorRepository(session), organization_id, connector_id)
        return AuditEventList(items=[AuditEvent.model_validate(event) for event in events])

    async def _audit(
        self: _Service,
        session: AsyncSession,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        changed_fields: Sequence[str],
        outcome: str,
        *,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None:
        await AuditRepository(session).record(
            organization_id,
            connector_id,
            action=action,
            actor=actor,
            changed_fields=changed_fields,
            outcome=outcome,
            detail=detail,
            at=at or self.clock.now(),
        )

    async def _record_refusal(
        self: _Service,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        attempted_fields: Sequence[str],
        error: AppError,
    ) -> None:
        """Record a refused attempt on an existing connector, in a transaction of its own."""
        if isinstance(error, ConnectorNotFound | DatabaseUnavailable):
            return  # nothing of the caller's organization was touched, or nothing can be recorded
        provider = error.extra.get("provider_error")
        try:
            async with self.db.write() as session:
                await self._audit(
                    session,
                    organization_id,
                    connector_id,
                    action,
                    actor,
                    attempted_fields,
                    error.code,
                    detail=provider if isinstance(provider, str) else None,
                )
        except Exception as failure:
            # The caller's answer is the refusal; failing to record it must not replace it.
            log.warning(
                "could not record a refused attempt",
                extra={"connector": str(connector_id), "error": type(failure).__name__},
            )
