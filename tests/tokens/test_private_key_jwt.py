"""``private_key_jwt`` token requests against Authlib's RFC 7523 client authentication over TLS.

Authlib verifies each assertion (signature with the registered public key, ``iss`` = ``sub``,
``aud``, ``exp``, a ``jti`` it has not seen); the tests read what it received.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import KeyParameters, import_key
from pydantic import SecretStr

from app.connectors.kinds.client_auth import method_of
from app.connectors.kinds.client_auth.private_key_jwt import CLIENT_ASSERTION_TYPE, PrivateKeyJWT
from app.core.errors import AppError, CredentialsRejected
from app.core.outbound import OutboundClient
from app.tokens.oauth import OAuth2TokenClient
from app.tokens.types import OAuth2Config
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def pem_of(key: PrivateKey, *, traditional: bool = False) -> str:
    """``key`` as unencrypted PEM, PKCS#8 unless ``traditional``."""
    form = (
        serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode("ascii")


def provider_jwk(pem: str, alg: str, kid: str | None = None) -> dict[str, Any]:
    """The public JWK a provider registers, derived by joserfc (not by the service's code)."""
    parameters: KeyParameters = {"alg": alg, "use": "sig"}
    if kid is not None:
        parameters["kid"] = kid
    key = import_key(pem.encode(), "EC" if alg == "ES256" else "RSA", parameters=parameters)
    jwk: dict[str, Any] = key.as_dict(private=False)
    return jwk


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM: none of them may ever be shown or logged."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def private_numbers(key: PrivateKey) -> list[str]:
    """The private numbers of ``key``, as decimal and as JWK (base64url) text."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        values = [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp]
    else:
        values = [key.private_numbers().private_value]
    encoded = [
        base64.urlsafe_b64encode(v.to_bytes((v.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
        for v in values
    ]
    return [str(v) for v in values] + encoded


def unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JWS header and claims of an assertion as received."""
    header: dict[str, Any] = jwt.get_unverified_header(assertion)
    claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
    return header, claims


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS: dict[str, PrivateKey] = {"RS256": RSA_KEY, "PS256": RSA_KEY, "ES256": EC_KEY}
CLIENT_ID = "pk client"


@pytest.fixture
def fetch(outbound: OutboundClient) -> OAuth2TokenClient:
    return OAuth2TokenClient(outbound, default_token_lifetime_seconds=900)


@pytest.fixture
def clock() -> FakeTime:
    """The assertions' clock, at the provider's present (Authlib checks ``exp`` on its own clock)."""
    return FakeTime(start=datetime.now(UTC).replace(microsecond=0))


def register(
    server: AuthorizationServerThread, alg: str, kid: str | None = None, client_id: str = CLIENT_ID
) -> RegisteredClient:
    jwk = provider_jwk(pem_of(KEYS[alg]), alg, kid)
    client = RegisteredClient(client_id, "", auth_method="private_key_jwt", public_jwk=jwk)
    server.add_clients([client])
    return client


def config(
    token_url: str,
    key: PrivateKey = RSA_KEY,
    clock: FakeTime | None = None,
    **options: Any,
) -> OAuth2Config:
    auth = PrivateKeyJWT(SecretStr(pem_of(key)), clock=clock, **options)
    return OAuth2Config(
        grant_type="client_credentials",
        token_url=token_url,
        client_id=CLIENT_ID,
        client_auth=auth,
        scope="read",
    )


def error_text(error: BaseException) -> str:
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        if isinstance(current, AppError):
            parts += [current.detail, repr(current.extra)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
async def test_each_algorithm_authenticates_with_claims_as_rfc_7523_asks(
    fetch: OAuth2TokenClient, auth_server: AuthorizationServerThread, clock: FakeTime, alg: str
) -> None:
    register(auth_server, alg, kid="key-2026")

    grant = await fetch(config(auth_server.token_url, KEYS[alg], clock, signing_alg=alg, key_id="key-2026"))

    issued = auth_server.store.find_access_token(grant.access_token)
    assert issued is not None and issued.client_id == CLIENT_ID
    [assertion] = auth_server.store.assertions
    header, claims = unverified(assertion)
    assert header["alg"] == alg
    assert header["kid"] == "key-2026"
    now = int(clock.now().timestamp())
    assert claims == {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": auth_server.token_url,
        "jti": claims["jti"],
        "iat": now,
        "nbf": now,
        "exp": now + 60,
    }
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) == 16


async def test_the_form_carries_the_assertion_and_the_client_id_and_no_secret(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(Reply.json({"access_token": "at-1", "token_type": "Bearer", "expires_in": 60}))

    await fetch(config(scripted_server.url("/oauth/token")))

    [request] = scripted_server.requests
    form = request.form()
    assert "authorization" not in request.headers
    assert set(form) == {"grant_type", "scope", "client_id", "client_assertion_type", "client_assertion"}
    assert form["client_id"] == CLIENT_ID
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    header, _ = unverified(form["client_assertion"])
    assert header["alg"] == "RS256" and "kid" not in header


async def test_every_request_refreshes_included_carries_a_fresh_assertion(
    fetch: OAuth2TokenClient, auth_server: AuthorizationServerThread, clock: FakeTime
) -> None:
    register(auth_server, "RS256")
    auth_server.store.add_user("svc-user", "user pass&1")
    password = replace(
        config(auth_server.token_url, clock=clock),
        grant_type="password",
        username="svc-user",
        password=SecretStr("user pass&1"),
    )

    first = await fetch(password)
    assert first.refresh_token is not None
    refreshed = await fetch(password, refresh_token=first.refresh_token)
    again = await fetch(password)

    assert len({first.access_token, refreshed.access_token, again.access_token}) == 3
    # Authlib refuses a jti it has seen: three requests passed with three assertions.
    jtis = [unverified(assertion)[1]["jti"] for assertion in auth_server.store.assertions]
    assert len(jtis) == 3 and len(set(jtis)) == 3


async def test_a_key_the_provider_does_not_have_is_rejected(
    fetch: OAuth2TokenClient, auth_server: AuthorizationServerThread, clock: FakeTime
) -> None:
    register(auth_server, "RS256")

    with pytest.raises(CredentialsRejected) as raised:
        await fetch(config(auth_server.token_url, OTHER_RSA_KEY, clock))

    assert raised.value.extra.get("provider_error") == "invalid_client"
    text = error_text(raised.value)
    assert not [line for line in pem_body_lines(pem_of(OTHER_RSA_KEY)) if line in text]


async def test_an_assertion_out_of_its_time_is_rejected(
    fetch: OAuth2TokenClient, auth_server: AuthorizationServerThread, clock: FakeTime
) -> None:
    register(auth_server, "RS256")
    late = FakeTime(start=clock.now().replace(year=clock.now().year - 1))

    with pytest.raises(CredentialsRejected):
        await fetch(config(auth_server.token_url, RSA_KEY, late))


async def test_the_assertion_audience_replaces_the_token_url(
    fetch: OAuth2TokenClient, auth_server: AuthorizationServerThread, clock: FakeTime
) -> None:
    register(auth_server, "ES256")
    auth_server.store.assertion_audiences = [auth_server.issuer]

    with pytest.raises(CredentialsRejected):
        await fetch(config(auth_server.token_url, EC_KEY, clock, signing_alg="ES256"))
    grant = await fetch(
        config(auth_server.token_url, EC_KEY, clock, signing_alg="ES256", audience=auth_server.issuer)
    )

    assert auth_server.store.find_access_token(grant.access_token) is not None
    audiences = [unverified(assertion)[1]["aud"] for assertion in auth_server.store.assertions]
    assert audiences == [auth_server.token_url, auth_server.issuer]


def test_the_method_builds_from_stored_fields() -> None:
    auth = method_of("private_key_jwt").build(
        {"signing_alg": "PS256", "private_key_id": "k9", "assertion_audience": "https://idp.example"},
        {"private_key": SecretStr(pem_of(RSA_KEY, traditional=True))},
    )
    assert auth.method == "private_key_jwt" and auth.certificate is None
    form: dict[str, str] = {}
    auth.apply(client_id="c1", token_url="https://idp.example/token", form=form, headers={})
    header, claims = unverified(form["client_assertion"])
    assert (header["alg"], header["kid"], claims["aud"], claims["iss"]) == (
        "PS256",
        "k9",
        "https://idp.example",
        "c1",
    )


def test_the_key_is_in_no_repr_or_error() -> None:
    pem = pem_of(RSA_KEY)
    auth = PrivateKeyJWT(SecretStr(pem), key_id="k1")
    shown = repr(auth) + str(auth)
    assert not [line for line in pem_body_lines(pem) if line in shown]
    assert not [number for number in private_numbers(RSA_KEY) if number in shown]
    assert not hasattr(auth, "__dict__")

    lines = pem.splitlines()
    broken = "\n".join(lines[:5] + lines[-1:])  # the DER cut short
    with pytest.raises(ValueError, match="PEM private key") as raised:
        PrivateKeyJWT(SecretStr(broken))
    assert not [line for line in pem_body_lines(broken) if line in error_text(raised.value)]
    with pytest.raises(ValueError, match="ES256"):
        PrivateKeyJWT(SecretStr(pem), signing_alg="ES256")


async def test_a_retried_request_carries_a_new_assertion(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    # A provider that saw the first assertion may refuse its jti a second time.
    scripted_server.queue(
        Reply.json({"error": "temporarily_unavailable"}, status=503),
        Reply.json({"access_token": "at-1", "token_type": "Bearer", "expires_in": 60}),
    )

    grant = await fetch(config(scripted_server.url("/oauth/token")))

    assert grant.access_token == "at-1"
    first, second = (
        unverified(request.form()["client_assertion"])[1] for request in scripted_server.requests
    )
    assert first["jti"] != second["jti"]
