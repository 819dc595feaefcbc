"""Verification keys, each pinned to the one algorithm it may verify.

The signature algorithm is pinned by configuration, never taken from the token:

* ``CONNECTORS_JWT_SECRET``: HS256 with that shared secret, and nothing else.
* ``CONNECTORS_JWT_PUBLIC_KEY``: a PEM public key (the PEM text itself, with real or ``\\n``-escaped
  line breaks, or the path of a PEM file). RS256 when it is an RSA key (2048 bits or more), ES256
  when it is an EC P-256 key; only that one algorithm.
* ``CONNECTORS_JWKS_URL``: keys from a JWKS document fetched over https, selected by the token's
  ``kid``. Each key is used only with the algorithm its type implies (RSA: RS256, EC P-256: ES256);
  other key types, encryption keys and keys declaring another ``alg`` are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.core.config import ConfigError

MAX_KEY_ID_LENGTH = 256
MIN_RSA_KEY_BITS = 2048

_ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


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
