"""Sending webhook events in the background: claim, sign, send, record, retry.

Each process runs one ``DeliveryWorker``. It keeps up to ``concurrency`` attempts under way, at
most ``per_organization`` of them for one organization, each on its own: whenever one ends, or
every ``webhook_poll_interval_seconds``, or at once when this process has committed a change
(``wake``), it claims more (``app.webhooks.queue``: at most one delivery per subscription at a
time, round-robin across organizations, with a lease) and starts them. No attempt waits for
another: a receiver that takes the whole deadline to answer holds one slot and its own
subscription's queue, nothing else. Nothing here runs on a request's path.

**Sending.** The stored event body goes out as it is, ``POST`` with ``Content-Type:
application/json`` and the Standard Webhooks headers: ``webhook-id`` (the event's id, the same for
every attempt and every subscription), ``webhook-timestamp`` (the attempt's time, whole seconds)
and ``webhook-signature``, made by the ``standardwebhooks`` library with the subscription's
secret and, while a rotation's overlap lasts, also with the previous one (two signatures,
space-separated). The request leaves through an ``OutboundClient`` of its own: the same address
policy, TLS verification, CA bundle and response size cap as token requests, no redirects, one
attempt within ``webhook_timeout_seconds``. A 2xx answer delivers the event; anything else (any
other status, a 3xx included, a timeout, a TLS or connection failure, a destination that now
resolves to a non-global address, a secret the key ring cannot open) is a failed attempt.

**Retries.** A failed attempt is tried again after the next delay of ``RETRY_DELAYS``: 5 s,
30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h and 8 h, each spread by ±20 % of jitter, so
eleven attempts in all, the last about 23 h 45 min after the first. When the last fails the delivery is
``failed`` and its subscription ``failing``: none of its deliveries is tried until it is fixed.

**At least once.** A lease outlives an attempt (``lease_seconds``): a replica that dies while
sending leaves the delivery to be claimed again once the lease expires, by another replica or by
itself restarted, and the receiver may see the event twice; the ``webhook-id`` tells them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from pydantic import SecretStr
from standardwebhooks import Webhook

from app.core.clock import Clock
from app.core.config import Settings
from app.core.crypto import DecryptionError, KeyRing
from app.core.db import Database
from app.core.errors import AppError, DatabaseUnavailable
from app.core.metrics import Metrics
from app.core.outbound import OutboundClient, Resolver, on_behalf_of
from app.webhooks.queue import ClaimedDelivery, DeliveryQueue
from app.webhooks.secrets import open_secret

log = logging.getLogger(__name__)

# Seconds to wait after each failed attempt; one more failure after the last gives up.
RETRY_DELAYS: Final[tuple[float, ...]] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
MAX_ATTEMPTS: Final = len(RETRY_DELAYS) + 1
# Each delay is spread over [1 - JITTER, 1 + JITTER] of its nominal length.
JITTER: Final = 0.2
# Attempts one process has under way at once, in all and for one organization.
CONCURRENCY: Final = 16
PER_ORGANIZATION: Final = 4
# How often each process deletes events past their retention.
PRUNE_INTERVAL_SECONDS: Final = 600.0


def retry_delay(attempts: int, jitter: float) -> float | None:
    """Seconds until the next attempt after ``attempts`` failed ones; None when they were the
    last. ``jitter`` is a number in [0, 1) that places the delay within ±``JITTER``."""
    if attempts < 1 or attempts > len(RETRY_DELAYS):
        return None
    return RETRY_DELAYS[attempts - 1] * (1 - JITTER + 2 * JITTER * jitter)


def signature_headers(
    event_id: str, payload: str, at: datetime, signing: Sequence[SecretStr]
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one signature per secret in ``signing``."""
    timestamp = at.replace(microsecond=0)
    signatures = [Webhook(secret.get_secret_value()).sign(event_id, timestamp, payload) for secret in signing]
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


@dataclass(frozen=True, slots=True)
class _Outcome:
    # ``succeeded``, ``failed`` (an answer other than 2xx) or the error code of an attempt that
    # got no answer: the metrics' ``result`` label.
    result: str
    status_code: int | None = None
    error: str | None = None


class _SecretUnreadable(Exception):
    pass


