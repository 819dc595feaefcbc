"""The rules for a verified token's claims.

``exp`` is required and checked (as are ``nbf`` and ``iat`` when present) against the injected
clock with ``CONNECTORS_JWT_LEEWAY_SECONDS`` of leeway; ``iss`` must equal
``CONNECTORS_JWT_ISSUER``; ``aud`` (a string or a list) must contain ``CONNECTORS_JWT_AUDIENCE``;
the organization comes only from the claim named by ``CONNECTORS_JWT_ORG_CLAIM``. Scopes come from
``scope`` (a space-separated string, RFC 8693), or when it is absent from ``scp`` (a list or a
space-separated string, as some identity providers write it). ``sub`` is optional.

The scopes this service knows are ``SCOPE_READ``, ``SCOPE_WRITE`` and ``SCOPE_AUTHORIZE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from app.core.errors import Unauthenticated

SCOPE_READ = "connectors:read"
SCOPE_WRITE = "connectors:write"
SCOPE_AUTHORIZE = "connectors:authorize"

MAX_ORGANIZATION_ID_LENGTH = 128


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
