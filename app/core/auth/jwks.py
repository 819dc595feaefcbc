"""The JWKS document behind ``CONNECTORS_JWKS_URL``: fetched over https, cached, refetched sparingly.

The JWKS document is cached for five minutes and fetched again early when a token names a key id
the cache does not know. Whatever the reason, a fetch starts at most once per ten seconds and
concurrent callers share it, so tokens with made-up key ids (or a JWKS server that is down) cannot
make this service hammer the identity provider. When the cache has expired, callers whose key is
known go on with it while a fetch runs in the background; a failed fetch keeps the keys already
known. A failed fetch is logged and answered with 401, never 500. The JWKS server is configured by
the operator, so it is reached with httpx's default trust store (certifi) plus
``CONNECTORS_CA_BUNDLE``, certificate verification on, no redirects, no proxy from the environment,
and without the destination policy that guards calls to connectors' endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import httpx
import jwt

from app.core.auth.keys import _key_from_jwk, _VerificationKey
from app.core.clock import Clock
from app.core.config import Settings
from app.core.errors import Unauthenticated

# The package's name: log lines keep the logger name they have always had.
logger = logging.getLogger("app.core.auth")

JWKS_CACHE_SECONDS = 300.0
JWKS_REFETCH_INTERVAL_SECONDS = 10.0
MAX_JWKS_BYTES = 256 * 1024


class _JwksError(Exception):
    """The JWKS document could not be fetched or used; the message is safe to log."""


class JwksUnavailable(Exception):
    """The JWKS document could not be fetched now, or holds no usable key; the message is one
    printable line (the reason, never a token)."""


def _parse_jwks(body: bytes) -> dict[str, _VerificationKey]:
    try:
        document = json.loads(body)
    except ValueError:
        raise _JwksError("the document is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _JwksError("the document has no keys list")
    keys: dict[str, _VerificationKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        try:
            found = _key_from_jwk(entry)
        except (jwt.PyJWTError, ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed key in the JWKS document")
            continue
        if found is not None:
            keys.setdefault(*found)
    if not keys:
        raise _JwksError("the document has no usable RS256 or ES256 signing key")
    return keys


class _JwksCache:
    """Keys of one JWKS document: cached, refetched sparingly, one fetch at a time."""

    def __init__(self, url: str, client: httpx.AsyncClient, clock: Clock, timeout: float) -> None:
        self._url = url
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._keys: dict[str, _VerificationKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    async def get(self, kid: str) -> _VerificationKey:
        key = self._keys.get(kid)
        if self._inflight is None and self._due(kid):
            self._attempted_at = self._clock.monotonic()
            self._inflight = asyncio.create_task(self._refresh())
        if key is None and self._inflight is not None:
            # Shielded: a caller that gives up must not cancel the fetch others are waiting for.
            await asyncio.shield(self._inflight)
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("signing keys unavailable" if self._fetched_at is None else "invalid token")
        return key

    def _due(self, kid: str) -> bool:
        now = self._clock.monotonic()
        if self._attempted_at is not None and now - self._attempted_at < JWKS_REFETCH_INTERVAL_SECONDS:
            return False
        return (
            self._fetched_at is None or now - self._fetched_at >= JWKS_CACHE_SECONDS or kid not in self._keys
        )

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                keys = await self._fetch()
        except (httpx.HTTPError, TimeoutError, _JwksError) as error:
            detail = str(error) or type(error).__name__
            logger.warning("fetching the JWKS document from %s failed: %s", self._url, detail)
        except Exception:
            logger.exception("fetching the JWKS document from %s failed", self._url)
        else:
            self._keys = keys
            self._fetched_at = self._clock.monotonic()
        finally:
            self._inflight = None

    async def _fetch(self) -> dict[str, _VerificationKey]:
        async with self._client.stream("GET", self._url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise _JwksError(f"HTTP status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _JwksError("the document is too large")
        return _parse_jwks(bytes(body))

    async def key_ids(self) -> tuple[str, ...]:
        """Fetch the document now, whatever the cache holds, and name its usable signing keys."""
        try:
            async with asyncio.timeout(self._timeout):
                keys = await self._fetch()
        except (httpx.HTTPError, TimeoutError, _JwksError) as error:
            raise JwksUnavailable(str(error) or type(error).__name__) from None
        return tuple(sorted(keys))

    async def aclose(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._client.aclose()


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    context = httpx.create_ssl_context(trust_env=False)
    if settings.ca_bundle is not None:
        context.load_verify_locations(cafile=settings.ca_bundle)
    return context
