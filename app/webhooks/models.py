"""The webhook tables: subscriptions, events (the outbox) and deliveries.

An event is written in the same transaction as the change that causes it, together with one
delivery per subscription of the organization that wants it; the body is stored exactly as it
is signed and sent. Deliveries are claimed by one replica at a time with a lease
(``claimed_until``), so a replica that dies mid-delivery loses nothing: its lease expires and
another replica (or the same one, restarted) sends the event again.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.orm import Base


class WebhookSubscription(Base):
    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_org", "organization_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(String(2048))
    # Event types wanted; empty means every type.
    event_types: Mapped[list[str]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean)
    # The signing secret (``whsec_...``) sealed with the key ring; the one it replaced keeps
    # signing alongside it until ``previous_secret_expires_at``.
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    key_id: Mapped[str] = mapped_column(String(32))
    # ``active``, or ``failing`` once a delivery has failed for its whole retry schedule: then no
    # delivery is attempted until the subscription is changed (fixed) or re-enabled.
    state: Mapped[str] = mapped_column(String(16))
    failing_since: Mapped[datetime | None] = mapped_column()
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()


class WebhookEvent(Base):
    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_created", "created_at"),)

    # The ``webhook-id`` header: the same for every attempt and every subscription.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    # The JSON body exactly as signed and sent.
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_subscription", "subscription_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    subscription_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    event_id: Mapped[str] = mapped_column(String(64), ForeignKey("webhook_events.id", ondelete="CASCADE"))
    organization_id: Mapped[str] = mapped_column(String(255))
    # ``pending`` (due at ``next_attempt_at``), ``succeeded``, or ``failed`` (retries exhausted).
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # The lease of the replica sending it now; expired, anyone may claim it again.
    claimed_until: Mapped[datetime | None] = mapped_column()
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_duration_ms: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()


__all__ = ["WebhookDelivery", "WebhookEvent", "WebhookSubscription"]
