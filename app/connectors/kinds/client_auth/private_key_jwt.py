"""``private_key_jwt``: the client proves itself with a JWT signed by its private key (RFC 7523
§2.2, OpenID Connect Core §9). The provider holds the public key; the private key never leaves
the service.

The choices, and why:

* **A fresh assertion for every token request**, refreshes included: ``iss`` and ``sub`` are the
  client id, ``aud`` the token URL (or ``assertion_audience``: some providers want their issuer),
  ``jti`` 128 random bits, ``iat`` and ``nbf`` now and ``exp`` a minute later on an injected
  clock. Providers refuse a ``jti`` they have seen, so an assertion is never reused.
* **Keys: RSA of 2048 to 4096 bits (RS256, PS256) or EC P-256 (ES256)**, unencrypted PEM
  (PKCS#8 or traditional). Smaller RSA keys are too weak; larger ones make every check of the
  key cost seconds of CPU, on the request path.
* **A key is checked in full once, when it is saved.** The field's validator loads it without
  checking the RSA numbers (microseconds, on the event loop: type, size, curve, fit with
  ``signing_alg``); the full check, a quarter of a second of CPU for 4096 bits, runs in a worker
  process once the save has passed everything cheaper (``private_key_fields``,
  ``app.core.keychecks``). What is stored was checked and is sealed with authenticated
  encryption, so a token request loads it without that check (``_load``).
* **The public key is a derived value** (``public_jwk``), computed on save and shown in reads,
  ready to register at the provider. No error, repr or log line carries the private key: errors
  say what is wrong in fixed words, and the signing key is held in a slot no repr shows.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Annotated, Any, Final, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from typing_extensions import TypeAliasType

from app.connectors.fields import Strict, no_control, utf8
from app.connectors.kinds.client_auth.base import ClientAuthMethod
from app.connectors.kinds.example import BodyExample
from app.core import patterns
from app.core.clock import Clock, SystemClock

__all__ = [
    "ASSERTION_LIFETIME_SECONDS",
    "CLIENT_ASSERTION_TYPE",
    "MAX_PEM_CHARACTERS",
    "METHOD",
    "PEMSecret",
    "PrivateKeyJWT",
    "PrivateKeyJWTFields",
    "PrivateKeyJWTOut",
    "public_jwk",
]

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_SECONDS: Final = 60
MAX_PEM_CHARACTERS: Final = 16 * 1024
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 4096

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_RSA_ALGS: Final = ("RS256", "PS256")
_EC_ALGS: Final = ("ES256",)

# A key id: visible ASCII, as it goes into a JWS header and is compared byte for byte.
_KEY_ID: Final = re.compile(r"[\x21-\x7e]{1,256}")
KEY_ID_PATTERN: Final = "^[\\x21-\\x7e]{1,256}$"
# PKCS#8 and traditional (OpenSSL) encryption, told apart from a key that is merely unreadable.
_ENCRYPTED: Final = re.compile(rb"^(?:-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED)", re.M)
_ENCRYPTED_REASON: Final = "is encrypted: send it unencrypted (the service stores it encrypted)"


class _KeyRefused(ValueError):
    """Why a private key is refused, in fixed words: never the key, never the library's text."""


# Field types ----------------------------------------------------------------------------------


def _pem_secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not 1 <= len(raw) <= MAX_PEM_CHARACTERS:
        raise ValueError(f"must be 1-{MAX_PEM_CHARACTERS} characters")
    if "\x00" in raw or not utf8(raw):
        raise ValueError("may not contain NUL or unpaired surrogates")
    return value


def _key_id(value: str) -> str:
    if not _KEY_ID.fullmatch(value):
        raise ValueError("must be 1-256 visible ASCII characters")
    return value


