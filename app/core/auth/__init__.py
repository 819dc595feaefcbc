"""Caller identity: a bearer JWT becomes a :class:`Principal`, or the request is refused with 401.

One job per module:

* :mod:`~app.core.auth.keys`: the configured verification key and the one algorithm pinned to it
  (a shared secret, a PEM public key, or the signing keys of a JWKS document).
* :mod:`~app.core.auth.jwks`: the JWKS document, fetched over https, cached and refetched sparingly.
* :mod:`~app.core.auth.claims`: the rules for the organization, subject, time and scope claims.
* :mod:`~app.core.auth.verifier`: :class:`TokenVerifier`, which turns a token into a
  :class:`Principal`.
* :mod:`~app.core.auth.minting`: :func:`mint_token`, HS256 caller tokens for development and tests.

Every refusal is :class:`~app.core.errors.Unauthenticated` with a short fixed detail; neither
details nor log lines contain the token or claim values. Log lines are written under this
package's name, ``app.core.auth``.
"""

from app.core.auth.claims import MAX_ORGANIZATION_ID_LENGTH, SCOPE_AUTHORIZE, SCOPE_READ, SCOPE_WRITE
from app.core.auth.jwks import (
    JWKS_CACHE_SECONDS,
    JWKS_REFETCH_INTERVAL_SECONDS,
    MAX_JWKS_BYTES,
    JwksUnavailable,
)
from app.core.auth.keys import MAX_KEY_ID_LENGTH, MIN_RSA_KEY_BITS, PublicKey
from app.core.auth.minting import mint_token
from app.core.auth.verifier import MAX_TOKEN_LENGTH, Principal, TokenVerifier

__all__ = [
    "JWKS_CACHE_SECONDS",
    "JWKS_REFETCH_INTERVAL_SECONDS",
    "MAX_JWKS_BYTES",
    "MAX_KEY_ID_LENGTH",
    "MAX_ORGANIZATION_ID_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MIN_RSA_KEY_BITS",
    "SCOPE_AUTHORIZE",
    "SCOPE_READ",
    "SCOPE_WRITE",
    "JwksUnavailable",
    "Principal",
    "PublicKey",
    "TokenVerifier",
    "mint_token",
]
