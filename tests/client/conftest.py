"""The Python client against real parts, end to end.

- The service: the real app served by uvicorn on a loopback socket, in a thread of the test
  process, so that the test owns its clock (``fake_time``); SQLite (the client does not care
  which database answers).
- The identity provider: the Authlib server of ``tests/support/authserver.py`` over TLS.
- The resource: an HTTPS API on loopback (``ResourceServer``) that accepts the provider's access
  tokens while the provider has not revoked them, and one Basic credential.

Every test runs with each flavour of the client (``flavour``): ``ConnectorsClient`` with
``httpx.Client``, and ``AsyncConnectorsClient`` with ``httpx.AsyncClient``. A scenario is written
once and passes each call through ``run``, which awaits what the async flavour returns.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import secrets
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from connectors_client import (
    AsyncConnectorsClient,
    BasicAuthIn,
    ConnectorCreate,
    ConnectorsClient,
    OAuth2ClientCredentialsIn,
)

from app.core.auth import mint_token
from app.core.config import Settings
from app.main import Overrides, create_app
from tests.conftest import ALL_SCOPES, CanaryGuard, canary, sqlite_settings
from tests.support.authserver import AuthorizationServerThread, AuthStore, RegisteredClient
from tests.support.fakes import FakeTime
from tests.support.servers import RecordedRequest, Reply, ScriptedServer
from tests.support.tls import LocalCA

T = TypeVar("T")
START_TIMEOUT_SECONDS = 30.0
CLIENT_ID = "client-app"
BASIC_USER = "svc-user"


async def run(value: Awaitable[T] | T) -> T:
    """The result of a client call of either flavour."""
    if inspect.isawaitable(value):
        return await value
    return value


# The service -----------------------------------------------------------------------------------


@dataclass
class LiveService:
    base_url: str
    settings: Settings

    def token(self, org: str = "org-client", scopes: tuple[str, ...] = ALL_SCOPES) -> str:
        return mint_token(self.settings, organization_id=org, scopes=scopes, ttl_seconds=600)


class _ThreadedServer:
    """uvicorn serving ``app`` on a socket of its own, in a thread with its own event loop."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])), daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.socket.close()
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def live(tmp_path: Path, local_ca: LocalCA, fake_time: FakeTime) -> Iterator[LiveService]:
    settings = sqlite_settings(
        tmp_path,
        local_ca,
        # The clock jumps ahead of the change follower's polls: trust what is held for a day.
        max_staleness_seconds=86_400,
    )
    with _ThreadedServer(create_app(settings, Overrides(clock=fake_time))) as base_url:
        yield LiveService(base_url, settings)


# The identity provider and the resource ---------------------------------------------------------


@pytest.fixture
def client_secret() -> str:
    return canary("client")


@pytest.fixture
def basic_password() -> str:
    return canary("basic")


@pytest.fixture
def idp(auth_server: AuthorizationServerThread, client_secret: str) -> AuthorizationServerThread:
    auth_server.add_clients([RegisteredClient(CLIENT_ID, client_secret)])
    return auth_server


class ResourceServer:
    """An HTTPS API under ``/api``: a request passes with a Bearer token the provider issued and
    has not revoked, or with the one Basic credential; otherwise 401. It answers the path it got."""

    def __init__(self, server: ScriptedServer, store: AuthStore, basic: tuple[str, str]) -> None:
        self.server = server
        self.store = store
        self._basic = base64.b64encode(":".join(basic).encode()).decode()
        server.set_default(self._answer)

    def _answer(self, request: RecordedRequest) -> Reply:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme == "Bearer":
            record = self.store.find_access_token(credential)
            accepted = record is not None and not record.is_revoked()
        else:
            accepted = scheme == "Basic" and secrets.compare_digest(credential, self._basic)
        if not accepted:
            return Reply.json({"error": "invalid_token"}, 401, {"WWW-Authenticate": "Bearer"})
        return Reply.json({"path": request.path})

    @property
    def base_url(self) -> str:
        return self.server.url("/api")

    def url(self, path: str, *, host: str | None = None) -> str:
        return self.server.url(path, host=host)

    def credentials(self) -> list[str]:
        """The Authorization header of every request received, in order."""
        return [request.headers.get("authorization", "") for request in self.server.requests]


@pytest.fixture
def resource(
    scripted_server: ScriptedServer, idp: AuthorizationServerThread, basic_password: str
) -> ResourceServer:
    return ResourceServer(scripted_server, idp.store, (BASIC_USER, basic_password))


@pytest.fixture
def other_origin(server_tls: ssl.SSLContext) -> Iterator[ScriptedServer]:
    """Another HTTPS server, that no credentials may ever reach."""
    with ScriptedServer(server_tls, default=Reply.json({"stolen": True})) as server:
        yield server


def oauth_connector(name: str, idp: AuthorizationServerThread, secret: str, resource: str) -> ConnectorCreate:
    return ConnectorCreate(
        name=name,
        resource_domain_url=resource,
        auth=OAuth2ClientCredentialsIn(
            client_id=CLIENT_ID, client_secret=secret, token_url=idp.token_url, scope="read write"
        ),
    )


def basic_connector(name: str, resource: ResourceServer, password: str) -> ConnectorCreate:
    return ConnectorCreate(
        name=name,
        resource_domain_url=resource.base_url,
        auth=BasicAuthIn(
            username=BASIC_USER, password=password, validation_url=resource.url("/api/auth/check")
        ),
    )


# The two flavours ------------------------------------------------------------------------------


@dataclass
class Flavour:
    """A connectors client and a resource client of one flavour, and what the former sent."""

    name: str
    connectors: ConnectorsClient | AsyncConnectorsClient
    resource: httpx.Client | httpx.AsyncClient
    sent: list[httpx.Request] = field(default_factory=list)

    @property
    def is_async(self) -> bool:
        return self.name == "async"

    def authorize_bodies(self) -> list[bytes]:
        """The body of every ``/authorize`` call made so far, in order."""
        return [r.content for r in self.sent if r.url.path.endswith("/authorize")]


@pytest.fixture(params=["sync", "async"])
async def flavour(
    request: pytest.FixtureRequest, live: LiveService, local_ca: LocalCA, canary_guard: CanaryGuard
) -> AsyncIterator[Flavour]:
    verify = ssl.create_default_context(cafile=str(local_ca.ca_bundle))
    sent: list[httpx.Request] = []
    token = live.token()
    if request.param == "sync":

        def record(request: httpx.Request) -> None:
            sent.append(request)

        def check(response: httpx.Response) -> None:
            response.read()
            canary_guard.check_response(response)

        http = httpx.Client(event_hooks={"request": [record], "response": [check]})
        resource = httpx.Client(verify=verify)
        try:
            yield Flavour("sync", ConnectorsClient(live.base_url, token, http_client=http), resource, sent)
        finally:
            resource.close()
            http.close()
        return

    async def arecord(request: httpx.Request) -> None:
        sent.append(request)

    async def acheck(response: httpx.Response) -> None:
        await response.aread()
        canary_guard.check_response(response)

    ahttp = httpx.AsyncClient(event_hooks={"request": [arecord], "response": [acheck]})
    aresource = httpx.AsyncClient(verify=verify)
    try:
        yield Flavour(
            "async", AsyncConnectorsClient(live.base_url, token, http_client=ahttp), aresource, sent
        )
    finally:
        await aresource.aclose()
        await ahttp.aclose()
