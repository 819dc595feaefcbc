"""``ConnectorAuth``: an ``httpx.Auth`` that puts a connector's credentials on requests to its
resource domain, as the HTTP Request step of a flow does, without ever holding the secrets.

Where credentials go
    Before anything is sent, the request's URL must be under the connector's resource domain:
    its origin (scheme, host, port) must be the ``resource_origin`` the service answered and its
    path must lie under the resource domain URL's base path. Any other URL raises
    ``DestinationRefused`` and nothing is sent to it.

One answer for many requests
    The headers of ``/authorize`` do not depend on the path, so one answer per connector serves
    every request until ``expires_at`` minus ``leeway`` (an OAuth token) and at most ``max_age``
    after it arrived (a Basic header has no expiry; the bound also makes a changed connector
    show within that time). It is fetched with ``path`` left out, which answers the resource
    domain URL itself and so tells the base path.

Paths the service would refuse
    A path under the base path made of plain segments (letters, digits and ``-._~!$&'()*+,=:@``,
    no empty segment, none made only of dots) with a query of printable ASCII (``%`` escapes of
    printable characters other than ``%`` itself) is one the service accepts as it is, and the
    cached answer is used. Any other path (``%`` escapes, ``;``, ``//``, ...) is sent to the
    service in an ``/authorize`` call of its own, which refuses it (``PathOutsideResourceDomain``)
    or answers for it; that answer's ``url`` must then be the request's URL.

A 401 from the resource
    The credentials were refused (a revoked or rotated token, a changed password): the request
    is sent once more with headers from ``/authorize`` with ``force_refresh: true``. Requests
    refused with the same headers at the same time cause one such call: the first renews, the
    others find new headers and use them. A second 401 is returned as it is.

Concurrency
    One ``/authorize`` call at a time per ``ConnectorAuth`` fills or renews the cached answer;
    callers arriving meanwhile wait for it and use it (a ``threading.Lock`` with a
    ``ConnectorsClient``, an ``asyncio.Lock`` with an ``AsyncConnectorsClient``). Time comes
    from ``clock``, a function returning the current time as an aware ``datetime``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import httpx

from connectors_client.client import AsyncConnectorsClient, ConnectorsClient
from connectors_client.errors import DestinationRefused
from connectors_client.models import Authorization

Clock = Callable[[], datetime]
Origin = tuple[str, bytes, int | None]

_SEGMENT = r"[A-Za-z0-9\-._~!$&'()*+,=:@]+"
# Plain segments, none made only of dots, and an optional trailing slash.
_PLAIN_PATH = re.compile(rf"(?:/(?!\.+(?:/|$)){_SEGMENT})*/?")
# Printable ASCII, with escapes of printable characters other than "%".
_PLAIN_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%(?!25)(?:[2-6][0-9A-Fa-f]|7[0-9A-Ea-e]))*")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _origin(url: httpx.URL) -> Origin:
    return (url.scheme, url.raw_host, url.port)


@dataclass(frozen=True, slots=True)
class _Answer:
    headers: dict[str, str]
    resource_origin: str
    origin: Origin
    base_path: str
    fresh_until: datetime


class ConnectorAuth(httpx.Auth):
    """Credentials of connector ``connector_id`` for requests to its resource domain.

    Built on a ``ConnectorsClient`` it serves ``httpx.Client``; on an ``AsyncConnectorsClient``,
    ``httpx.AsyncClient``. See the module docstring for what it does.
    """

    # A retry after a 401 sends the body again.
    requires_request_body = True

    def __init__(
        self,
        client: ConnectorsClient | AsyncConnectorsClient,
        connector_id: str | UUID,
        *,
        clock: Clock = _utc_now,
        leeway: timedelta = timedelta(seconds=10),
        max_age: timedelta = timedelta(minutes=5),
    ) -> None:
        if leeway < timedelta(0) or max_age <= timedelta(0):
            raise ValueError("leeway must not be negative and max_age must be positive")
        self._client = client
        self._connector_id = connector_id
        self._clock = clock
        self._leeway = leeway
        self._max_age = max_age
        self._answer: _Answer | None = None
        self._thread_lock = threading.Lock()
        self._task_lock = asyncio.Lock()

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        client = self._client
        if not isinstance(client, ConnectorsClient):
            raise TypeError("a ConnectorAuth on an AsyncConnectorsClient serves httpx.AsyncClient only")
        request.read()
        headers = self._sync_headers(client, request, refused=None)
        request.headers.update(headers)
        response = yield request
        if response.status_code == 401:
            request.headers.update(self._sync_headers(client, request, refused=headers))
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        client = self._client
        if not isinstance(client, AsyncConnectorsClient):
            raise TypeError("a ConnectorAuth on a ConnectorsClient serves httpx.Client only")
        await request.aread()
        headers = await self._async_headers(client, request, refused=None)
        request.headers.update(headers)
        response = yield request
        if response.status_code == 401:
            request.headers.update(await self._async_headers(client, request, refused=headers))
            yield request

    def _sync_headers(
        self, client: ConnectorsClient, request: httpx.Request, refused: dict[str, str] | None
    ) -> dict[str, str]:
        with self._thread_lock:
            answer = self._reusable(refused)
            if answer is None:
                fetched = client.authorize(self._connector_id, force_refresh=refused is not None)
                answer = self._answer = self._remember(fetched)
        path = self._own_call_for(request.url, answer)
        if path is None:
            return answer.headers
        return self._checked(request.url, client.authorize(self._connector_id, path))

    async def _async_headers(
        self, client: AsyncConnectorsClient, request: httpx.Request, refused: dict[str, str] | None
    ) -> dict[str, str]:
        async with self._task_lock:
            answer = self._reusable(refused)
            if answer is None:
                fetched = await client.authorize(self._connector_id, force_refresh=refused is not None)
                answer = self._answer = self._remember(fetched)
        path = self._own_call_for(request.url, answer)
        if path is None:
            return answer.headers
        return self._checked(request.url, await client.authorize(self._connector_id, path))

    def _reusable(self, refused: dict[str, str] | None) -> _Answer | None:
        """The cached answer if it is fresh and is not the one the resource just refused."""
        answer = self._answer
        if answer is None or self._clock() >= answer.fresh_until:
            return None
        if refused is not None and answer.headers == refused:
            return None
        return answer

    def _remember(self, fetched: Authorization) -> _Answer:
        now = self._clock()
        fresh_until = now + self._max_age
        if fetched.expires_at is not None:
            fresh_until = min(fresh_until, fetched.expires_at - self._leeway)
        base = httpx.URL(fetched.url)
        return _Answer(
            headers=dict(fetched.headers),
            resource_origin=fetched.resource_origin,
            origin=_origin(httpx.URL(fetched.resource_origin)),
            base_path=base.raw_path.decode("ascii").rstrip("/"),
            fresh_until=fresh_until,
        )

    def _own_call_for(self, url: httpx.URL, answer: _Answer) -> str | None:
        """None when the cached answer serves ``url``; else the path to ask the service about.

        Raises ``DestinationRefused`` for a URL outside the resource domain.
        """
        if _origin(url) != answer.origin:
            raise DestinationRefused(
                f"{url.scheme}://{url.netloc.decode('ascii')} is not the connector's resource origin "
                f"{answer.resource_origin}: no credentials are sent there"
            )
        target = url.raw_path.decode("ascii")
        path, _, query = target.partition("?")
        base = answer.base_path
        if path != base and not path.startswith(base + "/"):
            raise DestinationRefused(
                f"the path is outside the connector's base path {base or '/'}: no credentials are sent there"
            )
        relative = target[len(base) :]
        path = path[len(base) :]
        if _PLAIN_PATH.fullmatch(path) and _PLAIN_QUERY.fullmatch(query):
            return None
        return relative

    @staticmethod
    def _checked(url: httpx.URL, fetched: Authorization) -> dict[str, str]:
        """The headers of an answer for one path, once it names the very URL being requested."""
        answered = httpx.URL(fetched.url)
        if (_origin(answered), answered.raw_path) != (_origin(url), url.raw_path):
            raise DestinationRefused(
                "the service joined this path to another URL than the one requested: no credentials are sent"
            )
        return dict(fetched.headers)
