"""The verifier: a caller's bearer token becomes a :class:`Principal` under the configured key.

The key and its one algorithm come from :mod:`~app.core.auth.keys` (or, by the token's ``kid``,
from the JWKS document of :mod:`~app.core.auth.jwks`). A token whose header names any other
algorithm (``none``, HS256 against a public key, ...) is refused before any key is used, which
closes the algorithm-confusion attack. The claims are then checked by the rules of
:mod:`~app.core.auth.claims`.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from app.core.auth.claims import _is_time, _scopes, _valid_organization_id, _valid_subject
from app.core.auth.jwks import _JwksCache, _ssl_context
from app.core.auth.keys import _ASYMMETRIC_ALGORITHMS, MAX_KEY_ID_LENGTH, _load_public_key, _VerificationKey
from app.core.clock import Clock, SystemClock
from app.core.config import ConfigError, Settings
from app.core.errors import Unauthenticated
from app.core.lru import LRU

MAX_TOKEN_LENGTH = 8 * 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the organization (the only source of tenancy), the subject and the scopes."""

    organization_id: str
    subject: str | None
    scopes: frozenset[str]


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
