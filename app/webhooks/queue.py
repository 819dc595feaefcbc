"""The delivery queue's SQL: claim due deliveries with a lease, record attempts, prune old events.

Every replica runs a delivery worker over the same tables, so a delivery must be sent by one of
them at a time, and a replica that dies holding one must not lose it:

* **Claim, fairly.** One short write transaction takes at most one delivery per subscription:
  its oldest due one (``pending``, due, lease free or expired, subscription enabled and
  ``active``), and only while no other delivery of that subscription is held by anyone. So a
  subscription's deliveries go one attempt at a time, in order, and a slow or dead receiver
  holds up only its own. Subscriptions are taken round-robin across organizations (each
  organization's oldest due first), up to ``per_organization`` held at once by the claimer: an
  organization with many subscriptions, or a long backlog, never fills a claim. On PostgreSQL the
  chosen subscriptions' rows are locked ``FOR UPDATE SKIP LOCKED``: replicas claiming at the
  same moment each get other subscriptions, and none waits for another. On SQLite a write
  transaction starts with ``BEGIN IMMEDIATE`` (``app.core.db``), so the claim runs with no other
  writer in between. The update repeats the conditions either way, and ``RETURNING`` says which
  rows it took.
* **Lease.** The value written to ``claimed_until`` is also the claim's token: recording an
  attempt requires the row to still carry it. A replica that was too slow (its lease expired and
  another claimed the delivery) records nothing, and the other replica's attempt counts.
* **Give up.** A delivery whose schedule is exhausted ends ``failed`` and marks its subscription
  ``failing``; the claim skips failing subscriptions until they are fixed (``app.webhooks``'
  API makes their pending deliveries due again).

The worker is the service's own, for every organization at once: unlike the repositories, these
methods do not take an ``organization_id``; each row they return carries its own.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, aliased

from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription

# Events removed per statement when pruning: each delete stays a short transaction.
PRUNE_BATCH: Final = 500
# Subscriptions with something due that one claim looks at, the longest waiting first.
_HEADS: Final = 512


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery this replica holds until ``lease``, with what sending it takes.

    ``secret`` and ``previous_secret`` are sealed (``app.webhooks.secrets``); the previous one is
    given only while it still signs (its overlap has not ended).
    """

    id: uuid.UUID
    event_id: str
    event_type: str
    payload: str
    attempts: int
    subscription_id: uuid.UUID
    organization_id: str
    url: str
    secret: str
    previous_secret: str | None
    key_id: str
    lease: datetime


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(
        WebhookDelivery.state == "pending",
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now),
    )


def _deliverable() -> ColumnElement[bool]:
    return and_(WebhookSubscription.enabled.is_(True), WebhookSubscription.state == "active")


# Another delivery of the same subscription, for "is one of its deliveries held by anyone".
_OTHER = aliased(WebhookDelivery)


def _in_flight(now: datetime, subscription_id: InstrumentedAttribute[uuid.UUID]) -> ColumnElement[bool]:
    """The subscription of ``subscription_id`` (a column of the enclosing statement's table) has
    a delivery under a live lease: its attempt may be under way."""
    return (
        exists()
        .where(
            _OTHER.subscription_id == subscription_id, _OTHER.state == "pending", _OTHER.claimed_until > now
        )
        .correlate(subscription_id.class_)
    )


def _round_robin(
    heads: Sequence[tuple[uuid.UUID, str]],
    limit: int,
    held: Mapping[str, int],
    per_organization: int | None,
) -> list[uuid.UUID]:
    """Up to ``limit`` subscriptions of ``heads`` (in order of their oldest due delivery), one
    organization after another, each organization in the order it first appears, and none past
    ``per_organization`` counting what it already ``held``."""
    queues: dict[str, deque[uuid.UUID]] = {}
    for subscription_id, organization_id in heads:
        queues.setdefault(organization_id, deque()).append(subscription_id)
    counts = dict(held)
    chosen: list[uuid.UUID] = []
    while queues and len(chosen) < limit:
        for organization_id in list(queues):
            queue = queues[organization_id]
            if per_organization is not None and counts.get(organization_id, 0) >= per_organization:
                del queues[organization_id]
                continue
            chosen.append(queue.popleft())
            counts[organization_id] = counts.get(organization_id, 0) + 1
            if not queue:
                del queues[organization_id]
            if len(chosen) >= limit:
                break
    return chosen


