"""The composition root: ``build_services(settings, overrides)`` builds every long-lived part of a
process once, in the order they depend on each other, and returns them typed; ``Services.start``
and ``Services.aclose`` are the lifespan's two halves.

The order matters in two places: the status recorder is built before the token cache (which is
given its ``record_outcome``) and shares the held connectors with the service; and connectors'
events go to the webhooks' outbox (``record_event``) in the transaction of each change.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from app.connectors.service import ConnectorService, status_recorder
from app.console.oidc import OidcClient
from app.console.sessions import SessionStore
from app.core.auth import TokenVerifier
from app.core.broadcast import Broadcast
from app.core.clock import Clock
from app.core.collector import FullCollections
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.core.metrics import Metrics
from app.core.outbound import Lookups, OutboundClient
from app.tokens.cache import TokenCache
from app.tokens.check import LiveChecker
from app.tokens.oauth import OAuth2TokenClient
from app.tokens.shared import SharedTokenStore
from app.webhooks.delivery import DeliveryWorker, webhook_outbound
from app.webhooks.outbox import record_event
from app.webhooks.service import WebhookService

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Overrides", "Services", "build_services"]


@dataclass(slots=True)
class Overrides:
    """Parts a test may supply instead of the ones built from settings."""

    clock: Clock | None = None
    outbound: OutboundClient | None = None
    webhook_outbound: OutboundClient | None = None
    # Tracing on, whatever the OTEL_* variables say, with every span handed to this exporter.
    span_exporter: SpanExporter | None = None


@dataclass(slots=True)
class Services:
    """Everything a process runs on, built once by ``build_services``."""

    db: Database
    verifier: TokenVerifier
    connectors: ConnectorService
    webhooks: WebhookService
    deliveries: DeliveryWorker
    broadcast: Broadcast | None
    # The admin console's sign-in links and sessions, and its OpenID Connect client (when set).
    console_sessions: SessionStore
    console_oidc: OidcClient | None
    # Full garbage collections on a schedule (None: Python's own).
    collector: FullCollections | None
    # Closed in this order by ``aclose``, after the background work has stopped.
    _closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list, repr=False)
    _background: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    async def start(self) -> None:
        """Start the background work: the change follower and its pruning, webhook deliveries,
        and change notices from the other replicas."""
        if self.collector is not None:
            self.collector.start()
            self._background.append(asyncio.create_task(self.collector.run(), name="full collections"))
        await self.connectors.start()  # tolerates a database that is away: the follower keeps trying
        self._background += [asyncio.create_task(work) for work in self.connectors.background_work()]
        self._background.append(asyncio.create_task(self.deliveries.run(), name="webhook deliveries"))
        if self.broadcast is not None:
            # A notice (or a resubscription, after which notices may have been missed) makes the
            # service read the changes at once.
            announced = self.connectors.changes_announced
            listening = self.broadcast.listen(lambda _message: announced(), announced)
            self._background.append(asyncio.create_task(listening, name="connector change notices"))

    async def aclose(self) -> None:
        """Stop the background work, then close every part, each after what uses it."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for close in self._closers:
            await close()
        if self.collector is not None:
            self.collector.stop()


