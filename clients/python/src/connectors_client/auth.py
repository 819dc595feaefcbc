"""``ConnectorAuth``: an ``httpx.Auth`` that puts a connector's credentials on requests to its
resource domain, as the HTTP Request step of a flow does, without ever holding the secrets.

What it puts on a request
    The headers ``/authorize`` answers (a Bearer token, a Basic header, an API key). An API key
    sent as a query parameter is in the answer's ``url`` instead: that parameter is added to the
    request's query, in place of any parameter of the same name, as the service adds it.

Where credentials go
    Before anything is sent, the request's URL must be under the connector's resource domain:
    its origin (scheme, host, port) must be the ``resource_origin`` the service answered and its
    path must lie under the resource domain URL's base path. Any other URL raises
    ``DestinationRefused`` and nothing is sent to it.

One answer for many requests
    The credentials of ``/authorize`` do not depend on the path, so one answer per connector
    serves every request until ``expires_at`` minus ``leeway`` (an OAuth token) and at most
    ``max_age`` after it arrived (Basic headers and API keys have no expiry; the bound also makes
    a changed connector show within that time). It is fetched with ``path`` left out, which
    answers the resource domain URL itself and so tells the base path.

Paths the service would refuse
    A path under the base path made of plain segments (letters, digits and ``-._~!$&'()*+,=:@``,
    no empty segment, none made only of dots) with a query of printable ASCII (``%`` escapes of
    printable characters other than ``%`` itself) is one the service accepts as it is, and the
    cached answer is used. Any other path (``%`` escapes, ``;``, ``//``, ...) is sent to the
    service in an ``/authorize`` call of its own, which refuses it (``PathOutsideResourceDomain``)
    or answers for it; that answer's ``url`` must then be the request's URL (with the API key
    added, when it goes in the query).

Redirects
    httpx follows a redirect (with ``follow_redirects=True``) without asking the auth flow again,
    keeping every header but ``Authorization`` across origins and every header within one. So
    each hop of a request is held to the rule above before its headers are written: a hop to
    another origin, or outside the base path, or to a path the cached answer cannot judge, is
    refused with ``DestinationRefused`` and nothing is sent to it. The check rides on httpcore's
    ``trace`` extension, which the request and every redirect made from it carry: it holds with
    httpx's own transports (``HTTPTransport``, ``AsyncHTTPTransport``), the ones that send bytes.

A 401 from the resource
    The credentials were refused (a revoked or rotated token, a changed password): the request
    is sent once more with credentials from ``/authorize`` with ``force_refresh: true``. Requests
    refused with the same credentials at the same time cause one such call: the first renews,
    the others find new credentials and use them. A second 401 is returned as it is.

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
from typing import Any
from urllib.parse import unquote
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


def _split(url: httpx.URL) -> tuple[str, list[str]]:
    """The raw path of ``url`` and the parameters of its query, as written."""
    path, _, query = url.raw_path.decode("ascii").partition("?")
    return path, [part for part in query.split("&") if part]


def _names(parameters: tuple[str, ...]) -> frozenset[str]:
    return frozenset(unquote(part.partition("=")[0]) for part in parameters)


def _with_query(url: httpx.URL, parameters: tuple[str, ...]) -> httpx.URL:
    """``url`` with ``parameters`` added to its query, a parameter of one of their names (once
    decoded) taken out first: what the service does with an API key sent in the query."""
    if not parameters:
        return url
    names = _names(parameters)
    path, query = _split(url)
    kept = [part for part in query if unquote(part.partition("=")[0]) not in names]
    return url.copy_with(raw_path=f"{path}?{'&'.join([*kept, *parameters])}".encode("ascii"))


@dataclass(frozen=True, slots=True)
class _Credential:
    """What an answer puts on a request: headers, and query parameters (``name=value``, encoded
    as the service wrote them) for an API key sent in the query."""

    headers: dict[str, str]
    query: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Answer:
    credential: _Credential
    resource_origin: str
    origin: Origin
    base_path: str
    fresh_until: datetime


@dataclass(frozen=True, slots=True)
class _Signed:
    """One request's URL and credential, ready to send, and the answer whose rule it passed."""

    url: httpx.URL
    credential: _Credential
    answer: _Answer


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
        target = request.url
        signed = self._sync_sign(client, target, refused=None)
        _apply(request, signed)
        _guard_hops(request, signed, asynchronous=False)
        response = yield request
        if response.status_code == 401:
            again = self._sync_sign(client, target, refused=signed.credential)
            _apply(request, again)
            _guard_hops(request, again, asynchronous=False)
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        client = self._client
        if not isinstance(client, AsyncConnectorsClient):
            raise TypeError("a ConnectorAuth on a ConnectorsClient serves httpx.Client only")
        await request.aread()
        target = request.url
        signed = await self._async_sign(client, target, refused=None)
        _apply(request, signed)
        _guard_hops(request, signed, asynchronous=True)
        response = yield request
        if response.status_code == 401:
            again = await self._async_sign(client, target, refused=signed.credential)
            _apply(request, again)
            _guard_hops(request, again, asynchronous=True)
            yield request

    def _sync_sign(self, client: ConnectorsClient, target: httpx.URL, refused: _Credential | None) -> _Signed:
        with self._thread_lock:
            answer = self._reusable(refused)
            if answer is None:
                fetched = client.authorize(self._connector_id, force_refresh=refused is not None)
                answer = self._answer = self._remember(fetched)
        path = self._own_call_for(target, answer)
        if path is None:
            return _Signed(_with_query(target, answer.credential.query), answer.credential, answer)
        return self._checked(target, answer, client.authorize(self._connector_id, path))

    async def _async_sign(
        self, client: AsyncConnectorsClient, target: httpx.URL, refused: _Credential | None
    ) -> _Signed:
        async with self._task_lock:
            answer = self._reusable(refused)
            if answer is None:
                fetched = await client.authorize(self._connector_id, force_refresh=refused is not None)
                answer = self._answer = self._remember(fetched)
        path = self._own_call_for(target, answer)
        if path is None:
            return _Signed(_with_query(target, answer.credential.query), answer.credential, answer)
        return self._checked(target, answer, await client.authorize(self._connector_id, path))

    def _reusable(self, refused: _Credential | None) -> _Answer | None:
        """The cached answer if it is fresh and is not the one the resource just refused."""
        answer = self._answer
        if answer is None or self._clock() >= answer.fresh_until:
            return None
        if refused is not None and answer.credential == refused:
            return None
        return answer

    def _remember(self, fetched: Authorization) -> _Answer:
        now = self._clock()
        fresh_until = now + self._max_age
        if fetched.expires_at is not None:
            fresh_until = min(fresh_until, fetched.expires_at - self._leeway)
        # The answer for the resource domain URL itself, which has no query of its own: any
        # parameter in the answer's query is the credential.
        base_path, query = _split(httpx.URL(fetched.url))
        return _Answer(
            credential=_Credential(dict(fetched.headers), tuple(query)),
            resource_origin=fetched.resource_origin,
            origin=_origin(httpx.URL(fetched.resource_origin)),
            base_path=base_path.rstrip("/"),
            fresh_until=fresh_until,
        )

    def _own_call_for(self, url: httpx.URL, answer: _Answer) -> str | None:
        """None when the cached answer serves ``url``; else the path to ask the service about.

        Raises ``DestinationRefused`` for a URL outside the resource domain.
        """
        return _judge(_origin(url), url.raw_path, answer)

    @staticmethod
    def _checked(target: httpx.URL, answer: _Answer, fetched: Authorization) -> _Signed:
        """An answer for one path, once it names the very URL being requested (with the API key
        added, when the cached answer says it goes in the query)."""
        answered = httpx.URL(fetched.url)
        names = _names(answer.credential.query)
        query = tuple(part for part in _split(answered)[1] if unquote(part.partition("=")[0]) in names)
        expected = _with_query(target, query)
        if (_origin(answered), answered.raw_path) != (_origin(expected), expected.raw_path):
            raise DestinationRefused(
                "the service joined this path to another URL than the one requested: no credentials are sent"
            )
        return _Signed(expected, _Credential(dict(fetched.headers), query), answer)


