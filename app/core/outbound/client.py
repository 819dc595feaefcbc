"""``OutboundClient``: one request, retried within one deadline, its failures in the service's words.

* **One total deadline per operation.** httpx's timeouts bound each phase separately, so a server
  that sends one byte per second never trips them; ``asyncio.timeout`` bounds the whole operation,
  connection, handshake, retries and the reading of the body included. Retries (connection errors,
  5xx and 429 only, with exponential backoff and jitter, honouring ``Retry-After``) happen inside
  that deadline: a wait that would not fit ends the retrying instead of running into the deadline.
* **TLS failures are not retried.** Certificates do not fix themselves within a few hundred
  milliseconds. When the request presented a client certificate and the server answered with an
  alert about it, the credentials were refused (``CredentialsRejected``); any other TLS failure
  means the server cannot be reached safely (``UpstreamUnreachable``).

Errors are the service's own (``app.core.errors``), chosen by the caller's ``kind``: a token request
that times out is ``token_endpoint_timeout``, a validation request ``upstream_timeout``. Their
details name the host at most, never headers, bodies, certificates or anything else the request
carried.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import httpcore
import httpx

from app.core.clock import Clock, SystemClock
from app.core.errors import (
    AppError,
    CredentialsRejected,
    DestinationNotAllowed,
    NameNotResolved,
    TokenEndpointTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.core.metrics import Metrics, status_class
from app.core.outbound.bodies import (
    OutboundResponse,
    _BodyTooLargeError,
    _BodyUndecodableError,
    _decode_body,
    _read_capped,
)
from app.core.outbound.certificates import ClientCertificate, InvalidClientCertificate, certificate_refusal
from app.core.outbound.connections import _Connections
from app.core.outbound.lookups import Lookups
from app.core.outbound.policy import Resolver, _DestinationPolicy, _parse_target, _Target
from app.core.outbound.transport import _PinnedBackend

if TYPE_CHECKING:
    from app.core.config import Settings

__all__ = ["OutboundClient", "OutboundKind"]

logger = logging.getLogger(__name__)

OutboundKind = Literal["token", "validation", "webhook"]
Sleep = Callable[[float], Awaitable[None]]

_RETRYABLE_STATUS: Final = frozenset({429, 500, 502, 503, 504})


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


# A form, or what makes one for each attempt.
FormData = Mapping[str, str] | Callable[[], Mapping[str, str]]
# What a request sends: a form, or bytes as they are.
Body = FormData | bytes


class OutboundClient:
    """The service's only HTTP client for calls to user-supplied URLs; see ``app.core.outbound``."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        ca_bundle: Path | None,
        allow_private_destinations: bool,
        max_response_bytes: int,
        max_attempts: int = 3,
        backoff_base_seconds: float = 0.1,
        resolver: Resolver | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        jitter: Callable[[], float] | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        metrics: Metrics | None = None,
        max_client_certificates: int = 256,
    ) -> None:
        """Build the client once; ``resolver``, ``clock``, ``sleep``, ``jitter`` and
        ``network_backend`` exist for tests.

        ``jitter`` returns a number in [0, 1) that spreads each backoff between half and all of
        its nominal length. ``max_client_certificates`` bounds the connection pools kept for
        requests that present a client certificate (one per certificate).
        """
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        self._timeout = timeout_seconds
        self._max_bytes = max_response_bytes
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._clock: Clock = clock or SystemClock()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._jitter = jitter or secrets.SystemRandom().random
        # Without a resolver of the caller's, the client resolves with c-ares and closes it.
        self._own_resolver: Lookups | None = None
        if resolver is None:
            resolver = self._own_resolver = Lookups.build(timeout_seconds=timeout_seconds, clock=clock)
        self._policy = _DestinationPolicy(resolver, allow_private_destinations)
        self._allow_private = allow_private_destinations
        self._durations = (metrics or Metrics()).outbound_duration
        backend = _PinnedBackend(self._policy, network_backend or httpcore.AnyIOBackend())
        self._connections = _Connections(
            ca_bundle=ca_bundle,
            backend=backend,
            timeout_seconds=timeout_seconds,
            max_certificates=max_client_certificates,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, metrics: Metrics | None = None, resolver: Resolver | None = None
    ) -> OutboundClient:
        """The token and validation client; ``resolver`` is the process's shared ``Lookups``."""
        return cls(
            timeout_seconds=settings.outbound_timeout_seconds,
            ca_bundle=settings.ca_bundle,
            allow_private_destinations=settings.allow_private_destinations,
            max_response_bytes=settings.outbound_max_response_bytes,
            metrics=metrics,
            max_client_certificates=settings.outbound_max_client_certificates,
            resolver=resolver,
        )

    async def aclose(self) -> None:
        await self._connections.aclose()
        if self._own_resolver is not None:
            await self._own_resolver.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def check_destination(self, url: str) -> None:
        """Refuse ``url`` before it is saved if it is not https or its host is non-global.

        Raises ``DestinationNotAllowed``. A host that cannot be resolved right now is not refused:
        DNS may be down for a moment, and a name that does not resolve leads nowhere. Nothing
        here is remembered: every connection checks the addresses again.
        """
        target = _parse_target(url)
        if self._allow_private:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._policy.addresses(target.host, target.port)
        except (NameNotResolved, TimeoutError):
            logger.info("could not resolve %s while checking a destination", target.host)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: FormData | None = None,
        content: bytes | None = None,
        kind: OutboundKind,
        client_certificate: ClientCertificate | None = None,
    ) -> OutboundResponse:
        """Send one request (retried within the deadline) and return the final response.

        3xx, 4xx and 5xx responses are returned, not raised: what they mean depends on the caller.
        Raises ``DestinationNotAllowed``, ``UpstreamUnreachable`` and, depending on ``kind``,
        ``TokenEndpointTimeout`` or ``UpstreamTimeout``. With ``client_certificate`` the request
        goes out over connections that present it (mutual TLS), and a server refusing it, or a
        certificate and key that cannot be loaded together, raise ``CredentialsRejected``.
        ``data`` is a form (or makes one per attempt); ``content``, bytes sent as they are.
        """
        target = _parse_target(url)
        started = self._clock.monotonic()
        deadline = started + self._timeout
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._connections.client(client_certificate) as client,
            ):
                response = await self._with_retries(
                    client,
                    method,
                    target,
                    headers,
                    content if content is not None else data,
                    kind,
                    deadline,
                    certified=client_certificate is not None,
                )
        except TimeoutError:
            self._observe(kind, "timeout", started)
            raise self._timeout_error(kind, target.host) from None
        except InvalidClientCertificate as error:
            # Refused on save; a pair that still cannot be loaded is the connector's credentials
            # at fault. Its message quotes neither certificate nor key.
            self._observe(kind, "error", started)
            raise CredentialsRejected(str(error)) from None
        except Exception as error:
            # A cancelled request (shutdown, a renewal no longer needed) is not counted.
            self._observe(kind, _error_result(error), started)
            raise
        self._observe(kind, status_class(response.status_code), started)
        return response

    async def _with_retries(
        self,
        client: httpx.AsyncClient,
        method: str,
        target: _Target,
        headers: Mapping[str, str] | None,
        data: Body | None,
        kind: OutboundKind,
        deadline: float,
        *,
        certified: bool,
    ) -> OutboundResponse:
        attempt = 1
        while True:
            try:
                response = await self._send_once(client, method, target, headers, data)
            except httpx.TimeoutException:
                raise self._timeout_error(kind, target.host) from None
            except ssl.SSLError as exc:
                # A TLS 1.3 server's alert (about our certificate, say) arrives after the handshake,
                # on the first read, where httpcore lets the ``ssl.SSLError`` through as it is.
                raise _tls_error(kind, target.host, exc, certified=certified) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                tls = _tls_failure(exc)
                if tls is not None:
                    # Certificates do not fix themselves within a few hundred milliseconds.
                    raise _tls_error(kind, target.host, tls, certified=certified) from None
                delay = self._backoff(attempt)
                if attempt >= self._max_attempts or not self._fits(delay, deadline):
                    raise UpstreamUnreachable(_network_detail(target.host, exc)) from None
                logger.info(
                    "outbound %s to %s failed (%s), retry %d after %.2fs",
                    method,
                    target.host,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
            except httpx.TransportError as exc:
                raise UpstreamUnreachable(_network_detail(target.host, exc)) from None
            else:
                if response.status_code not in _RETRYABLE_STATUS or attempt >= self._max_attempts:
                    return response
                retry_after = _retry_after_seconds(response.headers.get("retry-after"), self._clock.now())
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                if not self._fits(delay, deadline):
                    return response
                logger.info(
                    "outbound %s to %s answered %d, retry %d after %.2fs",
                    method,
                    target.host,
                    response.status_code,
                    attempt,
                    delay,
                )
            await self._sleep(delay)
            attempt += 1

    async def _send_once(
        self,
        client: httpx.AsyncClient,
        method: str,
        target: _Target,
        headers: Mapping[str, str] | None,
        data: Body | None,
    ) -> OutboundResponse:
        # A callable makes the form of each attempt afresh (a client assertion is used only once).
        if isinstance(data, bytes):
            stream = client.stream(method, target.url, headers=dict(headers or {}), content=data)
        else:
            form = data() if callable(data) else data
            stream = client.stream(method, target.url, headers=dict(headers or {}), data=form)
        async with stream as response:
            try:
                raw = await _read_capped(response, self._max_bytes)
                content = _decode_body(raw, response.headers.get("content-encoding"), self._max_bytes)
            except _BodyTooLargeError:
                raise UpstreamUnreachable(
                    f"{target.host} answered with a body larger than {self._max_bytes} bytes"
                ) from None
            except _BodyUndecodableError:
                raise UpstreamUnreachable(
                    f"{target.host} answered with a body in an unsupported encoding"
                ) from None
            return OutboundResponse(
                status_code=response.status_code,
                headers=MappingProxyType({k.lower(): v for k, v in response.headers.items()}),
                content=content,
            )

    def _observe(self, kind: OutboundKind, result: str, started: float) -> None:
        self._durations.labels(kind, result).observe(self._clock.monotonic() - started)

    def _backoff(self, attempt: int) -> float:
        nominal = self._backoff_base * (2 ** (attempt - 1))
        return float(nominal * (0.5 + self._jitter() / 2))

    def _fits(self, delay: float, deadline: float) -> bool:
        # Waiting only makes sense if some time is left for the request after the wait.
        return delay < deadline - self._clock.monotonic()

    def _timeout_error(self, kind: OutboundKind, host: str) -> AppError:
        if kind == "token":
            return TokenEndpointTimeout(
                f"the token endpoint at {host} did not answer within {self._timeout:g}s"
            )
        return UpstreamTimeout(f"{host} did not answer within {self._timeout:g}s")


def _error_result(error: Exception) -> str:
    """The ``result`` label of an outbound request that ended in ``error``."""
    if isinstance(error, TokenEndpointTimeout | UpstreamTimeout):
        return "timeout"
    if isinstance(error, DestinationNotAllowed):
        return "refused"
    return "error"


def _tls_error(kind: OutboundKind, host: str, error: ssl.SSLError, *, certified: bool) -> AppError:
    refusal = certificate_refusal(error) if certified else None
    if refusal is not None:
        who = f"the token endpoint at {host}" if kind == "token" else host
        return CredentialsRejected(f"{who} refused the client certificate ({refusal})")
    return UpstreamUnreachable(_tls_detail(host, error))


def _tls_detail(host: str, error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {host} could not be verified ({error.verify_message})"
    return f"the TLS handshake with {host} failed"


def _network_detail(host: str, exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect to {host}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{host} closed the connection without a valid response"
    return f"the connection to {host} failed"