class DeliveryQueue:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def any_due(self, *, now: datetime) -> bool:
        """Whether a claim at ``now`` would find something: a read, so that an idle poll never
        takes SQLite's write lock."""
        found = await self.session.execute(
            select(WebhookDelivery.id)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(_due(now), _deliverable())
            .limit(1)
        )
        return found.first() is not None

    async def claim(
        self,
        *,
        now: datetime,
        lease_seconds: float,
        limit: int,
        held: Mapping[str, int] | None = None,
        per_organization: int | None = None,
    ) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` due deliveries, one per subscription, round-robin across
        organizations, until ``now + lease_seconds``.

        ``held`` counts the attempts the claimer already has under way per organization; with
        ``per_organization``, no organization gets more than that many in all. Run it in a write
        transaction (``Database.write``) of its own, committed before sending.
        """
        until = now + timedelta(seconds=lease_seconds)
        heads = await self.session.execute(
            select(
                WebhookSubscription.id,
                WebhookSubscription.organization_id,
                func.min(WebhookDelivery.next_attempt_at).label("due"),
            )
            .join(WebhookDelivery, WebhookDelivery.subscription_id == WebhookSubscription.id)
            .where(_due(now), _deliverable(), ~_in_flight(now, WebhookSubscription.id))
            .group_by(WebhookSubscription.id, WebhookSubscription.organization_id)
            .order_by("due", WebhookSubscription.id)
            .limit(_HEADS)
        )
        candidates = [
            (subscription_id, organization_id) for subscription_id, organization_id, _ in heads.all()
        ]
        organization_of = dict(candidates)
        counts = dict(held or {})
        subscriptions: list[uuid.UUID] = []
        tried: set[uuid.UUID] = set()
        # Another claimer may hold some of the chosen ones (PostgreSQL skips them): choose again
        # among the others until the claim is full or none is left.
        while len(subscriptions) < limit:
            chosen = _round_robin(
                [candidate for candidate in candidates if candidate[0] not in tried],
                limit - len(subscriptions),
                counts,
                per_organization,
            )
            if not chosen:
                break
            tried.update(chosen)
            # Rendered on PostgreSQL only (NO KEY: the deliveries' foreign keys can still be checked
            # meanwhile); SQLite's write transaction already excludes other writers.
            locked = await self.session.execute(
                select(WebhookSubscription.id)
                .where(WebhookSubscription.id.in_(chosen), _deliverable())
                .with_for_update(skip_locked=True, key_share=True)
            )
            for subscription_id in locked.scalars():
                subscriptions.append(subscription_id)
                organization_id = organization_of[subscription_id]
                counts[organization_id] = counts.get(organization_id, 0) + 1
        if not subscriptions:
            return []
        ranked = (
            select(
                WebhookDelivery.id,
                func.row_number()
                .over(
                    partition_by=WebhookDelivery.subscription_id,
                    order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id),
                )
                .label("rank"),
            )
            .where(WebhookDelivery.subscription_id.in_(subscriptions), _due(now))
            .subquery()
        )
        firsts = list((await self.session.execute(select(ranked.c.id).where(ranked.c.rank == 1))).scalars())
        if not firsts:
            return []
        # The conditions again: another claimer may have committed one of these subscriptions'
        # deliveries since the heads were read.
        taken = await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id.in_(firsts), _due(now), ~_in_flight(now, WebhookDelivery.subscription_id)
            )
            .values(claimed_until=until, updated_at=now)
            .returning(WebhookDelivery.id)
            .execution_options(synchronize_session=False)
        )
        claimed = list(taken.scalars())
        if not claimed:
            return []
        rows = await self.session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.event_id,
                WebhookEvent.type,
                WebhookEvent.payload,
                WebhookDelivery.attempts,
                WebhookSubscription.id,
                WebhookSubscription.organization_id,
                WebhookSubscription.url,
                WebhookSubscription.secret,
                WebhookSubscription.previous_secret,
                WebhookSubscription.previous_secret_expires_at,
                WebhookSubscription.key_id,
            )
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(WebhookDelivery.id.in_(claimed))
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        )
        return [
            ClaimedDelivery(
                id=delivery_id,
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                attempts=attempts,
                subscription_id=subscription_id,
                organization_id=organization_id,
                url=url,
                secret=secret,
                previous_secret=previous if previous_until is not None and previous_until > now else None,
                key_id=key_id,
                lease=until,
            )
            for (
                delivery_id,
                event_id,
                event_type,
                payload,
                attempts,
                subscription_id,
                organization_id,
                url,
                secret,
                previous,
                previous_until,
                key_id,
            ) in rows.all()
        ]

    async def record(
        self,
        claimed: ClaimedDelivery,
        *,
        attempted_at: datetime,
        now: datetime,
        status_code: int | None,
        duration_ms: int,
        error: str | None,
        succeeded: bool,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Record one attempt of a delivery this replica still holds, and release the lease.

        Succeeded: the delivery is done. Failed with a ``next_attempt_at``: it is due again then.
        Failed without one (the schedule is exhausted): it ends ``failed`` and its subscription
        becomes ``failing`` from ``now`` (kept from the first such failure while it stays failing).
        False, and nothing written, when the lease was lost to another replica.
        """
        if succeeded:
            state, due = "succeeded", None
        elif next_attempt_at is not None:
            state, due = "pending", next_attempt_at
        else:
            state, due = "failed", None
        result = await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == claimed.id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.claimed_until == claimed.lease,
            )
            .values(
                state=state,
                attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=due,
                claimed_until=None,
                last_attempt_at=attempted_at,
                last_status_code=status_code,
                last_duration_ms=duration_ms,
                last_error=error[:255] if error is not None else None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if not getattr(result, "rowcount", 0):
            return False
        if state == "failed":
            await self.session.execute(
                update(WebhookSubscription)
                .where(
                    WebhookSubscription.id == claimed.subscription_id, WebhookSubscription.state == "active"
                )
                .values(
                    state="failing",
                    failing_since=now,
                    version=WebhookSubscription.version + 1,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        return True

    async def oldest_pending(self) -> datetime | None:
        """When the oldest event still waiting for a delivery that is being tried was written:
        pending, for an enabled and active subscription. None when there is none."""
        return (
            await self.session.execute(
                select(func.min(WebhookEvent.created_at))
                .select_from(WebhookDelivery)
                .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
                .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
                .where(WebhookDelivery.state == "pending", _deliverable())
            )
        ).scalar_one_or_none()

    async def prune(self, *, before: datetime, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` events written before ``before`` whose deliveries are all
        finished (none ``pending``), with their deliveries; how many events were deleted."""
        old = (
            select(WebhookEvent.id)
            .where(
                WebhookEvent.created_at < before,
                ~exists().where(
                    WebhookDelivery.event_id == WebhookEvent.id, WebhookDelivery.state == "pending"
                ),
            )
            .order_by(WebhookEvent.created_at)
            .limit(limit)
        )
        ids: Sequence[str] = list((await self.session.execute(old)).scalars())
        if not ids:
            return 0
        # The deliveries would go with their events (ON DELETE CASCADE); deleted here explicitly
        # so that nothing depends on SQLite's foreign_keys pragma. A pending delivery written
        # since the select (a resend) keeps its event.
        finished = ~exists().where(
            WebhookDelivery.event_id == WebhookEvent.id, WebhookDelivery.state == "pending"
        )
        await self.session.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.event_id.in_(ids), WebhookDelivery.state != "pending")
            .execution_options(synchronize_session=False)
        )
        result = await self.session.execute(
            delete(WebhookEvent)
            .where(WebhookEvent.id.in_(ids), finished)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


__all__ = ["PRUNE_BATCH", "ClaimedDelivery", "DeliveryQueue"]
