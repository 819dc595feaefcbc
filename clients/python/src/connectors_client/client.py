"""The clients: ``ConnectorsClient`` (blocking) and ``AsyncConnectorsClient`` (asyncio).

Both take the service's base URL and the caller's credentials: a bearer token (a JWT with the
``connectors:*`` scopes the calls need), a function returning one (called for every request,
so it can renew the token), or any ``httpx.Auth``. ``http_client`` lends the client an httpx
client configured elsewhere (transport, TLS, proxies, event hooks); the connectors client then
leaves it open when it closes.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Self, TypeVar
from uuid import UUID

import httpx

from connectors_client import _calls
from connectors_client.errors import TransportFailure
from connectors_client.models import (
    AuditEventList,
    Authorization,
    Connector,
    ConnectorCreate,
    ConnectorList,
    ConnectorPatch,
    ConsentStart,
    ValidationResult,
)

T = TypeVar("T")
TokenProvider = Callable[[], str]
AsyncTokenProvider = Callable[[], str | Awaitable[str]]
DEFAULT_TIMEOUT_SECONDS = 10.0


class BearerToken(httpx.Auth):
    """``Authorization: Bearer <token>`` from a fixed token or a function called per request."""

    def __init__(self, token: str | AsyncTokenProvider) -> None:
        self._token = token

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token() if callable(self._token) else self._token
        if not isinstance(token, str):
            if inspect.iscoroutine(token):
                token.close()  # never awaited: closed, so no warning about it
            raise TypeError("the token function returned an awaitable: use it with AsyncConnectorsClient")
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(token):
            token = await token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _auth(token: str | AsyncTokenProvider | httpx.Auth) -> httpx.Auth:
    return token if isinstance(token, httpx.Auth) else BearerToken(token)


def _base(base_url: str) -> str:
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError("base_url must be an http:// or https:// URL")
    return base


class ConnectorsClient:
    """A blocking client of the connector credentials service; safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        token: str | TokenProvider | httpx.Auth,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = _base(base_url)
        self._auth = _auth(token)
        self._owned = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, follow_redirects=False)

    def create(self, connector: ConnectorCreate, *, validate: bool = True) -> Connector:
        """Create a connector; ``validate=False`` skips the live credential check."""
        return self._run(_calls.create(connector, validate=validate))

    def list(self) -> ConnectorList:
        """The organization's connectors, ordered by name, and its limit."""
        return self._run(_calls.list_connectors())

    def get(self, connector_id: str | UUID) -> Connector:
        """One connector; ``.etag`` is its ``ETag``."""
        return self._run(_calls.get(connector_id))

    def update(
        self,
        connector_id: str | UUID,
        patch: ConnectorPatch,
        *,
        if_match: str | None = None,
        validate: bool = True,
    ) -> Connector:
        """Change the fields set in ``patch``; with ``if_match`` (an ``etag``), only that version."""
        return self._run(_calls.update(connector_id, patch, if_match=if_match, validate=validate))

    def delete(self, connector_id: str | UUID, *, if_match: str | None = None) -> None:
        """Delete a connector; with ``if_match`` (an ``etag``), only that version."""
        self._run(_calls.delete(connector_id, if_match=if_match))

    def validate(self, connector_id: str | UUID) -> ValidationResult:
        """Check the stored credentials live; the outcome is in ``connector.status``."""
        return self._run(_calls.validate(connector_id))

    def consent(self, connector_id: str | UUID, *, return_url: str | None = None) -> ConsentStart:
        """Start connecting an authorization code connector's account: open the answer's
        ``authorization_url`` in the admin's browser (``return_url``: where it goes afterwards)."""
        return self._run(_calls.consent(connector_id, return_url=return_url))

    def history(self, connector_id: str | UUID, *, limit: int | None = None) -> AuditEventList:
        """The connector's audit events, newest first."""
        return self._run(_calls.history(connector_id, limit=limit))

    def authorize(
        self, connector_id: str | UUID, path: str | None = None, *, force_refresh: bool = False
    ) -> Authorization:
        """The headers for one request to ``path`` under the connector's resource domain."""
        return self._run(_calls.authorize(connector_id, path=path, force_refresh=force_refresh))

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, call: _calls.Call[T]) -> T:
        try:
            response = self._http.request(
                call.method,
                self.base_url + call.path,
                params=call.params,
                json=call.json,
                headers=call.headers,
                auth=self._auth,
            )
        except httpx.TransportError as error:
            raise TransportFailure(f"{call.method} {call.path}: {type(error).__name__}") from error
        return call.result(response)


class AsyncConnectorsClient:
    """An asyncio client of the connector credentials service; safe to share between tasks."""

    def __init__(
        self,
        base_url: str,
        token: str | AsyncTokenProvider | httpx.Auth,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = _base(base_url)
        self._auth = _auth(token)
        self._owned = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def create(self, connector: ConnectorCreate, *, validate: bool = True) -> Connector:
        """Create a connector; ``validate=False`` skips the live credential check."""
        return await self._run(_calls.create(connector, validate=validate))

    async def list(self) -> ConnectorList:
        """The organization's connectors, ordered by name, and its limit."""
        return await self._run(_calls.list_connectors())

    async def get(self, connector_id: str | UUID) -> Connector:
        """One connector; ``.etag`` is its ``ETag``."""
        return await self._run(_calls.get(connector_id))

    async def update(
        self,
        connector_id: str | UUID,
        patch: ConnectorPatch,
        *,
        if_match: str | None = None,
        validate: bool = True,
    ) -> Connector:
        """Change the fields set in ``patch``; with ``if_match`` (an ``etag``), only that version."""
        return await self._run(_calls.update(connector_id, patch, if_match=if_match, validate=validate))

    async def delete(self, connector_id: str | UUID, *, if_match: str | None = None) -> None:
        """Delete a connector; with ``if_match`` (an ``etag``), only that version."""
        await self._run(_calls.delete(connector_id, if_match=if_match))

    async def validate(self, connector_id: str | UUID) -> ValidationResult:
        """Check the stored credentials live; the outcome is in ``connector.status``."""
        return await self._run(_calls.validate(connector_id))

    async def consent(self, connector_id: str | UUID, *, return_url: str | None = None) -> ConsentStart:
        """Start connecting an authorization code connector's account: open the answer's
        ``authorization_url`` in the admin's browser (``return_url``: where it goes afterwards)."""
        return await self._run(_calls.consent(connector_id, return_url=return_url))

    async def history(self, connector_id: str | UUID, *, limit: int | None = None) -> AuditEventList:
        """The connector's audit events, newest first."""
        return await self._run(_calls.history(connector_id, limit=limit))

    async def authorize(
        self, connector_id: str | UUID, path: str | None = None, *, force_refresh: bool = False
    ) -> Authorization:
        """The headers for one request to ``path`` under the connector's resource domain."""
        return await self._run(_calls.authorize(connector_id, path=path, force_refresh=force_refresh))

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self, call: _calls.Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method,
                self.base_url + call.path,
                params=call.params,
                json=call.json,
                headers=call.headers,
                auth=self._auth,
            )
        except httpx.TransportError as error:
            raise TransportFailure(f"{call.method} {call.path}: {type(error).__name__}") from error
        return call.result(response)
