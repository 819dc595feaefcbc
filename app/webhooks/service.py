"""Webhook subscription rules: creation under the limit, changes, rotation, deliveries, resends.

Transactions are short and never span an outbound call: a new URL's destination is checked
(a DNS lookup) between the read and the write, and the write re-checks what the read saw (the
limit, the version).

**Secrets.** A subscription's signing secret is generated here, sealed with the key ring before
it is stored (``app.webhooks.secrets``) and handed back in exactly two answers, the creation and
a rotation. A rotation keeps the secret it replaces as ``previous_secret`` until
``now + secret_overlap``, sealed again under the newest key (the row's ``key_id`` names the key
of both): the delivery worker signs with both until then, so receivers can switch at their own
pace. Only one previous secret is kept: a second rotation within the overlap ends the first
one's at once.

**Fixed.** The delivery worker marks a subscription ``failing`` once a delivery has failed for
its whole retry schedule, and then sends nothing to it. A change of ``url``, or
``enabled: true`` on a failing subscription, is what fixes it: the subscription is ``active``
again and its pending deliveries are due now. This process's worker is told at once
(``on_due``); the others find them on their next poll.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import Any, Final

from app.core.clock import Clock
from app.core.crypto import DecryptionError, KeyRing
from app.core.db import Database
from app.core.errors import (
    ResendLimitReached,
    VersionMismatch,
    WebhookDeliveryNotFound,
    WebhookLimitReached,
    WebhookNotDeliverable,
    WebhookNotFound,
)
from app.webhooks import schemas
from app.webhooks.models import WebhookDelivery, WebhookSubscription
from app.webhooks.repository import WebhookRepository
from app.webhooks.secrets import generate_secret, open_secret, seal_secret

log = logging.getLogger(__name__)

# A resend is refused while a subscription has this many deliveries waiting.
MAX_PENDING_DELIVERIES: Final = 100

# Refuses a URL whose host is, or resolves to, a non-global address (``DestinationNotAllowed``).
DestinationChecker = Callable[[str], Awaitable[None]]


class WebhookService:
    def __init__(
        self,
        *,
        db: Database,
        keyring: KeyRing,
        check_destination: DestinationChecker,
        clock: Clock,
        max_per_org: int,
        secret_overlap_seconds: float,
        on_due: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.check_destination = check_destination
        self.clock = clock
        self.max_per_org = max_per_org
        self.secret_overlap = timedelta(seconds=secret_overlap_seconds)
        # Called once deliveries were made due now (a fix, a resend), after the commit.
        self.on_due = on_due

    # Subscriptions ------------------------------------------------------------------------------

    async def list(self, organization_id: str) -> schemas.WebhookList:
        async with self.db.read() as session:
            rows = await WebhookRepository(session).list(organization_id)
        return schemas.WebhookList(items=[to_out(row) for row in rows], limit=self.max_per_org)

    async def get(self, organization_id: str, subscription_id: uuid.UUID) -> schemas.Webhook:
        async with self.db.read() as session:
            row = await _require(WebhookRepository(session), organization_id, subscription_id)
        return to_out(row)

    async def create(self, organization_id: str, body: schemas.WebhookCreate) -> schemas.WebhookWithSecret:
        # A cheap pre-check, so an impossible create resolves no name; the write checks again
        # under the organization's lock.
        async with self.db.read() as session:
            await self._check_room(WebhookRepository(session), organization_id)
        await self.check_destination(body.url)
        subscription_id = uuid.uuid4()
        secret = generate_secret()
        now = self.clock.now()
        row = WebhookSubscription(
            id=subscription_id,
            organization_id=organization_id,
            url=body.url,
            event_types=list(body.event_types),
            enabled=body.enabled,
            secret=seal_secret(self.keyring, organization_id, subscription_id, secret),
            previous_secret=None,
            previous_secret_expires_at=None,
            key_id=self.keyring.primary_key_id,
            state="active",
            failing_since=None,
            version=1,
            created_at=now,
            updated_at=now,
        )
        async with self.db.write() as session:
            repo = WebhookRepository(session)
            await repo.lock_organization(organization_id)
            await self._check_room(repo, organization_id)
            await repo.add(row)
        return schemas.WebhookWithSecret(**to_out(row).model_dump(), secret=secret.get_secret_value())

    async def update(
        self,
        organization_id: str,
        subscription_id: uuid.UUID,
        patch: schemas.WebhookPatch,
        *,
        if_match: Collection[int] | None,
    ) -> schemas.Webhook:
        async with self.db.read() as session:
            row = await _require(WebhookRepository(session), organization_id, subscription_id)
        if if_match is not None and row.version not in if_match:
            raise VersionMismatch()
        values: dict[str, Any] = {}
        if patch.url is not None and patch.url != row.url:
            values["url"] = patch.url
        if patch.event_types is not None and list(patch.event_types) != row.event_types:
            values["event_types"] = list(patch.event_types)
        if patch.enabled is not None and patch.enabled != row.enabled:
            values["enabled"] = patch.enabled
        fixed = "url" in values or (patch.enabled is True and row.state == "failing")
        if not values and not fixed:
            return to_out(row)
        if "url" in values:
            await self.check_destination(values["url"])
        now = self.clock.now()
        if fixed:
            values.update(state="active", failing_since=None)
        values.update(version=row.version + 1, updated_at=now)
        async with self.db.write() as session:
            repo = WebhookRepository(session)
            if not await repo.update(organization_id, subscription_id, row.version, values):
                await _require(repo, organization_id, subscription_id)
                raise VersionMismatch("the webhook subscription changed while this update was processed")
            if fixed:
                await repo.make_pending_due(organization_id, subscription_id, now)
            updated = await _require(repo, organization_id, subscription_id)
        if fixed:
            self._due()
        return to_out(updated)

    async def delete(
        self, organization_id: str, subscription_id: uuid.UUID, *, if_match: Collection[int] | None
    ) -> None:
        """Delete the subscription and its deliveries: nothing more is sent to it."""
        async with self.db.write() as session:
            repo = WebhookRepository(session)
            row = await _require(repo, organization_id, subscription_id, for_update=True)
            if if_match is not None and row.version not in if_match:
                raise VersionMismatch()
            await repo.delete(organization_id, subscription_id)

    async def rotate_secret(
        self, organization_id: str, subscription_id: uuid.UUID
    ) -> schemas.WebhookWithSecret:
        """A new signing secret; the one it replaces signs alongside it for the overlap."""
        secret = generate_secret()
        sealed = seal_secret(self.keyring, organization_id, subscription_id, secret)
        async with self.db.write() as session:
            repo = WebhookRepository(session)
            row = await _require(repo, organization_id, subscription_id, for_update=True)
            now = self.clock.now()
            previous = self._replaced(row) if self.secret_overlap > timedelta(0) else None
            values = {
                "secret": sealed,
                "previous_secret": previous,
                "previous_secret_expires_at": now + self.secret_overlap if previous is not None else None,
                "key_id": self.keyring.primary_key_id,
                "version": row.version + 1,
                "updated_at": now,
            }
            # The row is locked (SQLite: the only writer): the version cannot have moved.
            await repo.update(organization_id, subscription_id, row.version, values)
            rotated = await _require(repo, organization_id, subscription_id)
        return schemas.WebhookWithSecret(**to_out(rotated).model_dump(), secret=secret.get_secret_value())

    # Deliveries ---------------------------------------------------------------------------------

    async def deliveries(
        self, organization_id: str, subscription_id: uuid.UUID, *, limit: int
    ) -> schemas.WebhookDeliveryList:
        async with self.db.read() as session:
            repo = WebhookRepository(session)
            await _require(repo, organization_id, subscription_id)
            rows = await repo.deliveries(organization_id, subscription_id, limit=limit)
        return schemas.WebhookDeliveryList(items=[delivery_out(row, event_type) for row, event_type in rows])

    async def resend(
        self, organization_id: str, subscription_id: uuid.UUID, delivery_id: uuid.UUID
    ) -> schemas.WebhookDelivery:
        """Queue a delivery's event again for its subscription: a new pending delivery, due now.

        The original is left as it is. Refused on a disabled or failing subscription (the new
        delivery would wait as long as it stays so: fix it first), and when the subscription
        already has ``MAX_PENDING_DELIVERIES`` deliveries waiting.
        """
        async with self.db.write() as session:
            repo = WebhookRepository(session)
            subscription = await _require(repo, organization_id, subscription_id, for_update=True)
            if not subscription.enabled:
                raise WebhookNotDeliverable("the subscription is disabled: enable it, then resend")
            if subscription.state != "active":
                raise WebhookNotDeliverable(
                    "the subscription is failing: fix its URL or set enabled to true, then resend"
                )
            found = await repo.delivery(organization_id, subscription_id, delivery_id)
            if found is None:
                raise WebhookDeliveryNotFound()
            if await repo.pending_count(organization_id, subscription_id) >= MAX_PENDING_DELIVERIES:
                raise ResendLimitReached(
                    f"at most {MAX_PENDING_DELIVERIES} deliveries of a subscription may wait at once"
                )
            original, event_type = found
            now = self.clock.now()
            added = await repo.add_delivery(organization_id, subscription_id, original.event_id, now)
            if added is None:
                raise WebhookDeliveryNotFound("the delivery's event has just been pruned")
        self._due()
        return delivery_out(added, event_type)

    # Helpers ------------------------------------------------------------------------------------

    async def _check_room(self, repo: WebhookRepository, organization_id: str) -> None:
        if await repo.count(organization_id) >= self.max_per_org:
            raise WebhookLimitReached(
                f"an organization may have at most {self.max_per_org} webhook subscriptions"
            )

    def _replaced(self, row: WebhookSubscription) -> str | None:
        """The secret a rotation replaces, sealed again under the newest key, so that the row's
        ``key_id`` names the key of both; None when the key ring cannot open it (it cannot sign
        either, so it stops at once)."""
        try:
            secret = open_secret(self.keyring, row.organization_id, row.id, row.secret)
        except DecryptionError:
            log.warning(
                "the webhook signing secret replaced by a rotation cannot be opened with the key ring",
                extra={"subscription": str(row.id), "key_id": row.key_id},
            )
            return None
        return seal_secret(self.keyring, row.organization_id, row.id, secret)

    def _due(self) -> None:
        if self.on_due is not None:
            self.on_due()


async def _require(
    repo: WebhookRepository, organization_id: str, subscription_id: uuid.UUID, *, for_update: bool = False
) -> WebhookSubscription:
    row = await repo.get(organization_id, subscription_id, for_update=for_update)
    if row is None:
        raise WebhookNotFound()
    return row


def to_out(row: WebhookSubscription) -> schemas.Webhook:
    """The subscription as read: never a secret, sealed or not."""
    return schemas.Webhook.model_validate(
        {
            "id": row.id,
            "url": row.url,
            "event_types": row.event_types,
            "enabled": row.enabled,
            "state": row.state,
            "failing_since": row.failing_since,
            "previous_secret_expires_at": row.previous_secret_expires_at,
            "version": row.version,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }
    )


def delivery_out(row: WebhookDelivery, event_type: str) -> schemas.WebhookDelivery:
    return schemas.WebhookDelivery.model_validate(
        {
            "id": row.id,
            "event_id": row.event_id,
            "event_type": event_type,
            "state": row.state,
            "attempts": row.attempts,
            "last_attempt_at": row.last_attempt_at,
            "last_status_code": row.last_status_code,
            "last_duration_ms": row.last_duration_ms,
            "last_error": row.last_error,
            "next_attempt_at": row.next_attempt_at,
            "created_at": row.created_at,
        }
    )


__all__ = ["DestinationChecker", "WebhookService", "delivery_out", "to_out"]
