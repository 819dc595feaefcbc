"""Every table of the service in one metadata, for Alembic and for checking the migrated schema."""

from __future__ import annotations

from app.audit.models import AuditEvent
from app.connectors.models import Connector, ConnectorGrant, ConsentRequest, Organization
from app.console.models import ConsoleLink, ConsoleSession
from app.core.orm import Base
from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription

__all__ = [
    "AuditEvent",
    "Connector",
    "ConnectorGrant",
    "ConsentRequest",
    "ConsoleLink",
    "ConsoleSession",
    "Organization",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookSubscription",
    "metadata",
]

metadata = Base.metadata