def build_services(
    settings: Settings,
    overrides: Overrides | None = None,
    *,
    clock: Clock,
    metrics: Metrics,
    tracer: Tracer | None = None,
) -> Services:
    """Build the parts of a process from ``settings`` (``overrides`` stand in for some in tests)."""
    overrides = overrides or Overrides()
    db = Database(
        build_engine(
            settings.effective_database_url,
            pool_size=settings.database_pool_size,
            command_timeout=settings.database_statement_timeout_seconds,
        ),
        tracer=tracer,
    )
    # One set of name lookups for every outbound client: one flight per name, one cap per
    # organization, whatever the call is for.
    lookups = Lookups.from_settings(settings, clock=clock, metrics=metrics)
    outbound = overrides.outbound or OutboundClient.from_settings(settings, metrics=metrics, resolver=lookups)
    verifier = TokenVerifier(settings)
    fetcher = OAuth2TokenClient(
        outbound,
        default_token_lifetime_seconds=settings.default_token_lifetime_seconds,
        metrics=metrics,
        tracer=tracer,
    )
    keyring = KeyRing.from_settings(settings)
    redis: Redis | None = None
    shared: SharedTokenStore | None = None
    broadcast: Broadcast | None = None
    if settings.redis_url is not None:
        # Replicas share tokens and change notices; every Redis call is bounded and a failing
        # Redis only makes a replica work alone for a while (app.tokens.shared).
        redis = Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=2.0, socket_connect_timeout=1.0
        )

        def redis_failed(operation: str) -> None:
            metrics.redis_errors.labels(operation=operation).inc()

        shared = SharedTokenStore(
            redis,
            keyring,
            clock=clock,
            lock_timeout=settings.outbound_timeout_seconds + 2.0,
            on_error=redis_failed,
            tracer=tracer,
        )
        broadcast = Broadcast(redis, on_error=redis_failed, tracer=tracer)
    webhook_client = overrides.webhook_outbound or webhook_outbound(
        settings, clock=clock, metrics=metrics, resolver=lookups
    )
    deliveries = DeliveryWorker(
        db=db,
        keyring=keyring,
        outbound=webhook_client,
        clock=clock,
        metrics=metrics,
        poll_interval=settings.webhook_poll_interval_seconds,
        timeout=settings.webhook_timeout_seconds,
        retention=settings.webhook_retention_seconds,
    )

    async def changed_here(connector_id: uuid.UUID) -> None:
        # The change may have queued webhook events: this process sends them at once.
        deliveries.wake()
        if broadcast is not None:
            await broadcast.publish(str(connector_id))

    # What token requests learn of a connector's status is written by a recorder built first,
    # sharing the held connectors with the service.
    status = status_recorder(
        db=db,
        clock=clock,
        held_capacity=settings.connector_cache_size,
        on_change=changed_here,
        record_event=record_event,
    )
    tokens = TokenCache(
        fetcher,
        clock=clock,
        on_outcome=status.record_outcome,
        shared=shared,
        metrics=metrics,
        capacity=settings.token_cache_size,
    )
    connectors = ConnectorService(
        db=db,
        keyring=keyring,
        tokens=tokens,
        checker=LiveChecker(outbound, fetcher, tracer=tracer),
        check_destination=outbound.check_destination,
        clock=clock,
        max_per_org=settings.max_connectors_per_org,
        max_staleness=settings.max_staleness_seconds,
        poll_interval=settings.change_poll_interval_seconds,
        # A check may take up to the outbound deadline: no replica claims the next one sooner.
        validate_interval=max(settings.validate_interval_seconds, settings.outbound_timeout_seconds),
        # Connectors' events go to the webhooks' outbox, in the transaction of each change.
        record_event=record_event,
        status=status,
        exchange_code=fetcher.exchange_code,
        callback_url=settings.callback_url,
        return_origins=settings.consent_return_origins,
        preload=settings.preload_connectors,
        preload_ready_wait=settings.preload_ready_wait_seconds,
    )
    webhooks = WebhookService(
        db=db,
        keyring=keyring,
        # The client deliveries leave through: its address policy also judges a URL when saved.
        check_destination=webhook_client.check_destination,
        clock=clock,
        max_per_org=settings.webhooks_per_organization,
        secret_overlap_seconds=settings.webhook_secret_overlap_seconds,
        on_due=deliveries.wake,
    )
    closers: list[Callable[[], Awaitable[object]]] = [connectors.aclose, tokens.aclose]
    if shared is not None:
        closers.append(shared.drain)  # Redis commands still finishing, never cut off half-way
    if redis is not None:
        closers.append(redis.aclose)
    closers.append(verifier.aclose)
    if overrides.outbound is None:
        closers.append(outbound.aclose)
    if overrides.webhook_outbound is None:
        closers.append(webhook_client.aclose)
    closers += [lookups.aclose, db.dispose]
    return Services(
        db=db,
        verifier=verifier,
        connectors=connectors,
        webhooks=webhooks,
        deliveries=deliveries,
        broadcast=broadcast,
        console_sessions=SessionStore(db, clock),
        console_oidc=(
            OidcClient(settings, outbound, keyring, clock)
            if settings.console and settings.console_oidc_issuer
            else None
        ),
        collector=(
            FullCollections(settings.full_gc_interval_seconds) if settings.full_gc_interval_seconds else None
        ),
        _closers=closers,
    )
