"""The application factory: ``create_app(settings)`` builds the routes and middleware.

The lifespan builds the long-lived parts with ``app.services.build_services``, starts their
background work, and closes them on shutdown, after uvicorn has drained requests in flight.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url

from app import __version__
from app.connectors import schemas
from app.connectors.callback import router as consent_router
from app.connectors.router import hot_routes
from app.connectors.router import router as connectors_router
from app.console.router import router as console_router
from app.console.webhooks import router as console_webhooks_router
from app.core.clock import SystemClock
from app.core.config import Settings, load_settings
from app.core.docs import install_docs
from app.core.errors import DatabaseUnavailable, Starting
from app.core.http import BodyLimitMiddleware, UnexpectedErrorMiddleware, install_error_handlers, problem
from app.core.logs import AccessLogMiddleware, configure_logging
from app.core.metrics import CONTENT_TYPE, HTTPMetricsMiddleware, Metrics
from app.core.openapi import install_openapi, liveness_responses, readiness_responses
from app.core.requestid import RequestIdMiddleware
from app.core.serving import end_with_parent
from app.core.tracing import TracingMiddleware, setup_tracing
from app.services import Overrides, Services, build_services
from app.webhooks.router import router as webhooks_router

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


__all__ = ["Overrides", "create_app", "from_environment"]


def from_environment() -> FastAPI:
    """The application built from the ``CONNECTORS_*`` environment, its logging configured: what
    each worker of ``serve --workers N`` runs (an ASGI server's factory: ``app.main:from_environment``).

    ``serve`` checks the database and the key ring before it starts any worker.
    """
    settings, _ = load_settings()
    configure_logging(settings.log_level)
    if settings.workers > 1:
        end_with_parent()
    return create_app(settings)


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
        services = build_services(settings, overrides, clock=clock, metrics=metrics, tracer=tracer)
        await services.start()
        app.state.services = services
        # What the routes ask for, by name (``services`` holds the same, typed).
        app.state.db = services.db
        app.state.verifier = services.verifier
        app.state.connectors = services.connectors
        app.state.webhooks = services.webhooks
        app.state.webhook_deliveries = services.deliveries
        app.state.broadcast = services.broadcast
        app.state.console_sessions = services.console_sessions
        app.state.console_oidc = services.console_oidc
        try:
            yield
        finally:
            await services.aclose()
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
    app.state.settings = settings
    install_error_handlers(app)
    app.state.validation_rules = schemas.LOCATIONS
    app.router.routes.extend(hot_routes)
    app.include_router(connectors_router)
    app.include_router(consent_router)
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
        """Readiness: the database answers, or authorize can still answer from memory; with
        preload on, not before the connectors called lately are held (at most
        ``CONNECTORS_PRELOAD_READY_WAIT_SECONDS``)."""
        services: Services = app.state.services
        starting = services.connectors.starting()
        if starting is not None:
            warming = Starting()
            return problem(503, warming.code, warming.title, starting, warming.headers)
        remaining = await services.connectors.readiness()
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
        services: Services = app.state.services
        service = services.connectors
        try:
            counts: dict[str, int] | None = await service.count_by_state()
        except DatabaseUnavailable:
            counts = None  # the other metrics are worth having while the database is away
        except Exception as error:
            log.warning("counting connectors for the metrics failed", extra={"error": type(error).__name__})
            counts = None
        metrics.set_connector_states(counts)
        service.observe(metrics)
        await services.deliveries.observe_backlog()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if settings.console:
        # Last: the API's routes and the probes are matched before the console's.
        app.include_router(console_router)
        app.include_router(console_webhooks_router)

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
