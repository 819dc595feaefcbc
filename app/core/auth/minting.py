"""Caller tokens for development and tests, signed with ``CONNECTORS_JWT_SECRET`` (HS256)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import jwt

from app.core.auth.claims import MAX_ORGANIZATION_ID_LENGTH, _valid_organization_id
from app.core.config import ConfigError, Settings


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
