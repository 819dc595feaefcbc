"""The one outbound HTTP client: every token and validation request leaves through here.

The URLs this client calls are written by users, so each request is treated as an attempt to reach
somewhere it should not (server-side request forgery) and to hold the service hostage (slow or
huge answers). The defences, and why each sits where it does:

* **TLS always verified.** The trust store is the operating system's (``ssl.create_default_context``,
  which the operator manages; container images must carry ``ca-certificates``), plus the operator's
  CA bundle when one is configured. There is no switch to turn verification off.
* **No redirects, no proxies from the environment.** A redirect would carry a token request, and its
  credentials, to a host nobody checked; ``HTTPS_PROXY`` in the environment would route requests
  around the address policy.
* **Resolve once, connect to the checked address.** Checking a hostname and then letting the socket
  layer resolve it again leaves a window for DNS rebinding: the second answer can differ from the
  first. The check therefore lives in the network backend that opens the TCP connection: it
  resolves the name, refuses the connection if *any* answer is a non-global address, and connects
  to the checked IP itself. httpcore still performs the TLS handshake with the request's host as
  the server name, so the certificate is verified against the name the user wrote, not the IP.
  httpx 0.28 has no public way to hand a network backend to its default transport, so a small
  transport over the public ``httpcore.AsyncConnectionPool`` API stands in for it.
* **One total deadline per operation.** httpx's timeouts bound each phase separately, so a server
  that sends one byte per second never trips them; ``asyncio.timeout`` bounds the whole operation,
  connection, handshake, retries and the reading of the body included. Retries (connection errors,
  5xx and 429 only, with exponential backoff and jitter, honouring ``Retry-After``) happen inside
  that deadline: a wait that would not fit ends the retrying instead of running into the deadline.
* **Bodies are capped.** The body is streamed and reading stops past ``max_response_bytes``.
  ``Accept-Encoding: identity`` is asked for, and a compressed body that arrives anyway is inflated
  with the same cap, so a small compressed answer cannot expand into a large one in memory.

Errors are the service's own (``app.core.errors``), chosen by the caller's ``kind``: a token request
that times out is ``token_endpoint_timeout``, a validation request ``upstream_timeout``. Their
details name the host at most, never headers, bodies or anything else the request carried.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import secrets
import socket
import ssl
import zlib
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import httpcore
import httpx

from app.core.clock import Clock, SystemClock
from app.core.errors import (
    AppError,
    DestinationNotAllowed,
    TokenEndpointTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.core.metrics import Metrics, status_class

if TYPE_CHECKING:
    from app.core.config import Settings

__all__ = [
    "OutboundClient",
    "OutboundKind",
    "OutboundResponse",
    "Resolver",
    "build_ssl_context",
    "check_url",
    "refusal_reason",
    "system_resolver",
]

logger = logging.getLogger(__name__)

OutboundKind = Literal["token", "validation"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Resolves a host name to IP address strings, in the order they should be tried.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
Sleep = Callable[[float], Awaitable[None]]

_RETRYABLE_STATUS: Final = frozenset({429, 500, 502, 503, 504})
_USER_AGENT: Final = "connectors/0.1"


# --------------------------------------------------------------------------------------------------
# Address policy
# --------------------------------------------------------------------------------------------------


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Metadata services answer instance credentials to anyone who can reach them. All but Azure's
# are inside ranges refused anyway; they are listed so the refusal says what they are.
_METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer: a public address that only the host answers
    )
)

# ``ipaddress.is_global`` follows the IANA registries only as of the running Python (3.11.7 calls
# 192.0.0.192 and 64:ff9b::7f00:1 global), so the special-purpose ranges are also listed here.
_SPECIAL_IPV4: Final = _networks(
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",
    "100.64.0.0/10",  # shared address space (carrier-grade NAT)
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
_SPECIAL_IPV6: Final = _networks(
    "2001::/23",  # IETF protocol assignments, Teredo included (its client address is obfuscated)
    "2001:db8::/32",
    "3fff::/20",
)
# Globally routable IPv6 unicast is allocated from 2000::/3 only.
_GLOBAL_UNICAST_V6: Final = ipaddress.ip_network("2000::/3")
_SHARED_V4: Final = ipaddress.ip_network("100.64.0.0/10")
# Forms that carry an IPv4 address, which then decides: RFC 6052 NAT64 and RFC 3056 6to4.
_NAT64_V6: Final = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR_V6: Final = ipaddress.ip_network("2002::/16")


def _classify_v4(address: ipaddress.IPv4Address) -> str | None:
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED_V4:
        return "shared (carrier-grade NAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global or any(address in net for net in _SPECIAL_IPV4):
        return "non-global"
    return None


def _classify_v6(address: ipaddress.IPv6Address) -> str | None:
    if address.scope_id is not None:
        # A zone index only exists on link-scoped addresses.
        return "link-local"
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    embedded: ipaddress.IPv4Address | None = address.ipv4_mapped
    if embedded is None and address in _NAT64_V6:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is None:
        embedded = address.sixtofour
    if embedded is not None:
        # The packet ends up at the IPv4 address, so it is the one that must pass.
        return _classify_v4(embedded)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local or address.is_site_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if (
        address not in _GLOBAL_UNICAST_V6
        or not address.is_global
        or any(address in net for net in _SPECIAL_IPV6)
    ):
        return "non-global"
    return None


def refusal_reason(address: IPAddress | str) -> str | None:
    """Why an outbound connection to ``address`` is refused, or ``None`` if it is allowed.

    Pure and synchronous: the same rule serves save-time checks and connection time.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return "unparseable"
    if isinstance(address, ipaddress.IPv4Address):
        return _classify_v4(address)
    return _classify_v6(address)


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    host: str
    port: int