PEMSecret = Annotated[
    SecretStr,
    AfterValidator(_pem_secret),
    Field(
        description=(
            "Write-only: never shown again; reads say `has_...: true` instead. An unencrypted PEM "
            "private key (PKCS#8 `BEGIN PRIVATE KEY`, or `BEGIN RSA PRIVATE KEY` / `BEGIN EC PRIVATE "
            "KEY`): RSA of 2048-4096 bits or EC P-256"
        ),
        json_schema_extra={"writeOnly": True, "minLength": 1, "maxLength": MAX_PEM_CHARACTERS},
    ),
]
KeyId = Annotated[
    str,
    AfterValidator(_key_id),
    Field(
        description=(
            "The `kid` put in each assertion's JWS header and in `public_jwk`: 1-256 visible ASCII characters"
        ),
        json_schema_extra={"pattern": KEY_ID_PATTERN, "minLength": 1, "maxLength": 256},
    ),
]
AssertionAudience = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(no_control),
    Field(
        description=(
            "The assertion's `aud`, when the provider wants another value than the token URL (its issuer URL)"
        ),
        json_schema_extra={"pattern": patterns.NO_CONTROL},
    ),
]
SigningAlg = TypeAliasType("SigningAlg", Literal["RS256", "PS256", "ES256"])
PublicJWK = TypeAliasType(
    "PublicJWK",
    Annotated[
        dict[str, str],
        Field(
            description=(
                "The public key as a JWK (RFC 7517) to register at the provider: `kty`, `n` and `e` or "
                "`crv`, `x` and `y`, `alg`, `use` (`sig`) and `kid` when `private_key_id` is set"
            )
        ),
    ],
)


# The key ----------------------------------------------------------------------------------------


def _load(pem: str) -> SigningKey:
    """The key of ``pem``, its type, size and curve judged, without the (slow) check of an RSA
    key's numbers: a new key gets that check in a worker process (``app.core.keychecks``), and a
    stored one had it when it was saved."""
    try:
        data = pem.encode("ascii")
    except UnicodeEncodeError:
        raise _KeyRefused("is not a PEM private key") from None
    if b"-----BEGIN " not in data:
        raise _KeyRefused("is not a PEM private key")
    if _ENCRYPTED.search(data):
        raise _KeyRefused(_ENCRYPTED_REASON)
    try:
        key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise _KeyRefused(_ENCRYPTED_REASON) from None
    except (ValueError, UnsupportedAlgorithm):
        raise _KeyRefused("is not a PEM private key (PKCS#8 or traditional)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise _KeyRefused(f"is an RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} are needed")
        if key.key_size > MAX_RSA_BITS:
            raise _KeyRefused(f"is an RSA key of {key.key_size} bits: at most {MAX_RSA_BITS} are allowed")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise _KeyRefused("is an EC key on another curve than P-256")
        return key
    raise _KeyRefused("must be an RSA or EC P-256 key")


def _fits(key: SigningKey, alg: str) -> str | None:
    """Why ``key`` cannot sign with ``alg``, or None."""
    if isinstance(key, rsa.RSAPrivateKey) and alg not in _RSA_ALGS:
        return f"is an RSA key, which signs with RS256 or PS256, not {alg} (signing_alg)"
    if isinstance(key, ec.EllipticCurvePrivateKey) and alg not in _EC_ALGS:
        return f"is an EC P-256 key, which signs with ES256, not {alg} (signing_alg)"
    return None


def _b64url_uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


def public_jwk(key: SigningKey, alg: str, key_id: str | None = None) -> dict[str, str]:
    """The public half of ``key`` as a JWK (RFC 7517, RFC 7518 §6): public members only."""
    jwk: dict[str, str]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    else:
        point = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64url_uint(point.x, 32), "y": _b64url_uint(point.y, 32)}
    jwk.update(alg=alg, use="sig")
    if key_id is not None:
        jwk["kid"] = key_id
    return jwk


# Models -----------------------------------------------------------------------------------------


class PrivateKeyJWTFields(Strict):
    # signing_alg comes first: the key's check reads it (a field validator sees earlier fields).
    signing_alg: SigningAlg = Field(
        default="RS256",
        description="How assertions are signed: RS256 and PS256 need an RSA key, ES256 an EC P-256 key",
    )
    private_key: PEMSecret
    private_key_id: KeyId | None = None
    assertion_audience: AssertionAudience | None = None

    @field_validator("private_key")
    @classmethod
    def _usable_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # The RSA numbers are checked later, off the event loop (``private_key_fields``).
        key = _load(value.get_secret_value())
        alg = info.data.get("signing_alg")
        if isinstance(alg, str):
            misfit = _fits(key, alg)
            if misfit is not None:
                raise ValueError(misfit)
        return value


