"""Caller identity: a bearer JWT becomes a :class:`Principal`, or the request is refused with 401.

The signature algorithm is pinned by configuration, never taken from the token:

* ``CONNECTORS_JWT_SECRET``: HS256 with that shared secret, and nothing else.
* ``CONNECTORS_JWT_PUBLIC_KEY``: a PEM public key (the PEM text itself, with real or ``\\n``-escaped
  line breaks, or the path of a PEM file). RS256 when it is an RSA key (2048 bits or more), ES256
  when it is an EC P-256 key; only that one algorithm.
* ``CONNECTORS_JWKS_URL``: keys from a JWKS document fetched over https, selected by the token's
  ``kid``. Each key is used only with the algorithm its type implies (RSA: RS256, EC P-256: ES256);
  other key types, encryption keys and keys declaring another ``alg`` are ignored.

A token whose header names any other algorithm (``none``, HS256 against a public key, ...) is
refused before any key is used, which closes the algorithm-confusion attack.

Claims: ``exp`` is required and checked (as are ``nbf`` and ``iat`` when present) against the
injected clock with ``CONNECTORS_JWT_LEEWAY_SECONDS`` of leeway; ``iss`` must equal
``CONNECTORS_JWT_ISSUER``; ``aud`` (a string or a list) must contain ``CONNECTORS_JWT_AUDIENCE``;
the organization comes only from the claim named by ``CONNECTORS_JWT_ORG_CLAIM``. Scopes come from
``scope`` (a space-separated string, RFC 8693), or when it is absent from ``scp`` (a list or a
space-separated string, as some identity providers write it). ``sub`` is optional.

The JWKS document is cached for five minutes and fetched again early when a token names a key id
the cache does not know. Whatever the reason, a fetch starts at most once per ten seconds and
concurrent callers share it, so tokens with made-up key ids (or a JWKS server that is down) cannot
make this service hammer the identity provider. When the cache has expired, callers whose key is
known go on with it while a fetch runs in the background; a failed fetch keeps the keys already
known. A failed fetch is logged and answered with 401, never 500. The JWKS server is configured by
the operator, so it is reached with httpx's default trust store (certifi) plus
``CONNECTORS_CA_BUNDLE``, certificate verification on, no redirects, no proxy from the environment,
and without the destination policy that guards calls to connectors' endpoints.

Every refusal is :class:`~app.core.errors.Unauthenticated` with a short fixed detail; neither
details nor log lines contain the token or claim values.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.core.clock import Clock, SystemClock
from app.core.config import ConfigError, Settings
from app.core.errors import Unauthenticated
from app.core.lru import LRU

logger = logging.getLogger(__name__)

SCOPE_READ = "connectors:read"
SCOPE_WRITE = "connectors:write"
SCOPE_AUTHORIZE = "connectors:authorize"

MAX_ORGANIZATION_ID_LENGTH = 128
MAX_TOKEN_LENGTH = 8 * 1024
MAX_KEY_ID_LENGTH = 256
MIN_RSA_KEY_BITS = 2048

JWKS_CACHE_SECONDS = 300.0
JWKS_REFETCH_INTERVAL_SECONDS = 10.0
MAX_JWKS_BYTES = 256 * 1024

_ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the organization (the only source of tenancy), the subject and the scopes."""

    organization_id: str
    subject: str | None
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    key: bytes | PublicKey
    algorithm: str