def check_url(url: str, *, allow_private_destinations: bool = True) -> httpx.URL:
    """Check that ``url`` is a plain ``https://`` URL with a host; raise ``DestinationNotAllowed``.

    Pure and synchronous: it never resolves a name (``OutboundClient.check_destination`` does),
    but with ``allow_private_destinations=False`` a host written as a non-global IP is refused.
    """
    target = _parse_target(url)
    literal = _literal_address(target.host)
    if not allow_private_destinations and literal is not None:
        reason = refusal_reason(literal)
        if reason is not None:
            raise DestinationNotAllowed(f"{target.host} is a {reason} address")
    return target.url


def _parse_target(url: str) -> _Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise DestinationNotAllowed("the URL is not valid") from None
    if parsed.scheme != "https":
        raise DestinationNotAllowed("only https:// URLs are allowed")
    if parsed.userinfo:
        raise DestinationNotAllowed("URLs must not carry credentials")
    host = parsed.host
    if not host:
        raise DestinationNotAllowed("the URL has no host")
    return _Target(url=parsed, host=host, port=443 if parsed.port is None else parsed.port)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve with the operating system's resolver, keeping its order and dropping duplicates."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class _DestinationPolicy:
    """Resolves a host once and decides whether every address it resolved to may be used."""

    def __init__(self, resolver: Resolver, allow_private: bool) -> None:
        self._resolver = resolver
        self._allow_private = allow_private

    async def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to, in order; raises ``DestinationNotAllowed``."""
        literal = _literal_address(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            try:
                candidates = list(await self._resolver(host, port))
            except OSError as exc:
                raise httpcore.ConnectError(f"could not resolve {host}") from exc
            if not candidates:
                raise httpcore.ConnectError(f"could not resolve {host}")
        if not self._allow_private:
            for candidate in candidates:
                reason = refusal_reason(candidate)
                if reason is not None:
                    # The address itself stays out of the message: at save time it would tell the
                    # caller about the internal network.
                    logger.warning("refused outbound destination %s (%s address)", host, reason)
                    verb = "is" if literal is not None else "resolves to"
                    raise DestinationNotAllowed(f"{host} {verb} a {reason} address")
        return candidates


# --------------------------------------------------------------------------------------------------
# Transport: pinned connections
# --------------------------------------------------------------------------------------------------


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens every TCP connection to an address the policy checked, never to a name."""

    def __init__(self, policy: _DestinationPolicy, inner: httpcore.AsyncNetworkBackend) -> None:
        self._policy = policy
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        # The parameter names are httpcore's interface; the total deadline is enforced above.
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._policy.addresses(host, port)
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # addresses() never returns an empty list
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an outbound destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# Most specific first: the first match decides.
_EXCEPTION_MAP: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProxyError, httpx.ProxyError),
)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    """Re-raise httpcore's exceptions as httpx's, as httpx's own transport does."""
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTION_MAP:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class _PinnedTransport(httpx.AsyncBaseTransport):
    """httpx's transport contract over an httpcore pool whose network backend we choose."""

    def __init__(self, ssl_context: ssl.SSLContext, backend: httpcore.AsyncNetworkBackend) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            http1=True,
            http2=False,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            core_response = await self._pool.handle_async_request(core_request)
        assert isinstance(core_response.stream, AsyncIterable)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response.stream),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def build_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The system trust store, plus the operator's CA bundle when given; verification always on."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_bundle is not None:
        context.load_verify_locations(cafile=str(ca_bundle))
    # create_default_context already sets both; asserting keeps a future edit from loosening them.
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    return context