class DeliveryWorker:
    """Delivers this process's share of due webhook deliveries; see the module docstring."""

    def __init__(
        self,
        *,
        db: Database,
        keyring: KeyRing,
        outbound: OutboundClient,
        clock: Clock,
        metrics: Metrics | None = None,
        poll_interval: float = 1.0,
        timeout: float = 10.0,
        retention: float = 7 * 86_400.0,
        concurrency: int = CONCURRENCY,
        per_organization: int = PER_ORGANIZATION,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        """``outbound`` must be built for webhooks (``webhook_outbound``); ``timeout`` is its
        deadline, from which the lease is derived. ``jitter`` (for tests) returns a number in
        [0, 1) placing each retry delay within its spread."""
        self.db = db
        self.keyring = keyring
        self.outbound = outbound
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.poll_interval = poll_interval
        # Comfortably longer than an attempt (connection, TLS, answer) plus recording it.
        self.lease_seconds = 2 * timeout + 2.0
        self.retention = retention
        self.concurrency = concurrency
        self.per_organization = per_organization
        self._jitter = jitter or secrets.SystemRandom().random
        self._wake = asyncio.Event()
        # Attempts under way, and how many of them are each organization's.
        self._attempts: set[asyncio.Task[None]] = set()
        self._held: Counter[str] = Counter()
        # Attempts ended so far (``deliver_due`` tells whether one ended while it claimed).
        self._ended = 0
        # One claim at a time in this process; and while a round of ``deliver_due`` runs, the
        # background loop claims nothing (the round sees every attempt it waits for).
        self._claiming = asyncio.Lock()
        self._round = asyncio.Lock()
        self._next_prune = -float("inf")

    def wake(self) -> None:
        """Look for due deliveries now (this process has just committed a change)."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled: claim whenever a slot is free and something may be due (a
        poll interval passed, an attempt ended, or a change was made here), pruning now and then."""
        try:
            while True:
                self._wake.clear()
                try:
                    async with self._round:
                        await self._fill()
                    if self.clock.monotonic() >= self._next_prune:
                        self._next_prune = self.clock.monotonic() + PRUNE_INTERVAL_SECONDS
                        await self.prune()
                except DatabaseUnavailable:
                    pass  # logged once by the database; the next poll tries again
                except Exception as error:
                    log.exception("a webhook delivery round failed", extra={"error": type(error).__name__})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()
        finally:
            await self._cancel_attempts()

    async def deliver_due(self) -> int:
        """Claim and send what is due until nothing is left and no attempt is under way; how many
        attempts were started. Attempts started meanwhile by ``run`` are waited for too."""
        attempted = 0
        async with self._round:
            while True:
                ended = self._ended
                attempted += await self._fill()
                if self._attempts:
                    await asyncio.wait(set(self._attempts), return_when=asyncio.FIRST_COMPLETED)
                elif self._ended == ended:
                    return attempted
                # Else an attempt ended while this claim ran, which saw its delivery still held:
                # what it frees (its subscription's next delivery) may be due now.

    async def _fill(self) -> int:
        """Claim as many due deliveries as there are free slots and start their attempts."""
        async with self._claiming:
            free = self.concurrency - len(self._attempts)
            if free <= 0:
                return 0
            async with self.db.read() as session:
                if not await DeliveryQueue(session).any_due(now=self.clock.now()):
                    return 0
            async with self.db.write() as session:
                claimed = await DeliveryQueue(session).claim(
                    now=self.clock.now(),
                    lease_seconds=self.lease_seconds,
                    limit=free,
                    held=self._held,
                    per_organization=self.per_organization,
                )
        for delivery in claimed:
            self._held[delivery.organization_id] += 1
            attempt = asyncio.create_task(self._attempt(delivery), name=f"webhook delivery {delivery.id}")
            self._attempts.add(attempt)
            attempt.add_done_callback(functools.partial(self._attempt_ended, delivery.organization_id))
        return len(claimed)

    def _attempt_ended(self, organization_id: str, attempt: asyncio.Task[None]) -> None:
        self._ended += 1
        self._attempts.discard(attempt)
        self._held[organization_id] -= 1
        if self._held[organization_id] <= 0:
            del self._held[organization_id]
        # A slot is free, and the subscription's next delivery may be due.
        self._wake.set()

    async def _cancel_attempts(self) -> None:
        attempts = list(self._attempts)
        for attempt in attempts:
            attempt.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)

    async def prune(self) -> int:
        """Delete events older than the retention whose deliveries are all finished."""
        before = self.clock.now() - timedelta(seconds=self.retention)
        pruned = 0
        while True:
            async with self.db.write() as session:
                deleted = await DeliveryQueue(session).prune(before=before)
            pruned += deleted
            if deleted == 0:
                break
        if pruned:
            log.info("pruned old webhook events", extra={"events": pruned})
        return pruned

    async def oldest_pending_age(self) -> float:
        """Seconds since the oldest event still being tried was written; 0 when there is none."""
        async with self.db.read() as session:
            oldest = await DeliveryQueue(session).oldest_pending()
        if oldest is None:
            return 0.0
        return max(0.0, (self.clock.now() - oldest).total_seconds())

    async def observe_backlog(self) -> None:
        """Set the gauge of the oldest pending event's age (when scraped); while the database is
        away it keeps its last value."""
        try:
            age = await self.oldest_pending_age()
        except DatabaseUnavailable:
            return
        except Exception as error:
            log.warning("measuring the webhook backlog failed", extra={"error": type(error).__name__})
            return
        self.metrics.webhook_oldest_pending_age.set(age)

    async def _attempt(self, delivery: ClaimedDelivery) -> None:
        attempted_at = self.clock.now()
        started = self.clock.monotonic()
        try:
            outcome = await self._send(delivery, attempted_at)
        except Exception as error:
            # A fault of this code, not of the receiver: still an attempt, so it is not retried
            # in a loop, and the schedule ends it like any other failure.
            log.exception(
                "a webhook delivery attempt failed unexpectedly",
                extra={"delivery": str(delivery.id), "error": type(error).__name__},
            )
            outcome = _Outcome("internal_error", error="internal_error: the attempt failed unexpectedly")
        duration_ms = round((self.clock.monotonic() - started) * 1000)
        await self._record(delivery, outcome, attempted_at, duration_ms)

    async def _send(self, delivery: ClaimedDelivery, at: datetime) -> _Outcome:
        try:
            signing = self._secrets(delivery)
        except _SecretUnreadable:
            return _Outcome(
                "secret_unreadable",
                error=f"secret_unreadable: the signing secret cannot be opened (key {delivery.key_id})",
            )
        headers = signature_headers(delivery.event_id, delivery.payload, at, signing)
        try:
            # The subscription's organization pays for the name lookup (app.core.outbound.lookups).
            with on_behalf_of(delivery.organization_id):
                response = await self.outbound.request(
                    "POST", delivery.url, headers=headers, content=delivery.payload.encode(), kind="webhook"
                )
        except AppError as error:
            # The outbound client's details name the host at most.
            return _Outcome(error.code, error=f"{error.code}: {error.detail}")
        if 200 <= response.status_code < 300:
            return _Outcome("succeeded", response.status_code)
        return _Outcome("failed", response.status_code, f"answered {response.status_code}")

    def _secrets(self, delivery: ClaimedDelivery) -> list[SecretStr]:
        sealed = [delivery.secret]
        if delivery.previous_secret is not None:
            sealed.append(delivery.previous_secret)
        try:
            return [
                open_secret(self.keyring, delivery.organization_id, delivery.subscription_id, value)
                for value in sealed
            ]
        except DecryptionError:
            log.error(
                "a webhook signing secret cannot be opened with the key ring",
                extra={"subscription": str(delivery.subscription_id), "key_id": delivery.key_id},
            )
            raise _SecretUnreadable from None

    async def _record(
        self, delivery: ClaimedDelivery, outcome: _Outcome, attempted_at: datetime, duration_ms: int
    ) -> None:
        succeeded = outcome.result == "succeeded"
        delay = None if succeeded else retry_delay(delivery.attempts + 1, self._jitter())
        now = self.clock.now()
        try:
            async with self.db.write() as session:
                recorded = await DeliveryQueue(session).record(
                    delivery,
                    attempted_at=attempted_at,
                    now=now,
                    status_code=outcome.status_code,
                    duration_ms=duration_ms,
                    error=outcome.error,
                    succeeded=succeeded,
                    next_attempt_at=now + timedelta(seconds=delay) if delay is not None else None,
                )
        except Exception as error:
            # The lease runs out and the delivery is sent again: at least once.
            if not isinstance(error, DatabaseUnavailable):
                log.exception(
                    "recording a webhook delivery attempt failed",
                    extra={"delivery": str(delivery.id), "error": type(error).__name__},
                )
            return
        if not recorded:
            # Its lease ran out (another replica holds it now), or the subscription was deleted.
            log.info(
                "a webhook delivery attempt was not recorded: the delivery is no longer held here",
                extra={"delivery": str(delivery.id)},
            )
            return
        self.metrics.webhook_delivery_attempts.labels(result=outcome.result).inc()
        if not succeeded:
            log.info(
                "a webhook delivery attempt failed",
                extra={
                    "delivery": str(delivery.id),
                    "subscription": str(delivery.subscription_id),
                    "result": outcome.result,
                    "status_code": outcome.status_code,
                    "retry_in_s": round(delay) if delay is not None else None,
                },
            )
        if not succeeded and delay is None:
            self.metrics.webhook_deliveries_failed.inc()
            log.warning(
                "a webhook delivery failed for its whole retry schedule; its subscription is failing",
                extra={
                    "delivery": str(delivery.id),
                    "subscription": str(delivery.subscription_id),
                    "attempts": delivery.attempts + 1,
                },
            )


def webhook_outbound(
    settings: Settings, *, clock: Clock, metrics: Metrics, resolver: Resolver | None = None
) -> OutboundClient:
    """The client deliveries leave through: the address policy, CA bundle and response cap of
    every outbound call, the webhook deadline, and one attempt (the schedule does the retrying).
    ``resolver`` is the process's shared ``Lookups``."""
    return OutboundClient(
        timeout_seconds=settings.webhook_timeout_seconds,
        ca_bundle=settings.ca_bundle,
        allow_private_destinations=settings.allow_private_destinations,
        max_response_bytes=settings.outbound_max_response_bytes,
        max_attempts=1,
        clock=clock,
        metrics=metrics,
        resolver=resolver,
    )


__all__ = [
    "CONCURRENCY",
    "JITTER",
    "MAX_ATTEMPTS",
    "PER_ORGANIZATION",
    "RETRY_DELAYS",
    "DeliveryWorker",
    "retry_delay",
    "signature_headers",
    "webhook_outbound",
]