class PrivateKeyJWTOut(BaseModel):
    has_private_key: bool
    public_jwk: PublicJWK
    private_key_id: str | None = None
    signing_alg: SigningAlg
    assertion_audience: str | None = None


# The client authentication ----------------------------------------------------------------------


class PrivateKeyJWT:
    """Adds a fresh signed assertion to each token request. The key is loaded once, here."""

    __slots__ = ("_audience", "_clock", "_key", "_key_id", "_lifetime", "signing_alg")

    method = "private_key_jwt"
    certificate = None

    def __init__(
        self,
        private_key: SecretStr,
        *,
        signing_alg: str = "RS256",
        key_id: str | None = None,
        audience: str | None = None,
        clock: Clock | None = None,
        lifetime_seconds: int = ASSERTION_LIFETIME_SECONDS,
    ) -> None:
        """``private_key``: a PEM key that passed ``PrivateKeyJWTFields`` (stored keys have)."""
        try:
            key = _load(private_key.get_secret_value())
        except _KeyRefused as refused:
            raise ValueError(f"the private key {refused}") from None
        misfit = _fits(key, signing_alg)
        if misfit is not None:
            raise ValueError(f"the private key {misfit}")
        self._key = key
        self.signing_alg = signing_alg
        self._key_id = key_id
        self._audience = audience
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._lifetime = lifetime_seconds

    def __repr__(self) -> str:
        return f"PrivateKeyJWT(signing_alg={self.signing_alg!r}, key_id={self._key_id!r})"

    def assertion(self, client_id: str, token_url: str) -> str:
        """A new client assertion (RFC 7523 §3) for one token request."""
        issued_at = int(self._clock.now().timestamp())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": self._audience or token_url,
            "jti": secrets.token_urlsafe(16),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self._lifetime,
        }
        headers = {"kid": self._key_id} if self._key_id is not None else None
        return jwt.encode(claims, self._key, algorithm=self.signing_alg, headers=headers)

    def apply(
        self,
        *,
        client_id: str,
        token_url: str,
        form: MutableMapping[str, str],
        headers: MutableMapping[str, str],
    ) -> None:
        form["client_id"] = client_id
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = self.assertion(client_id, token_url)


# Key material made for the example only.
_EXAMPLE_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgayxt1H8Pt0ZiKxF2\n"
    "sVEmZqysjaCmKIE2+0ZiBl7JNXuhRANCAAR/3jGSp42jGs4VT0W7x3g0j2iSEbVO\n"
    "uZYsz8veg9EQKQRkIDs9Kg1LZT5oIqrJ72aMyUi3i8WGNZceBRMCmtIc\n"
    "-----END PRIVATE KEY-----\n"
)


class _Method(ClientAuthMethod):
    name = "private_key_jwt"
    fields = PrivateKeyJWTFields
    out_fields = PrivateKeyJWTOut
    schema_suffix = "PrivateKeyJWT"
    example = BodyExample(
        "oauth2PrivateKeyJWT",
        "OAuth 2.0, the client signing an assertion with its private key (private_key_jwt)",
        {
            "name": "Billing",
            "resource_domain_url": "https://billing.example.com",
            "auth": {
                "type": "oauth2",
                "grant_type": "client_credentials",
                "client_id": "abc",
                "token_url": "https://idp.example.com/oauth/token",
                "scope": "read",
                "client_auth_method": "private_key_jwt",
                "private_key": _EXAMPLE_KEY,
                "signing_alg": "ES256",
                "private_key_id": "billing-2026",
            },
        },
    )
    private_key_fields = ("private_key",)

    def build(self, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> PrivateKeyJWT:
        return PrivateKeyJWT(
            secrets["private_key"],
            signing_alg=public.get("signing_alg") or "RS256",
            key_id=public.get("private_key_id"),
            audience=public.get("assertion_audience"),
        )

    def facts(self, auth: BaseModel) -> dict[str, Any]:
        private_key: SecretStr = getattr(auth, "private_key")  # noqa: B009
        signing_alg: str = getattr(auth, "signing_alg")  # noqa: B009
        key = _load(private_key.get_secret_value())
        return {"public_jwk": public_jwk(key, signing_alg, getattr(auth, "private_key_id"))}  # noqa: B009


METHOD = _Method()
