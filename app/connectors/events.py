"""What connectors tell the rest of the service: an event per change, in the change's transaction.

Connectors declare the interface (``EventRecorder``) and call it inside the write transaction of
every create, update, delete and status change, so an event is written if and only if its change
is. They do not know who listens: the webhooks package implements it (``app.webhooks.outbox``)
and ``app.main`` hands that implementation to the service. Without one, nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["EVENT_TYPES", "EventRecorder", "EventType", "no_events"]

EventType = Literal["connector.created", "connector.updated", "connector.deleted", "connector.status_changed"]
EVENT_TYPES: Final[tuple[EventType, ...]] = (
    "connector.created",
    "connector.updated",
    "connector.deleted",
    "connector.status_changed",
)


class EventRecorder(Protocol):
    """Records one event in ``session``, the transaction of the change it tells of."""

    async def __call__(
        self,
        session: AsyncSession,
        organization_id: str,
        event_type: EventType,
        data: Mapping[str, Any],
        *,
        at: datetime,
    ) -> object: ...


async def no_events(
    session: AsyncSession,
    organization_id: str,
    event_type: EventType,
    data: Mapping[str, Any],
    *,
    at: datetime,
) -> None:
    """The recorder of a service nobody listens to."""
    return None
