"""Fixtures shared by the whole suite.

Every database-backed test runs twice, on SQLite and on PostgreSQL. Without a PostgreSQL server
the PostgreSQL half is skipped with one line, except under ``CI=true``, where it fails.

Every secret a test sends contains ``CANARY``; the ``canary_guard`` fixture fails a test whose
responses or log lines contain it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.core.auth import mint_token
from app.core.config import Settings
from app.core.db import build_engine
from app.main import Overrides, create_app
from app.migrations import upgrade
from tests.support import databases
from tests.support.tls import LocalCA

# TLS material, real HTTPS test servers and fake time, shared by every test package.
pytest_plugins = ["tests.support.fixtures", "tests.support.redis", "tests.support.postgres"]

CANARY = "CANARY"
T = TypeVar("T")
POSTGRES_URL = os.environ.get(
    "CONNECTORS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
ALL_SCOPES = ("connectors:read", "connectors:write", "connectors:authorize")


def canary(label: str = "") -> str:
    """A secret value the canary guard looks for."""
    return f"{CANARY}-{label}-{secrets.token_hex(4)}"


# Canary guard -----------------------------------------------------------------------------------


_TEST_SERVER_LOGGERS = ("authlib", "werkzeug", "tests.")


class _CanaryHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from app.core.logs import JSONFormatter

        if record.name.startswith(_TEST_SERVER_LOGGERS):
            return  # the test's own identity provider may log what it was sent

        line = JSONFormatter().format(record)
        if CANARY in line:
            self.leaks.append(line)


class CanaryGuard:
    def __init__(self) -> None:
        self.leaks: list[str] = []

    def check_response(self, response: httpx.Response) -> None:
        blob = response.content.decode("utf-8", "replace") + repr(dict(response.headers))
        if CANARY in blob:
            self.leaks.append(f"{response.request.method} {response.request.url.path}: {blob[:300]}")


@pytest.fixture(autouse=True)
def canary_guard() -> Iterator[CanaryGuard]:
    guard = CanaryGuard()
    handler = _CanaryHandler()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield guard
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    leaks = guard.leaks + handler.leaks
    assert not leaks, f"a secret appeared in a response or log line: {leaks[:3]}"


# Databases --------------------------------------------------------------------------------------


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even under a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _postgres_reachable() -> bool:
    import asyncpg

    url = make_url(POSTGRES_URL)

    async def probe() -> bool:
        try:
            connection = await asyncpg.connect(
                host=url.host,
                port=url.port or 5432,
                user=url.username,
                password=url.password,
                database=url.database,
                timeout=3,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await connection.close()
        return True

    return run_sync(probe())


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line on what the suite can reach; tests needing what is missing are skipped."""
    from tests.support.redis import reachable

    redis_url = os.environ.get("CONNECTORS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    from tests.support.browser import chromium_path

    found = {
        "PostgreSQL": _postgres_reachable(),
        "Redis": reachable(redis_url),
        "Chromium": chromium_path() is not None,
    }
    missing = [name for name, ok in found.items() if not ok]
    if not missing:
        return ["services: PostgreSQL, Redis and Chromium reachable; every test runs"]
    return [
        f"services: {' and '.join(missing)} not reachable: the tests needing them are skipped"
        " (set CONNECTORS_TEST_POSTGRES_URL / CONNECTORS_TEST_REDIS_URL / CONNECTORS_TEST_CHROMIUM;"
        " under CI=true they fail)"
    ]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to the newest revision; dropped
    when the session ends (``tests/support/databases.py``), with the leftovers of killed sessions."""
    if not _postgres_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {make_url(POSTGRES_URL).host} and CI=true")
        pytest.skip("PostgreSQL not reachable: set CONNECTORS_TEST_POSTGRES_URL to run these tests")
    admin = make_url(POSTGRES_URL)
    run_sync(databases.drop_abandoned(admin))
    name = databases.database_name()
    run_sync(databases.create_database(admin, name))
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        run_sync(upgrade(url))
        yield url
    finally:
        run_sync(databases.drop_database(admin, name))


_SQLITE_TEMPLATE: dict[str, bytes] = {}


async def _sqlite_database(directory: Path) -> str:
    path = directory / "connectors.db"
    if "template" not in _SQLITE_TEMPLATE:
        template = directory / "template.db"
        await upgrade(f"sqlite+aiosqlite:///{template}")
        _SQLITE_TEMPLATE["template"] = template.read_bytes()
        template.unlink()
    path.write_bytes(_SQLITE_TEMPLATE["template"])
    return f"sqlite+aiosqlite:///{path}"


async def _truncate_postgres(url: str) -> None:
    engine = build_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "TRUNCATE connectors, organizations, audit_events, connector_changes,"
                    " webhook_deliveries, webhook_events, webhook_subscriptions, console_links,"
                    " console_sessions CASCADE"
                )
            )
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each supported kind."""
    if request.param == "sqlite":
        return run_sync(_sqlite_database(tmp_path))
    url: str = request.getfixturevalue("postgres_server")
    run_sync(_truncate_postgres(url))
    return url


# The application --------------------------------------------------------------------------------


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def suite_settings(database_url: str, data_dir: Path, local_ca: LocalCA, **overrides: Any) -> Settings:
    """The settings every test's service starts from: fresh keys, the test CA trusted, private
    destinations allowed (test servers live on 127.0.0.1), a 2 s outbound deadline."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "jwt_secret": secrets.token_urlsafe(32),
        "encryption_keys": f"k1:{_key()}",
        "ca_bundle": local_ca.ca_bundle,
        "allow_private_destinations": True,
        "outbound_timeout_seconds": 2.0,
    }
    return Settings(**{**values, **overrides})


def sqlite_settings(directory: Path, local_ca: LocalCA, **overrides: Any) -> Settings:
    """``suite_settings`` over a fresh SQLite database in ``directory``: for tests in which the
    database plays no part."""
    return suite_settings(run_sync(_sqlite_database(directory)), directory, local_ca, **overrides)


@pytest.fixture
def settings(database_url: str, local_ca: LocalCA, tmp_path: Path) -> Settings:
    return suite_settings(database_url, tmp_path, local_ca)


TokenFactory = Callable[..., str]


@pytest.fixture
def make_token(settings: Settings) -> TokenFactory:
    def factory(org: str = "org-a", scopes: tuple[str, ...] = ALL_SCOPES, ttl: int = 600) -> str:
        return mint_token(settings, organization_id=org, scopes=scopes, ttl_seconds=ttl)

    return factory


@pytest.fixture
async def app_factory(
    canary_guard: CanaryGuard,
) -> AsyncIterator[Callable[[Settings, Overrides | None], Awaitable[Any]]]:
    """Start apps (lifespan included); all are shut down at teardown."""
    stack: list[Any] = []

    async def start(settings: Settings, overrides: Overrides | None = None) -> Any:
        app = create_app(settings, overrides)
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        stack.append(context)
        return app

    yield start
    for context in reversed(stack):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def app(app_factory: Callable[..., Awaitable[Any]], settings: Settings) -> Any:
    return await app_factory(settings)


@pytest.fixture
async def client_for(
    app: Any, make_token: TokenFactory, canary_guard: CanaryGuard
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """``client_for(org, scopes, app=...)``: a client authenticated as that organization, on the
    default app or on one started with ``app_factory``."""
    clients: list[httpx.AsyncClient] = []

    async def check(response: httpx.Response) -> None:
        await response.aread()
        canary_guard.check_response(response)

    def factory(
        org: str = "org-a", scopes: tuple[str, ...] = ALL_SCOPES, *, app: Any = app
    ) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            # Like a real server, answer the 500 instead of raising into the test.
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {make_token(org, scopes)}"},
            event_hooks={"response": [check]},
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture
def client(client_for: Callable[..., httpx.AsyncClient]) -> httpx.AsyncClient:
    return client_for("org-a")
