"""All SQL of the webhook API: subscriptions, and the deliveries a caller reads or resends.

Every method takes the organization; nothing here commits. The delivery worker's own SQL
(claiming, recording attempts, pruning) is in ``app.webhooks.queue``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription


class WebhookRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # Subscriptions ------------------------------------------------------------------------------

    async def lock_organization(self, organization_id: str) -> None:
        """Hold the organization's subscription lock until the transaction ends.

        Creates for one organization queue on it, so the count-then-insert that enforces the
        limit cannot interleave. On PostgreSQL a transaction-scoped advisory lock on the
        organization's name (a hash collision only makes two organizations queue together);
        SQLite serialises writers already.
        """
        if self.session.get_bind().dialect.name == "postgresql":
            key = func.hashtextextended(f"webhook_subscriptions:{organization_id}", 0)
            await self.session.execute(select(func.pg_advisory_xact_lock(key)))

    async def count(self, organization_id: str) -> int:
        result = await self.session.execute(
            select(func.count())
            .select_from(WebhookSubscription)
            .where(WebhookSubscription.organization_id == organization_id)
        )
        return int(result.scalar_one())

    async def list(self, organization_id: str) -> Sequence[WebhookSubscription]:
        result = await self.session.execute(
            select(WebhookSubscription)
            .where(WebhookSubscription.organization_id == organization_id)
            .order_by(WebhookSubscription.created_at, WebhookSubscription.id)
        )
        return result.scalars().all()

    async def get(
        self, organization_id: str, subscription_id: uuid.UUID, *, for_update: bool = False
    ) -> WebhookSubscription | None:
        """The subscription as stored now, also after an ``update`` in this session; with
        ``for_update``, locked until the transaction ends (on PostgreSQL; SQLite's write
        transaction already excludes other writers)."""
        query = (
            select(WebhookSubscription)
            .where(
                WebhookSubscription.organization_id == organization_id,
                WebhookSubscription.id == subscription_id,
            )
            .execution_options(populate_existing=True)
        )
        if for_update:
            query = query.with_for_update()
        result = await self.session.execute(query)
        return result.scalar_one_or_none()

    async def add(self, subscription: WebhookSubscription) -> None:
        self.session.add(subscription)
        await self.session.flush()

    async def update(
        self,
        organization_id: str,
        subscription_id: uuid.UUID,
        expected_version: int,
        values: dict[str, Any],
    ) -> bool:
        """Apply ``values`` if the row is still at ``expected_version``; False if it is not."""
        result = await self.session.execute(
            update(WebhookSubscription)
            .where(
                WebhookSubscription.organization_id == organization_id,
                WebhookSubscription.id == subscription_id,
                WebhookSubscription.version == expected_version,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def delete(self, organization_id: str, subscription_id: uuid.UUID) -> bool:
        """Delete the subscription and its deliveries; False if it does not exist."""
        # The deliveries would go with it (ON DELETE CASCADE); deleted explicitly so that nothing
        # depends on SQLite's foreign_keys pragma. Their events stay until pruned.
        await self.session.execute(
            delete(WebhookDelivery)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.subscription_id == subscription_id,
            )
            .execution_options(synchronize_session=False)
        )
        result = await self.session.execute(
            delete(WebhookSubscription)
            .where(
                WebhookSubscription.organization_id == organization_id,
                WebhookSubscription.id == subscription_id,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    # Deliveries ---------------------------------------------------------------------------------

    async def make_pending_due(self, organization_id: str, subscription_id: uuid.UUID, now: datetime) -> int:
        """Make every pending delivery of the subscription due at ``now``; how many there were.

        A lease a replica holds is left alone: that attempt is recorded as usual.
        """
        result = await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.subscription_id == subscription_id,
                WebhookDelivery.state == "pending",
            )
            .values(next_attempt_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def deliveries(
        self, organization_id: str, subscription_id: uuid.UUID, *, limit: int
    ) -> Sequence[tuple[WebhookDelivery, str]]:
        """The subscription's newest deliveries, newest first, each with its event's type."""
        result = await self.session.execute(
            select(WebhookDelivery, WebhookEvent.type)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.subscription_id == subscription_id,
            )
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(limit)
        )
        return [(delivery, str(event_type)) for delivery, event_type in result.all()]

    async def delivery(
        self, organization_id: str, subscription_id: uuid.UUID, delivery_id: uuid.UUID
    ) -> tuple[WebhookDelivery, str] | None:
        """One delivery of the subscription, with its event's type."""
        result = await self.session.execute(
            select(WebhookDelivery, WebhookEvent.type)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.subscription_id == subscription_id,
                WebhookDelivery.id == delivery_id,
            )
        )
        found = result.one_or_none()
        return (found[0], str(found[1])) if found is not None else None

    async def pending_count(self, organization_id: str, subscription_id: uuid.UUID) -> int:
        """How many deliveries of the subscription are waiting to be sent."""
        result = await self.session.execute(
            select(func.count())
            .select_from(WebhookDelivery)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(
                WebhookSubscription.organization_id == organization_id,
                WebhookDelivery.subscription_id == subscription_id,
                WebhookDelivery.state == "pending",
            )
        )
        return int(result.scalar_one())

    async def add_delivery(
        self, organization_id: str, subscription_id: uuid.UUID, event_id: str, now: datetime
    ) -> WebhookDelivery | None:
        """Queue the event again for the subscription: a new pending delivery, due at ``now``.

        None when the event is gone (pruned since it was read): the transaction must then be
        rolled back.
        """
        delivery_id = uuid.uuid4()
        try:
            await self.session.execute(
                insert(WebhookDelivery).values(
                    id=delivery_id,
                    subscription_id=subscription_id,
                    event_id=event_id,
                    organization_id=organization_id,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        except IntegrityError:
            return None
        result = await self.session.execute(
            select(WebhookDelivery).where(
                WebhookDelivery.organization_id == organization_id, WebhookDelivery.id == delivery_id
            )
        )
        return result.scalar_one()
