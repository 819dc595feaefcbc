"""The connection layer: verified TLS, and TCP connections only to addresses the policy checked.

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
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import httpcore
import httpx

from app.core.outbound.policy import _DestinationPolicy

__all__ = ["build_ssl_context"]

_USER_AGENT: Final = "connectors/0.1"


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


def _build_http_client(
    ssl_context: ssl.SSLContext, backend: httpcore.AsyncNetworkBackend, timeout_seconds: float
) -> httpx.AsyncClient:
    """An httpx client over one pinned pool: no redirects, no environment, identity encoding."""
    return httpx.AsyncClient(
        transport=_PinnedTransport(ssl_context, backend),
        follow_redirects=False,
        trust_env=False,
        # A safety net only: the total deadline of OutboundClient.request bounds an operation.
        timeout=httpx.Timeout(timeout_seconds),
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
    )
