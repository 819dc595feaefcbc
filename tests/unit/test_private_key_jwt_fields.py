"""The rules of ``private_key_jwt`` fields, as a connector's ``auth`` is validated: each refusal
names its field and says what is wrong without a word of the key."""

from __future__ import annotations

import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import BaseModel, ValidationError

from app.connectors import schemas
from app.connectors.kinds import kind_for
from app.connectors.kinds.client_auth.private_key_jwt import KEY_ID_PATTERN
from app.core.validation import field_errors
from tests.tokens.test_private_key_jwt import EC_KEY, RSA_KEY, pem_body_lines, pem_of, private_numbers

Key = Any  # a private key of cryptography's, of any type


def encrypted(key: Key, form: serialization.PrivateFormat) -> str:
    encryption = serialization.BestAvailableEncryption(b"passphrase")
    return key.private_bytes(serialization.Encoding.PEM, form, encryption).decode("ascii")  # type: ignore[no-any-return]


def any_pem(key: Key) -> str:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


SMALL_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
P384_KEY = ec.generate_private_key(ec.SECP384R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode("ascii")
)


def body(grant: str = "client_credentials", **auth: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": "oauth2",
        "grant_type": grant,
        "client_id": "client-1",
        "token_url": "https://idp.example.com/oauth/token",
        "client_auth_method": "private_key_jwt",
        "private_key": pem_of(RSA_KEY),
        **auth,
    }
    if grant == "password":
        fields.update(username="svc-user", password="CANARY-pw")
    return {"name": "Signed", "resource_domain_url": "https://api.example.com", "auth": fields}


def accepted(**auth: Any) -> BaseModel:
    auth_model: BaseModel = schemas.ConnectorCreate.model_validate(body(**auth)).auth
    return auth_model


def refused(key_material: str | None = None, **auth: Any) -> list[dict[str, str]]:
    """The field errors of a refused ``auth``; none of them, nor the error's text, shows the key."""
    with pytest.raises(ValidationError) as raised:
        schemas.ConnectorCreate.model_validate(body(**auth))
    errors = field_errors(raised.value, rules=schemas.LOCATIONS)
    pem = key_material if key_material is not None else str(auth.get("private_key", ""))
    shown = repr(errors) + repr([error["msg"] for error in raised.value.errors()])
    if "-----BEGIN" in pem:
        # pydantic's own text shows a long input's first and last characters only: the PEM armour.
        shown += str(raised.value)
    assert not [line for line in pem_body_lines(pem) if len(line) > 8 and line in shown]
    return errors


@pytest.mark.parametrize(
    ("key", "traditional", "alg"),
    [
        (RSA_KEY, False, "RS256"),
        (RSA_KEY, True, "PS256"),
        (EC_KEY, False, "ES256"),
        (EC_KEY, True, "ES256"),
    ],
    ids=["rsa-pkcs8", "rsa-traditional", "ec-pkcs8", "ec-traditional"],
)
def test_unencrypted_rsa_and_p256_keys_in_either_pem_form_are_taken(
    key: Key, traditional: bool, alg: str
) -> None:
    auth = accepted(private_key=pem_of(key, traditional=traditional), signing_alg=alg, private_key_id="k-1")
    public, secrets = kind_for(auth).split(auth)
    assert list(secrets) == ["private_key"]
    assert public["signing_alg"] == alg and public["private_key_id"] == "k-1"
    jwk = public["public_jwk"]
    assert (jwk["alg"], jwk["use"], jwk["kid"]) == (alg, "sig", "k-1")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    shown = repr(public)
    assert not [number for number in private_numbers(key) if number in shown]


def test_signing_alg_defaults_to_rs256_and_the_password_grant_takes_the_method() -> None:
    auth = schemas.ConnectorCreate.model_validate(body("password")).auth
    assert getattr(auth, "signing_alg") == "RS256"  # noqa: B009
    assert getattr(auth, "grant_type") == "password"  # noqa: B009


