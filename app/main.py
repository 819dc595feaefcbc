"""The application factory: ``create_app(settings)`` builds everything the routes use.

The lifespan owns the long-lived parts (database engine, outbound HTTP client, caller-token
verifier, token cache) and closes them on shutdown, after uvicorn has drained requests in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from app import __version__
from app.connectors.router import hot_routes
from app.connectors.router import router as connectors_router
from app.connectors.service import ConnectorService
from app.core.auth import TokenVerifier
from app.core.clock import Clock, SystemClock
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.core.http import install_error_handlers, problem
from app.core.logs import AccessLogMiddleware
from app.core.outbound import OutboundClient
from app.tokens.cache import TokenCache
from app.tokens.check import LiveChecker
from app.tokens.oauth import OAuth2TokenClient


@dataclass(slots=True)
class Overrides:
    """Parts a test may supply instead of the ones built from settings."""

    clock: Clock | None = None
    outbound: OutboundClient | None = None


def create_app(settings: Settings, overrides: Overrides | None = None) -> FastAPI:
    overrides = overrides or Overrides()
    clock = overrides.clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(build_engine(settings.effective_database_url, pool_size=settings.database_pool_size))
        outbound = overrides.outbound or OutboundClient.from_settings(settings)
        verifier = TokenVerifier(settings)
        fetcher = OAuth2TokenClient(
            outbound, default_token_lifetime_seconds=settings.default_token_lifetime_seconds
        )
        service_ref: list[ConnectorService] = []

        async def on_outcome(key: object, state: str, detail: str | None) -> None:
            if service_ref:
                await service_ref[0].record_outcome(key, state, detail)  # type: ignore[arg-type]

        tokens = TokenCache(fetcher, clock=clock, on_outcome=on_outcome)
        service = ConnectorService(
            db=db,
            keyring=KeyRing.from_settings(settings),
            tokens=tokens,
            check_credentials=LiveChecker(outbound, fetcher),
            check_destination=outbound.check_destination,
            clock=clock,
            max_per_org=settings.max_connectors_per_org,
        )
        service_ref.append(service)
        app.state.db = db
        app.state.verifier = verifier
        app.state.connectors = service
        try:
            yield
        finally:
            await tokens.aclose()
            await verifier.aclose()
            if overrides.outbound is None:
                await outbound.aclose()
            await db.dispose()

    app = FastAPI(
        title="Connector credentials service",
        version=__version__,
        summary="Stores connector credentials and hands out ready-made request headers.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.router.routes.extend(hot_routes)
    app.include_router(connectors_router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=None)
    async def readyz() -> dict[str, str] | JSONResponse:
        """Readiness: the database answers."""
        db: Database = app.state.db
        try:
            await db.ping()
        except Exception:
            return problem(503, "not_ready", "Not ready", "the database is not reachable")
        return {"status": "ready"}

    if settings.access_log:
        app.add_middleware(AccessLogMiddleware)
    return app