def _pinned(key: object) -> _VerificationKey:
    """``key`` with the one algorithm it may verify; ``ValueError`` for unsupported keys."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_KEY_BITS} bits")
        return _VerificationKey(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return _VerificationKey(key, "ES256")
    raise ValueError("only RSA and EC P-256 public keys are supported")


def _load_public_key(value: str) -> _VerificationKey:
    """Load ``CONNECTORS_JWT_PUBLIC_KEY``: PEM text or the path of a PEM file."""
    text = value.strip()
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).read_text()
        except (OSError, ValueError):
            raise ConfigError(
                "CONNECTORS_JWT_PUBLIC_KEY: neither PEM text nor the path of a readable file"
            ) from None
    # Environment variables often carry PEM with escaped line breaks.
    text = text.replace("\\n", "\n")
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("CONNECTORS_JWT_PUBLIC_KEY: not a PEM public key") from None
    try:
        return _pinned(key)
    except ValueError as error:
        raise ConfigError(f"CONNECTORS_JWT_PUBLIC_KEY: {error}") from None


def _key_from_jwk(jwk: Mapping[str, Any]) -> tuple[str, _VerificationKey] | None:
    """A signing key of the JWKS document with its pinned algorithm, or None to ignore it."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KEY_ID_LENGTH:
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    loaded: object
    if kty == "RSA":
        algorithm = "RS256"
        loaded = RSAAlgorithm.from_jwk(dict(jwk))
    elif kty == "EC" and jwk.get("crv") == "P-256":
        algorithm = "ES256"
        loaded = ECAlgorithm.from_jwk(dict(jwk))
    else:
        return None
    if jwk.get("alg", algorithm) != algorithm:
        return None
    if isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        loaded = loaded.public_key()
    return kid, _pinned(loaded)


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


def _encodable(value: str) -> bool:
    # A lone surrogate is a valid JSON string escape but cannot be stored or logged as UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_organization_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ORGANIZATION_ID_LENGTH
        and value.isprintable()
        and value.strip() == value
        and _encodable(value)
    )


def _valid_subject(value: object) -> bool:
    return value is None or (
        isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable() and _encodable(value)
    )