@pytest.mark.parametrize(
    ("private_key", "reason"),
    [
        ("not a key at all", "is not a PEM private key"),
        (PUBLIC_PEM, "is not a PEM private key"),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
            "is not a PEM",
        ),
        (encrypted(RSA_KEY, serialization.PrivateFormat.PKCS8), "is encrypted"),
        (encrypted(RSA_KEY, serialization.PrivateFormat.TraditionalOpenSSL), "is encrypted"),
        (encrypted(EC_KEY, serialization.PrivateFormat.TraditionalOpenSSL), "is encrypted"),
        (any_pem(ED25519_KEY), "must be an RSA or EC P-256 key"),
        (any_pem(P384_KEY), "another curve than P-256"),
        (pem_of(SMALL_RSA_KEY), "RSA key of 1024 bits: at least 2048"),
        ("x" * (16 * 1024 + 1), "must be 1-16384 characters"),
        ("", "must be 1-16384 characters"),
    ],
    ids=[
        "text",
        "public-key",
        "broken-der",
        "encrypted-pkcs8",
        "encrypted-rsa",
        "encrypted-ec",
        "ed25519",
        "p384",
        "rsa-1024",
        "too-long",
        "empty",
    ],
)
def test_unusable_keys_are_refused_on_the_private_key_field(private_key: str, reason: str) -> None:
    errors = refused(private_key=private_key)
    assert [error["field"] for error in errors] == ["auth.private_key"]
    assert reason in errors[0]["reason"]


def test_rsa_keys_over_4096_bits_are_refused() -> None:
    # Checking such a key on save would take seconds of CPU, and signing with it each request more.
    big = any_pem(rsa.generate_private_key(public_exponent=65537, key_size=4160))
    errors = refused(private_key=big)
    assert errors == [
        {"field": "auth.private_key", "reason": "is an RSA key of 4160 bits: at most 4096 are allowed"}
    ]


@pytest.mark.parametrize(
    ("key", "alg", "reason"),
    [
        (EC_KEY, "RS256", "EC P-256 key, which signs with ES256, not RS256"),
        (EC_KEY, "PS256", "EC P-256 key, which signs with ES256, not PS256"),
        (RSA_KEY, "ES256", "RSA key, which signs with RS256 or PS256, not ES256"),
    ],
)
def test_a_key_that_does_not_fit_the_signing_alg_is_refused(key: Key, alg: str, reason: str) -> None:
    errors = refused(private_key=pem_of(key), signing_alg=alg)
    assert errors == [{"field": "auth.private_key", "reason": f"is an {reason} (signing_alg)"}]


def test_an_ec_key_with_the_default_alg_is_refused() -> None:
    errors = refused(private_key=pem_of(EC_KEY))
    assert [error["field"] for error in errors] == ["auth.private_key"]
    assert "not RS256" in errors[0]["reason"]


def test_an_unknown_signing_alg_is_refused_on_its_field() -> None:
    errors = refused(signing_alg="HS256", private_key=pem_of(RSA_KEY))
    assert [error["field"] for error in errors] == ["auth.signing_alg"]


@pytest.mark.parametrize("key_id", ["", "with space", "clé", "x" * 257, "tab\there"])
def test_key_ids_are_visible_ascii(key_id: str) -> None:
    errors = refused(private_key_id=key_id, private_key=pem_of(RSA_KEY))
    assert [error["field"] for error in errors] == ["auth.private_key_id"]
    assert not re.search(KEY_ID_PATTERN, key_id)


@pytest.mark.parametrize("key_id", ["k", "x" * 256, "!~", "2026-01/rsa:signing"])
def test_the_documented_key_id_pattern_takes_what_is_taken(key_id: str) -> None:
    assert re.search(KEY_ID_PATTERN, key_id)
    assert getattr(accepted(private_key_id=key_id), "private_key_id") == key_id  # noqa: B009


@pytest.mark.parametrize("audience", ["", "line\nbreak", "x" * 1025])
def test_assertion_audiences_are_bounded_text(audience: str) -> None:
    errors = refused(assertion_audience=audience, private_key=pem_of(RSA_KEY))
    assert [error["field"] for error in errors] == ["auth.assertion_audience"]


def test_a_client_secret_is_not_taken_and_a_key_is_required() -> None:
    errors = refused(client_secret="CANARY-secret", private_key=pem_of(RSA_KEY))
    assert errors == [{"field": "auth.*", "reason": "unknown field"}]
    without = body()
    del without["auth"]["private_key"]
    with pytest.raises(ValidationError) as raised:
        schemas.ConnectorCreate.model_validate(without)
    fields = [error["field"] for error in field_errors(raised.value, rules=schemas.LOCATIONS)]
    assert fields == ["auth.private_key"]


def test_a_public_jwk_is_not_taken_as_input() -> None:
    errors = refused(public_jwk={"kty": "RSA"}, private_key=pem_of(RSA_KEY))
    assert errors == [{"field": "auth.*", "reason": "unknown field"}]