# --------------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------------


class _BodyTooLargeError(Exception):
    pass


class _BodyUndecodableError(Exception):
    pass


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLargeError
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLargeError
    return bytes(body)


def _decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    if not content_encoding:
        return raw
    body = raw
    # Codings are listed in the order they were applied, so they are undone from the last.
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise _BodyUndecodableError
        # wbits 32+15 accepts both zlib and gzip headers.
        inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise _BodyUndecodableError from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise _BodyTooLargeError
        body = out
    return body


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    """A complete response: the status, headers (lower-case names) and the whole body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


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


class OutboundClient:
    """The service's only HTTP client for calls to user-supplied URLs; see the module docstring."""

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
    ) -> None:
        """Build the client once; ``resolver``, ``clock``, ``sleep``, ``jitter`` and
        ``network_backend`` exist for tests.

        ``jitter`` returns a number in [0, 1) that spreads each backoff between half and all of
        its nominal length.
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
        self._policy = _DestinationPolicy(resolver or system_resolver, allow_private_destinations)
        self._allow_private = allow_private_destinations
        self._durations = (metrics or Metrics()).outbound_duration
        backend = _PinnedBackend(self._policy, network_backend or httpcore.AnyIOBackend())
        self._client = httpx.AsyncClient(
            transport=_PinnedTransport(build_ssl_context(ca_bundle), backend),
            follow_redirects=False,
            trust_env=False,
            # A safety net only: the total deadline in request() is what bounds an operation.
            timeout=httpx.Timeout(timeout_seconds),
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None) -> OutboundClient:
        return cls(
            timeout_seconds=settings.outbound_timeout_seconds,
            ca_bundle=settings.ca_bundle,
            allow_private_destinations=settings.allow_private_destinations,
            max_response_bytes=settings.outbound_max_response_bytes,
            metrics=metrics,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

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
        except (httpcore.ConnectError, TimeoutError):
            logger.info("could not resolve %s while checking a destination", target.host)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        kind: OutboundKind,
    ) -> OutboundResponse:
        """Send one request (retried within the deadline) and return the final response.

        3xx, 4xx and 5xx responses are returned, not raised: what they mean depends on the caller.
        Raises ``DestinationNotAllowed``, ``UpstreamUnreachable`` and, depending on ``kind``,
        ``TokenEndpointTimeout`` or ``UpstreamTimeout``.
        """
        target = _parse_target(url)
        started = self._clock.monotonic()
        deadline = started + self._timeout
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._with_retries(method, target, headers, data, kind, deadline)
        except TimeoutError:
            self._observe(kind, "timeout", started)
            raise self._timeout_error(kind, target.host) from None
        except Exception as error:
            # A cancelled request (shutdown, a renewal no longer needed) is not counted.
            self._observe(kind, _error_result(error), started)
            raise
        self._observe(kind, status_class(response.status_code), started)
        return response

    async def _with_retries(
        self,
        method: str,
        target: _Target,
        headers: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
        kind: OutboundKind,
        deadline: float,
    ) -> OutboundResponse:
        attempt = 1
        while True:
            try:
                response = await self._send_once(method, target, headers, data)
            except httpx.TimeoutException:
                raise self._timeout_error(kind, target.host) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                tls = _tls_failure(exc)
                if tls is not None:
                    # Certificates do not fix themselves within a few hundred milliseconds.
                    raise UpstreamUnreachable(_tls_detail(target.host, tls)) from None
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
        method: str,
        target: _Target,
        headers: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
    ) -> OutboundResponse:
        async with self._client.stream(
            method, target.url, headers=dict(headers or {}), data=data
        ) as response:
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


def _tls_detail(host: str, error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {host} could not be verified ({error.verify_message})"
    return f"the TLS handshake with {host} failed"


def _network_detail(host: str, exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__cause__
        # The resolver's message is ours ("could not resolve <host>"); others may carry OS detail.
        if isinstance(cause, httpcore.ConnectError) and str(cause).startswith("could not resolve"):
            return f"could not resolve {host}"
        return f"could not connect to {host}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{host} closed the connection without a valid response"
    return f"the connection to {host} failed"
