"""The browser half of the authorization code grant (RFC 6749 §4.1) with PKCE (RFC 7636).

What the provider's authorization URL carries, and the random values a consent needs: a ``state``
of 256 bits, which is the credential the callback is finished with, and a PKCE verifier whose
S256 challenge goes in the URL. The verifier stays with the service until the code exchange.

Extra authorization parameters (``access_type=offline``, ``prompt=consent``, ``audience``) never
replace one the flow sets itself (``RESERVED_AUTHORIZATION_PARAMS``), compared as token
parameters are (``app.tokens.oauth.token_param_key``).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from app.tokens.oauth import token_param_key

__all__ = [
    "RESERVED_AUTHORIZATION_PARAMS",
    "Pkce",
    "authorization_request_url",
    "new_state",
    "state_digest",
]

_UNRESERVED: Final = "-._~"
# Query parameters of the authorization request that extra parameters may not set.
RESERVED_AUTHORIZATION_PARAMS: Final = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "state",
        "code_challenge",
        "code_challenge_method",
        "scope",
    }
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """256 bits of randomness, URL-safe: the one credential of a consent's callback."""
    return secrets.token_urlsafe(32)


def state_digest(state: str) -> str:
    """What is stored of a state: its SHA-256, so the stored row cannot finish a consent."""
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Pkce:
    """A PKCE verifier (43 characters of 256 bits) and its S256 challenge (RFC 7636 §4.1-4.2)."""

    verifier: str = field(repr=False)

    @classmethod
    def new(cls) -> Pkce:
        return cls(_b64url(secrets.token_bytes(32)))

    @property
    def challenge(self) -> str:
        return _b64url(hashlib.sha256(self.verifier.encode("ascii")).digest())


def authorization_request_url(
    authorization_url: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str | None,
    state: str,
    code_challenge: str,
    extra: Mapping[str, str],
) -> str:
    """The provider's authorization URL with the request's parameters appended to its query
    (a query it already has is kept: RFC 6749 §3.1)."""
    parts = urlsplit(authorization_url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    taken = {token_param_key(name) for name, _ in params} | set(RESERVED_AUTHORIZATION_PARAMS)
    params += [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
    ]
    if scope:
        params.append(("scope", scope))
    params += [("state", state), ("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    for name, value in extra.items():
        key = token_param_key(name)
        if key not in taken:
            taken.add(key)
            params.append((name, value))
    # RFC 3986 unreserved characters stay, everything else is escaped (a space as %20).
    query = "&".join(
        f"{quote(name, safe=_UNRESERVED)}={quote(value, safe=_UNRESERVED)}" for name, value in params
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _pair(name: str, value: str) -> str:
    return f"{quote(name, safe=_UNRESERVED)}={quote(value, safe=_UNRESERVED)}"
