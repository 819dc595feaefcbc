"""Writing events into the outbox, in the transaction of the change that causes them.

``record_event`` inserts the event (its body exactly as it will be signed and sent) and one
pending delivery per enabled subscription of the organization that wants its type. Nothing is
sent here: the delivery worker (``app.webhooks.delivery``) picks deliveries up after the commit,
so an event is never lost once its change is committed, and never sent for a change that rolled
back. Events carry identifiers, names, states and error codes, never a secret, token or header.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.connectors.events import EVENT_TYPES, EventType
from app.core.clock import rfc3339
from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription

# The events are the connectors' (``app.connectors.events``); this is their recorder.
__all__ = ["EVENT_TYPES", "EventType", "event_body", "new_event_id", "record_event"]


def new_event_id() -> str:
    """A ``webhook-id``: unique, and the same for every attempt of the event."""
    return f"msg_{uuid.uuid4().hex}"


def event_body(event_type: str, data: Mapping[str, Any], at: datetime) -> str:
    """The body Standard Webhooks recommends: ``{"type", "timestamp", "data"}``, compact JSON."""
    return json.dumps(
        {"type": event_type, "timestamp": rfc3339(at), "data": dict(data)},
        separators=(",", ":"),
        ensure_ascii=False,
    )


async def record_event(
    session: AsyncSession,
    organization_id: str,
    event_type: EventType,
    data: Mapping[str, Any],
    *,
    at: datetime,
) -> str | None:
    """Queue ``event_type`` for every subscription of the organization that wants it; the
    event's id, or None when no subscription wants it (nothing is written then)."""
    result = await session.execute(
        select(WebhookSubscription.id, WebhookSubscription.event_types).where(
            WebhookSubscription.organization_id == organization_id, WebhookSubscription.enabled.is_(True)
        )
    )
    wanted = [sid for sid, types in result.all() if not types or event_type in types]
    if not wanted:
        return None
    event_id = new_event_id()
    await session.execute(
        insert(WebhookEvent).values(
            id=event_id,
            organization_id=organization_id,
            type=event_type,
            payload=event_body(event_type, data, at),
            created_at=at,
        )
    )
    await session.execute(
        insert(WebhookDelivery),
        [
            {
                "id": uuid.uuid4(),
                "subscription_id": subscription_id,
                "event_id": event_id,
                "organization_id": organization_id,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": at,
                "created_at": at,
                "updated_at": at,
            }
            for subscription_id in sorted(wanted)
        ],
    )
    return event_id
