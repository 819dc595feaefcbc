"""The application factory: ``create_app(settings)`` builds everything the routes use.

The lifespan owns the long-lived parts (database engine, outbound HTTP client, caller-token
verifier, token cache) and closes them on shutdown, after uvicorn has drained requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from app import __version__
from app.connectors import schemas
from app.connectors.router import hot_routes
from app.connectors.router import router as connectors_router
from app.connectors.service import ConnectorService, status_recorder
from app.core.auth import TokenVerifier
from app.core.broadcast import Broadcast
from app.core.clock import Clock, SystemClock
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.core.docs import install_docs
from app.core.errors import DatabaseUnavailable
from app.core.http import BodyLimitMiddleware, UnexpectedErrorMiddleware, install_error_handlers, problem
from app.core.logs import AccessLogMiddleware
from app.core.metrics import CONTENT_TYPE, HTTPMetricsMiddleware, Metrics
from app.core.openapi import install_openapi, liveness_responses, readiness_responses
from app.core.outbound import Lookups, OutboundClient
from app.core.requestid import RequestIdMiddleware
from app.core.tracing import TracingMiddleware, setup_tracing
from app.tokens.cache import TokenCache
from app.tokens.check import LiveChecker
from app.tokens.oauth import OAuth2TokenClient
from app.tokens.shared import SharedTokenStore
from app.webhooks.delivery import DeliveryWorker, webhook_outbound
from app.webhooks.outbox import record_event
from app.webhooks.router import router as webhooks_router
from app.webhooks.service import WebhookService

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Overrides:
    """Parts a test may supply instead of the ones built from settings."""

    clock: Clock | None = None
    outbound: OutboundClient | None = None
    webhook_outbound: OutboundClient | None = None
    # Tracing on, whatever the OTEL_* variables say, with every span handed to this exporter.
    span_exporter: SpanExporter | None = None


def create_app(settings: Settings, overrides: Overrides | None = None) -> FastAPI:
    overrides = overrides or Overrides()
    clock = overrides.clock or SystemClock()
    # One registry per application: several apps in one process (tests) count separately.
    metrics = Metrics()
    # None, and nothing traced, unless the OTEL_* variables turn tracing on (app.core.tracing).
    tracing = setup_tracing(exporter=overrides.span_exporter)
    tracer = tracing.tracer if tracing is not None else None
    metrics.set_build_info(
        version=__version__,
        python_version=platform.python_version(),
        database=make_url(settings.effective_database_url).get_backend_name(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        outbound = overrides.outbound or OutboundClient.from_settings(
            settings, metrics=metrics, resolver=lookups
        )
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
        service = ConnectorService(
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
        )
        await service.start()  # tolerates a database that is away: the follower keeps trying
        background = [asyncio.create_task(work) for work in service.background_work()]
        background.append(asyncio.create_task(deliveries.run(), name="webhook deliveries"))
        if broadcast is not None:
            # A notice (or a resubscription, after which notices may have been missed) makes the
            # service read the changes at once.
            announced = service.changes_announced
            background.append(
                asyncio.create_task(
                    broadcast.listen(lambda _message: announced(), announced), name="connector change notices"
                )
            )
        app.state.broadcast = broadcast
        app.state.db = db
        app.state.verifier = verifier
        app.state.connectors = service
        app.state.webhook_deliveries = deliveries
        app.state.webhooks = WebhookService(
            db=db,
            keyring=keyring,
            # The client deliveries leave through: its address policy also judges a URL when saved.
            check_destination=webhook_client.check_destination,
            clock=clock,
            max_per_org=settings.webhooks_per_organization,
            secret_overlap_seconds=settings.webhook_secret_overlap_seconds,
            on_due=deliveries.wake,
        )
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await service.aclose()
            await tokens.aclose()
            if shared is not None:
                await shared.drain()  # Redis commands still finishing, never cut off half-way
            if redis is not None:
                await redis.aclose()
            await verifier.aclose()
            if overrides.outbound is None:
                await outbound.aclose()
            if overrides.webhook_outbound is None:
                await webhook_client.aclose()
            await lookups.aclose()
            await db.dispose()
            if tracing is not None:
                await tracing.shutdown()  # last: exports the spans of everything above

    app = FastAPI(
        title="Connector credentials service",
        version=__version__,
        summary="Stores connector credentials and hands out ready-made request headers.",
        lifespan=lifespan,
        # A path with a trailing slash is an unknown path (404), not a redirect: Starlette builds
        # the redirect from the Host header, always as http://, and a client following it would
        # resend the body, secrets included, in clear or to another host.
        redirect_slashes=False,
        # Served by install_docs, from the service itself rather than from CDNs.
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.state.tracing = tracing
    install_error_handlers(app)
    app.state.validation_rules = schemas.LOCATIONS
    app.router.routes.extend(hot_routes)
    app.include_router(connectors_router)
    app.include_router(webhooks_router)
    install_docs(app)
    install_openapi(app, models=[schemas.AuthorizeRequest])

    @app.get("/healthz", tags=["health"], operation_id="getLiveness", responses=liveness_responses())
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        operation_id="getReadiness",
        response_model=None,
        responses=readiness_responses(),
    )
    async def readyz() -> dict[str, str | float] | JSONResponse:
        """Readiness: the database answers, or authorize can still answer from memory."""
        service: ConnectorService = app.state.connectors
        remaining = await service.readiness()
        if remaining is None:
            return {"status": "ready"}
        if remaining <= 0:
            error = DatabaseUnavailable()
            return problem(
                503,
                error.code,
                error.title,
                "the database is not reachable and what this process holds may be out of date",
                error.headers,
            )
        # Still worth routing to: authorize answers for the connectors held.
        return {"status": "degraded", "database": "unavailable", "memory_valid_for_s": round(remaining, 1)}

    @app.get(
        "/metrics",
        tags=["health"],
        operation_id="getMetrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus_metrics() -> Response:
        """Prometheus metrics; no caller token, for scrapers on the internal network."""
        service: ConnectorService = app.state.connectors
        try:
            counts: dict[str, int] | None = await service.count_by_state()
        except DatabaseUnavailable:
            counts = None  # the other metrics are worth having while the database is away
        except Exception as error:
            log.warning("counting connectors for the metrics failed", extra={"error": type(error).__name__})
            counts = None
        metrics.set_connector_states(counts)
        service.observe(metrics)
        deliveries: DeliveryWorker = app.state.webhook_deliveries
        await deliveries.observe_backlog()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(UnexpectedErrorMiddleware)
    # The largest valid body (a connector with every field at its limit) is far smaller.
    app.add_middleware(BodyLimitMiddleware, max_bytes=64 * 1024)
    if settings.access_log:
        app.add_middleware(AccessLogMiddleware)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    if tracing is not None:
        # Inside the request id middleware, so that the request span has the id from its start.
        app.add_middleware(TracingMiddleware, tracer=tracing.tracer)
    # Added last, so outermost: every answer (a 413, a 500) and every log line carries the id.
    app.add_middleware(RequestIdMiddleware)
    return app