def _judge(origin: Origin, raw_target: bytes, answer: _Answer) -> str | None:
    """None when ``answer`` serves the URL of ``origin`` and ``raw_target`` (path and query) as it
    is; else the path relative to the base path, for the service to judge.

    Raises ``DestinationRefused`` for a URL outside the resource domain.
    """
    if origin != answer.origin:
        scheme, host, port = origin
        where = f"{scheme}://{host.decode('ascii')}" + (f":{port}" if port is not None else "")
        raise DestinationRefused(
            f"{where} is not the connector's resource origin {answer.resource_origin}: "
            "no credentials are sent there"
        )
    target = raw_target.decode("ascii")
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


# httpcore's trace events just before a request's headers are written, by protocol.
_SENDING_HEADERS = frozenset({"http11.send_request_headers.started", "http2.send_request_headers.started"})


class _Guard:
    """The trace callback of one request: refuses to write the headers of a hop other than the
    URL last signed, unless the answer it was signed with serves that hop as it is.

    ``signed`` is replaced when the request is signed again (after a 401), so the retry is
    judged against its own signing. A proxy's ``CONNECT`` (the tunnel, which carries no
    credentials) passes; a request to a forward proxy is judged by the URL in its target."""

    def __init__(self, signed: _Signed) -> None:
        self.signed = signed

    def check(self, name: str, info: dict[str, Any]) -> None:
        if name not in _SENDING_HEADERS:
            return
        request = info["request"]
        if request.method == b"CONNECT":
            return
        url = request.url
        target: bytes = url.target
        if target.startswith((b"https://", b"http://")):
            # Absolute form: the request goes to a forward proxy, for the URL in its target.
            hop = httpx.URL(target.decode("ascii"))
            origin, raw_target = _origin(hop), hop.raw_path
        else:
            scheme = url.scheme.decode("ascii")
            default = {"https": 443, "http": 80}.get(scheme)
            origin, raw_target = (scheme, url.host, None if url.port == default else url.port), target
        signed = self.signed
        if (origin, raw_target) == (_origin(signed.url), signed.url.raw_path):
            return
        if _judge(origin, raw_target, signed.answer) is not None:
            raise DestinationRefused(
                "a redirect leads to a path the connector's credentials were not given for: not followed"
            )


def _guard_hops(request: httpx.Request, signed: _Signed, *, asynchronous: bool) -> None:
    """Judge every hop of ``request`` (redirects included: they carry its extensions) before its
    headers are written; the caller's own trace callback still runs after the check."""
    guard = request.extensions.get("trace")
    if isinstance(getattr(guard, "guard", None), _Guard):
        guard.guard.signed = signed  # type: ignore[union-attr]
        return
    state = _Guard(signed)
    previous = request.extensions.get("trace")
    trace: Any
    if asynchronous:

        async def trace(name: str, info: dict[str, Any]) -> None:
            state.check(name, info)
            if previous is not None:
                await previous(name, info)

    else:

        def trace(name: str, info: dict[str, Any]) -> None:
            state.check(name, info)
            if previous is not None:
                previous(name, info)

    trace.guard = state
    request.extensions = {**request.extensions, "trace": trace}


def _apply(request: httpx.Request, signed: _Signed) -> None:
    request.url = signed.url
    request.headers.update(signed.credential.headers)