def _is_time(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        # Beyond any real date; also keeps a huge integer from overflowing float arithmetic.
        return math.isfinite(value) and abs(value) < 1e12
    except OverflowError:
        return False


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    raw = claims["scope"] if "scope" in claims else claims.get("scp")
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        return frozenset(raw.split())
    if "scope" not in claims and isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return frozenset(raw)
    raise Unauthenticated("invalid token")


class TokenVerifier:
    """Turns a caller's bearer token into a :class:`Principal` under the configured key."""

    def __init__(
        self,
        settings: Settings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Load the configured key; ``ConfigError`` when it is missing or unusable.

        ``ssl_context`` replaces the TLS context used for the JWKS URL (by default certifi's trust
        store plus ``CONNECTORS_CA_BUNDLE``).
        """
        self._settings = settings
        self._clock: Clock = clock or SystemClock()
        self._static_key: _VerificationKey | None = None
        # The least recently used goes first when full.
        self._verified: LRU[bytes, tuple[Principal, float, str, _VerificationKey]] = LRU(
            settings.caller_token_cache_size
        )
        self._jwks: _JwksCache | None = None
        if settings.jwt_secret is not None:
            secret = settings.jwt_secret.get_secret_value().encode()
            if not secret:
                raise ConfigError("CONNECTORS_JWT_SECRET: must not be empty")
            self._static_key = _VerificationKey(secret, "HS256")
        elif settings.jwt_public_key is not None:
            self._static_key = _load_public_key(settings.jwt_public_key)
        elif settings.jwks_url is not None:
            client = httpx.AsyncClient(
                verify=ssl_context or _ssl_context(settings),
                follow_redirects=False,
                trust_env=False,
                timeout=settings.outbound_timeout_seconds,
            )
            self._jwks = _JwksCache(settings.jwks_url, client, self._clock, settings.outbound_timeout_seconds)
        else:
            raise ConfigError(
                "set one of CONNECTORS_JWT_SECRET, CONNECTORS_JWT_PUBLIC_KEY or CONNECTORS_JWKS_URL"
            )

    async def verify(self, token: str) -> Principal:
        """The caller behind ``token``; ``Unauthenticated`` when it is not acceptable.

        A token that passed is remembered (by its SHA-256) until it expires: callers such as a
        flow's HTTP step send the same token many times, and a signature check costs more than the
        rest of ``/authorize``. How many are remembered is bounded (least recently used go first);
        how long needs no bound of its own, since a remembered token is one that verified and its
        claims cannot change, and with a JWKS every use checks that its key is still the one the
        document (refetched every five minutes) names.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token")
        digest = hashlib.sha256(token.encode()).digest()
        remembered = self._verified.get(digest)
        if remembered is not None:
            principal, valid_until, kid, key = remembered
            # A JWKS key that was replaced or withdrawn since no longer vouches for the token.
            if self._clock.now().timestamp() < valid_until and (
                self._jwks is None or await self._jwks.get(kid) is key
            ):
                return principal
            self._verified.pop(digest)
        principal, expires, kid, key = await self._verify(token)
        self._verified.put(digest, (principal, expires + self._settings.jwt_leeway_seconds, kid, key))
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float, str, _VerificationKey]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        key = await self._key_for(header)
        if header.get("alg") != key.algorithm:
            raise Unauthenticated("invalid token")
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                # Times are checked below against the injected clock.
                options={
                    "require": ["exp", "iss", "aud"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience not accepted") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        self._check_times(claims)
        organization_id = claims.get(settings.jwt_org_claim)
        if not _valid_organization_id(organization_id):
            raise Unauthenticated("token has no valid organization claim")
        assert isinstance(organization_id, str)
        if not _valid_subject(claims.get("sub")):
            raise Unauthenticated("invalid token")
        principal = Principal(
            organization_id=organization_id, subject=claims.get("sub"), scopes=_scopes(claims)
        )
        return principal, float(claims["exp"]), str(header.get("kid", "")), key

    async def _key_for(self, header: Mapping[str, Any]) -> _VerificationKey:
        if self._static_key is not None:
            return self._static_key
        assert self._jwks is not None
        kid = header.get("kid")
        if (
            header.get("alg") not in _ASYMMETRIC_ALGORITHMS
            or not isinstance(kid, str)
            or not 0 < len(kid) <= MAX_KEY_ID_LENGTH
        ):
            raise Unauthenticated("invalid token")
        return await self._jwks.get(kid)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock.now().timestamp()
        leeway = self._settings.jwt_leeway_seconds
        exp, nbf, iat = claims["exp"], claims.get("nbf"), claims.get("iat")
        if not _is_time(exp) or any(value is not None and not _is_time(value) for value in (nbf, iat)):
            raise Unauthenticated("invalid token")
        if now >= exp + leeway:
            raise Unauthenticated("token expired")
        if any(value is not None and value > now + leeway for value in (nbf, iat)):
            raise Unauthenticated("token not yet valid")

    @property
    def algorithm(self) -> str | None:
        """The one algorithm the configured secret or public key verifies; None with a JWKS URL."""
        return None if self._static_key is None else self._static_key.algorithm

    async def jwks_key_ids(self) -> tuple[str, ...]:
        """With ``CONNECTORS_JWKS_URL``, fetch the document now (the client, limits and timeout
        verification uses) and return the key ids of its usable signing keys; ``()`` without one.

        ``JwksUnavailable`` when it cannot be fetched or holds no usable key. For
        ``python -m app check``: verification itself keeps to its cache and its refetch limits.
        """
        if self._jwks is None:
            return ()
        return await self._jwks.key_ids()

    async def aclose(self) -> None:
        """Release the JWKS client, if any."""
        if self._jwks is not None:
            await self._jwks.aclose()


def mint_token(
    settings: Settings,
    *,
    organization_id: str,
    scopes: Iterable[str],
    ttl_seconds: int = 3600,
    subject: str = "dev",
) -> str:
    """A caller token signed with the configured HS256 secret (development and tests)."""
    if settings.jwt_secret is None:
        raise ConfigError("minting a caller token needs CONNECTORS_JWT_SECRET (HS256)")
    if not _valid_organization_id(organization_id):
        raise ValueError(f"the organization id must be 1-{MAX_ORGANIZATION_ID_LENGTH} printable characters")
    scope_set = set(scopes)
    if any(not scope or scope.split() != [scope] for scope in scope_set):
        raise ValueError("each scope must be a non-empty word without spaces")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": subject,
        settings.jwt_org_claim: organization_id,
        "scope": " ".join(sorted(scope_set)),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")
