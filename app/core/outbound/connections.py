"""One connection pool per client identity: anonymous, or one per client certificate.

A TLS connection is authenticated once, during its handshake, with whatever certificate the
client presented then. A pooled connection reused for another request therefore speaks with the
identity of the request that opened it. So connections opened with one certificate never serve a
request with another certificate or without one: each identity gets its own pool (an httpx client
over its own pinned transport), all sharing the destination policy and network backend.

The pools for certificates are kept in a bounded LRU keyed by a SHA-256 digest of the certificate
and key (never the key itself). An evicted pool is closed; a pool a request is using at that
moment is passed over until it is done. Building a pool's TLS context reads the system trust
store (tens of milliseconds), so it runs in a worker thread, not on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpcore
import httpx

from app.core.lru import LRU
from app.core.outbound.certificates import ClientCertificate, build_client_ssl_context
from app.core.outbound.transport import _build_http_client, build_ssl_context


@dataclass(slots=True)
class _Pool:
    client: httpx.AsyncClient
    in_use: int = 0


class _Connections:
    """Hands out the httpx client whose connections carry a request's client identity."""

    def __init__(
        self,
        *,
        ca_bundle: Path | None,
        backend: httpcore.AsyncNetworkBackend,
        timeout_seconds: float,
        max_certificates: int,
    ) -> None:
        self._ca_bundle = ca_bundle
        self._backend = backend
        self._timeout = timeout_seconds
        self._anonymous = _build_http_client(build_ssl_context(ca_bundle), backend, timeout_seconds)
        self._evicted: list[_Pool] = []
        self._certified: LRU[bytes, _Pool] = LRU(
            max_certificates,
            on_evict=lambda _digest, pool: self._evicted.append(pool),
            busy=lambda pool: pool.in_use > 0,
        )
        self._closed = False

    @asynccontextmanager
    async def client(self, certificate: ClientCertificate | None) -> AsyncIterator[httpx.AsyncClient]:
        """The client for requests presenting ``certificate`` (or none), held for the block.

        Raises ``InvalidClientCertificate`` if the certificate and key cannot be loaded.
        """
        if certificate is None:
            yield self._anonymous
            return
        pool = await self._acquire(certificate)
        try:
            await self._close_evicted()
            yield pool.client
        finally:
            pool.in_use -= 1

    async def _acquire(self, certificate: ClientCertificate) -> _Pool:
        """The pool for ``certificate``, its use already counted; built on a miss."""
        digest = certificate.digest()
        pool = self._certified.get(digest)
        if pool is None:
            self._check_open()
            context = await asyncio.to_thread(build_client_ssl_context, self._ca_bundle, certificate)
            self._check_open()
            # Another request may have built the same pool while this one waited for the thread.
            pool = self._certified.get(digest)
            if pool is None:
                pool = _Pool(_build_http_client(context, self._backend, self._timeout))
                self._certified.put(digest, pool)
        # Counted with no wait since the lookup, so eviction cannot take this pool from the request.
        pool.in_use += 1
        return pool

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the outbound client has been closed")

    async def _close_evicted(self) -> None:
        evicted, self._evicted = self._evicted, []
        for pool in evicted:
            await pool.client.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._anonymous.aclose()
        digests = list(self._certified.keys())
        for digest in digests:
            pool = self._certified.pop(digest)
            if pool is not None:
                self._evicted.append(pool)
        await self._close_evicted()
