from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.core.auth import (
    JWKS_CACHE_SECONDS,
    JWKS_REFETCH_INTERVAL_SECONDS,
    SCOPE_AUTHORIZE,
    SCOPE_READ,
    SCOPE_WRITE,
    Principal,
    TokenVerifier,
    mint_token,
)
from app.core.config import ConfigError, Settings
from app.core.errors import Unauthenticated

SECRET = "test-secret-long-enough-even-for-hs512-" + "0123456789abcdef" * 2
ISSUER = "https://idp.test/"
AUDIENCE = "connectors-api"
ORG = "org-42"


class FakeClock:
    def __init__(self) -> None:
        self.wall = datetime.now(UTC)
        self.mono = 1_000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


def hs_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "jwt_leeway_seconds": 30,
    }
    return Settings(**{**values, **overrides})


def key_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwt_leeway_seconds": 30}
    return Settings(**{**values, **overrides})


def claims(clock: FakeClock | None = None, **overrides: Any) -> dict[str, Any]:
    now = int((clock.now() if clock else datetime.now(UTC)).timestamp())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "org_id": ORG,
        "scope": f"{SCOPE_READ} {SCOPE_WRITE}",
        "iat": now,
        "exp": now + 600,
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def handmade_token(header: Mapping[str, Any], payload: Mapping[str, Any], sign: bytes | None) -> str:
    """A token built by hand, for headers and keys PyJWT refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = (
        "" if sign is None else b64url(hmac.new(sign, signing_input.encode(), hashlib.sha256).digest())
    )
    return f"{signing_input}.{signature}"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, **extra}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def hs_verifier(clock: FakeClock) -> AsyncIterator[TokenVerifier]:
    verifier = TokenVerifier(hs_settings(), clock=clock)
    yield verifier
    await verifier.aclose()


async def refused(verifier: TokenVerifier, token: str) -> str:
    """Verify ``token`` expecting a refusal; return the detail after checking it leaks nothing."""
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    detail = caught.value.detail
    assert caught.value.http_status == 401
    assert token not in detail
    assert ORG not in detail
    assert len(detail) < 60
    return detail


# HS256 and claims ---------------------------------------------------------------------------------


async def test_minted_token_verifies(hs_verifier: TokenVerifier) -> None:
    token = mint_token(hs_settings(), organization_id=ORG, scopes=[SCOPE_READ, SCOPE_AUTHORIZE, SCOPE_READ])
    principal = await hs_verifier.verify(token)
    assert principal == Principal(
        organization_id=ORG, subject="dev", scopes=frozenset({SCOPE_READ, SCOPE_AUTHORIZE})
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def test_hs256_happy_path_with_audience_list(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(clock, aud=["other", AUDIENCE]), SECRET, algorithm="HS256")
    principal = await hs_verifier.verify(token)
    assert principal.organization_id == ORG
    assert principal.subject == "user-1"
    assert principal.scopes == {SCOPE_READ, SCOPE_WRITE}


async def test_expired_token_is_refused_after_the_leeway(
    clock: FakeClock, hs_verifier: TokenVerifier
) -> None:
    token = jwt.encode(claims(clock, exp=int(clock.now().timestamp()) + 60), SECRET, algorithm="HS256")
    clock.advance(60 + 29)
    await hs_verifier.verify(token)
    clock.advance(2)
    assert await refused(hs_verifier, token) == "token expired"


async def test_minted_token_expires_after_its_ttl(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    token = mint_token(hs_settings(), organization_id=ORG, scopes=[SCOPE_READ], ttl_seconds=120)
    clock.advance(100)
    await hs_verifier.verify(token)
    clock.advance(60)
    assert await refused(hs_verifier, token) == "token expired"


async def test_token_from_the_future_is_refused(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    now = int(clock.now().timestamp())
    for early in (claims(clock, nbf=now + 120), claims(clock, iat=now + 120)):
        token = jwt.encode(early, SECRET, algorithm="HS256")
        assert await refused(hs_verifier, token) == "token not yet valid"
    clock.advance(100)
    await hs_verifier.verify(token)


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"iss": "https://evil.test/"}, "token issuer not accepted"),
        ({"aud": "someone-else"}, "token audience not accepted"),
        ({"aud": ["a", "b"]}, "token audience not accepted"),
        ({"iss": None}, "invalid token"),
        ({"aud": None}, "invalid token"),
        ({"exp": None}, "invalid token"),
        ({"exp": "9999999999"}, "invalid token"),
        ({"exp": True}, "invalid token"),
        ({"nbf": "0"}, "invalid token"),
        ({"sub": 7}, "invalid token"),
        ({"scope": ["connectors:read"]}, "invalid token"),
        ({"org_id": None}, "token has no valid organization claim"),
        ({"org_id": ""}, "token has no valid organization claim"),
        ({"org_id": 42}, "token has no valid organization claim"),
        ({"org_id": ["org-42"]}, "token has no valid organization claim"),
        ({"org_id": " org-42"}, "token has no valid organization claim"),
        ({"org_id": "org\n42"}, "token has no valid organization claim"),
        ({"org_id": "o" * 129}, "token has no valid organization claim"),
    ],
)
async def test_bad_claims_are_refused(
    clock: FakeClock, hs_verifier: TokenVerifier, overrides: dict[str, Any], detail: str
) -> None:
    token = jwt.encode(claims(clock, **overrides), SECRET, algorithm="HS256")
    assert await refused(hs_verifier, token) == detail


async def test_organization_claim_name_is_configurable(clock: FakeClock) -> None:
    verifier = TokenVerifier(hs_settings(jwt_org_claim="https://example.com/org"), clock=clock)
    token = jwt.encode(claims(clock, org_id=None, **{"https://example.com/org": "org-7"}), SECRET)
    assert (await verifier.verify(token)).organization_id == "org-7"
    assert (
        await refused(verifier, jwt.encode(claims(clock), SECRET)) == "token has no valid organization claim"
    )


async def test_scopes_from_scp_and_absent_scopes(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    as_list = jwt.encode(claims(clock, scope=None, scp=[SCOPE_READ, SCOPE_AUTHORIZE]), SECRET)
    assert (await hs_verifier.verify(as_list)).scopes == {SCOPE_READ, SCOPE_AUTHORIZE}
    as_text = jwt.encode(claims(clock, scope=None, scp=SCOPE_WRITE), SECRET)
    assert (await hs_verifier.verify(as_text)).scopes == {SCOPE_WRITE}
    # ``scope`` wins when both are present.
    both = jwt.encode(claims(clock, scope=SCOPE_READ, scp=[SCOPE_WRITE]), SECRET)
    assert (await hs_verifier.verify(both)).scopes == {SCOPE_READ}
    none = jwt.encode(claims(clock, scope=None, sub=None), SECRET)
    principal = await hs_verifier.verify(none)
    assert principal.scopes == frozenset()
    assert principal.subject is None


async def test_wrong_secret_is_refused(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(clock), SECRET + "-other", algorithm="HS256")
    assert await refused(hs_verifier, token) == "invalid token"


async def test_other_algorithms_are_refused_under_a_secret(
    clock: FakeClock, hs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    none = handmade_token({"alg": "none", "typ": "JWT"}, claims(clock), sign=None)
    hs512 = jwt.encode(claims(clock), SECRET, algorithm="HS512")
    rs256 = jwt.encode(claims(clock), rsa_key, algorithm="RS256")
    for token in (none, hs512, rs256):
        assert await refused(hs_verifier, token) == "invalid token"


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "..", "x" * 9000],
)
async def test_malformed_tokens_are_refused(hs_verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated, match=r"^invalid token$"):
        await hs_verifier.verify(token)


async def test_tampered_payload_is_refused(clock: FakeClock, hs_verifier: TokenVerifier) -> None:
    header, _, signature = jwt.encode(claims(clock), SECRET).split(".")
    forged_payload = b64url(json.dumps(claims(clock, org_id="org-other")).encode())
    assert await refused(hs_verifier, f"{header}.{forged_payload}.{signature}") == "invalid token"


# Public keys --------------------------------------------------------------------------------------


async def test_rs256_with_a_pem_public_key(clock: FakeClock, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(key_settings(jwt_public_key=pem(rsa_key)), clock=clock)
    principal = await verifier.verify(jwt.encode(claims(clock), rsa_key, algorithm="RS256"))
    assert principal.organization_id == ORG
    # Another RSA key, or another algorithm with the same key, is refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await refused(verifier, jwt.encode(claims(clock), other, algorithm="RS256")) == "invalid token"
    assert await refused(verifier, jwt.encode(claims(clock), rsa_key, algorithm="RS512")) == "invalid token"
    assert await refused(verifier, jwt.encode(claims(clock), rsa_key, algorithm="PS256")) == "invalid token"


async def test_es256_with_a_pem_public_key(
    clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(key_settings(jwt_public_key=pem(ec_key)), clock=clock)
    assert (
        await verifier.verify(jwt.encode(claims(clock), ec_key, algorithm="ES256"))
    ).organization_id == ORG
    assert await refused(verifier, jwt.encode(claims(clock), rsa_key, algorithm="RS256")) == "invalid token"


async def test_hs256_signed_with_the_public_key_pem_is_refused(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for private_key in (rsa_key, ec_key):
        public_pem = pem(private_key)
        verifier = TokenVerifier(key_settings(jwt_public_key=public_pem), clock=clock)
        for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "none"}):
            token = handmade_token(header, claims(clock), sign=public_pem.encode())
            assert await refused(verifier, token) == "invalid token"


async def test_public_key_from_a_file_or_with_escaped_newlines(
    clock: FakeClock, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(clock), ec_key, algorithm="ES256")
    path = tmp_path / "caller-key.pem"
    path.write_text(pem(ec_key))
    for configured in (str(path), pem(ec_key).replace("\n", "\\n")):
        verifier = TokenVerifier(key_settings(jwt_public_key=configured), clock=clock)
        assert (await verifier.verify(token)).organization_id == ORG


@pytest.mark.parametrize(
    ("make_value", "message"),
    [
        (lambda tmp: "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", "not a PEM public key"),
        (lambda tmp: str(tmp / "missing.pem"), "neither PEM text nor"),
        (
            lambda tmp: pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505 (refusal under test)
            "at least 2048 bits",
        ),
        (lambda tmp: pem(ec.generate_private_key(ec.SECP384R1())), "EC P-256"),
    ],
    ids=["garbage", "missing-file", "small-rsa", "p384"],
)
def test_unusable_public_key_is_a_config_error(make_value: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        TokenVerifier(key_settings(jwt_public_key=make_value(tmp_path)))
    assert str(caught.value).startswith("CONNECTORS_JWT_PUBLIC_KEY: ")


def test_no_key_configured_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(key_settings())


# Helpers around the verifier ----------------------------------------------------------------------


def test_mint_token_needs_a_secret_and_sane_input(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="CONNECTORS_JWT_SECRET"):
        mint_token(key_settings(jwt_public_key=pem(rsa_key)), organization_id=ORG, scopes=[SCOPE_READ])
    with pytest.raises(ValueError, match="scope"):
        mint_token(hs_settings(), organization_id=ORG, scopes=["connectors:read connectors:write"])
    with pytest.raises(ValueError, match="organization"):
        mint_token(hs_settings(), organization_id="", scopes=[SCOPE_READ])
    with pytest.raises(ValueError, match="ttl"):
        mint_token(hs_settings(), organization_id=ORG, scopes=[SCOPE_READ], ttl_seconds=0)


def test_minted_claims() -> None:
    token = mint_token(
        hs_settings(jwt_org_claim="tenant"), organization_id=ORG, scopes=[SCOPE_WRITE, SCOPE_READ]
    )
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["tenant"] == ORG
    assert payload["scope"] == f"{SCOPE_READ} {SCOPE_WRITE}"
    assert (payload["iss"], payload["aud"], payload["sub"]) == (ISSUER, AUDIENCE, "dev")
    assert payload["exp"] - payload["iat"] == 3600


# JWKS over HTTPS ----------------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 with a trustme certificate; counts the requests it gets."""

    def __init__(self, ca: trustme.CA) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.raw: bytes | None = None
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    body = server.raw if server.raw is not None else json.dumps(server.document).encode()
                    status, delay = server.status, server.delay
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._httpd.server_address[1]}/.well-known/jwks.json"

    def serve(self, *keys: dict[str, Any]) -> None:
        with self._lock:
            self.document = {"keys": list(keys)}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def jwks_server(ca: trustme.CA) -> Iterator[JwksServer]:
    server = JwksServer(ca)
    yield server
    server.close()


@pytest.fixture
async def jwks_verifier(
    jwks_server: JwksServer, trusting_context: ssl.SSLContext, clock: FakeClock
) -> AsyncIterator[TokenVerifier]:
    verifier = TokenVerifier(
        key_settings(jwks_url=jwks_server.url), ssl_context=trusting_context, clock=clock
    )
    yield verifier
    await verifier.aclose()


def signed(clock: FakeClock, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> str:
    algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims(clock), key, algorithm=algorithm, headers={"kid": kid})


async def test_jwks_rs256_and_es256_keys_by_kid(
    clock: FakeClock,
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1", use="sig", alg="ES256"))
    assert (await jwks_verifier.verify(signed(clock, rsa_key, "rsa-1"))).organization_id == ORG
    assert (await jwks_verifier.verify(signed(clock, ec_key, "ec-1"))).organization_id == ORG
    # A key is used only with the algorithm of its type, and only under its own kid.
    assert await refused(jwks_verifier, signed(clock, rsa_key, "ec-1")) == "invalid token"
    ps256 = jwt.encode(claims(clock), rsa_key, algorithm="PS256", headers={"kid": "rsa-1"})
    assert await refused(jwks_verifier, ps256) == "invalid token"
    no_kid = jwt.encode(claims(clock), rsa_key, algorithm="RS256")
    assert await refused(jwks_verifier, no_kid) == "invalid token"
    assert jwks_server.requests == 1


async def test_jwks_ignores_keys_it_must_not_use(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    public_pem = pem(rsa_key).encode()
    jwks_server.serve(
        {"kty": "oct", "kid": "oct-1", "k": b64url(public_pem)},
        public_jwk(rsa_key, "rs512", alg="RS512"),
        public_jwk(rsa_key, "enc", use="enc"),
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        public_jwk(rsa_key, "good"),
    )
    # Algorithm confusion through the JWKS: an HS256 token keyed with the published key material.
    for kid in ("oct-1", "good"):
        confused = handmade_token({"alg": "HS256", "kid": kid}, claims(clock), sign=public_pem)
        assert await refused(jwks_verifier, confused) == "invalid token"
    for kid in ("rs512", "enc", "broken"):
        assert await refused(jwks_verifier, signed(clock, rsa_key, kid)) == "invalid token"
    assert (await jwks_verifier.verify(signed(clock, rsa_key, "good"))).organization_id == ORG


async def test_jwks_refuses_other_algorithms_without_fetching(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier
) -> None:
    for header in ({"alg": "none", "kid": "k"}, {"alg": "HS256", "kid": "k"}):
        assert (
            await refused(jwks_verifier, handmade_token(header, claims(clock), sign=b"x")) == "invalid token"
        )
    assert jwks_server.requests == 0


async def test_jwks_key_rotation_by_kid(
    clock: FakeClock,
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "2026-01"))
    await jwks_verifier.verify(signed(clock, rsa_key, "2026-01"))

    # The provider publishes a new key and starts signing with it: the unknown kid triggers a fetch.
    jwks_server.serve(public_jwk(rsa_key_2, "2026-02"), public_jwk(rsa_key, "2026-01"))
    clock.advance(JWKS_REFETCH_INTERVAL_SECONDS)
    await jwks_verifier.verify(signed(clock, rsa_key_2, "2026-02"))
    await jwks_verifier.verify(signed(clock, rsa_key, "2026-01"))
    assert jwks_server.requests == 2

    # The old key is withdrawn: once the document is fetched again, its tokens are refused.
    jwks_server.serve(public_jwk(rsa_key_2, "2026-02"))
    clock.advance(JWKS_REFETCH_INTERVAL_SECONDS)
    await refused(jwks_verifier, signed(clock, rsa_key, "2026-03"))  # unknown kid: refetch
    assert jwks_server.requests == 3
    assert await refused(jwks_verifier, signed(clock, rsa_key, "2026-01")) == "invalid token"
    await jwks_verifier.verify(signed(clock, rsa_key_2, "2026-02"))


async def test_unknown_kids_cause_at_most_one_fetch_per_interval(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
    assert jwks_server.requests == 1

    # Within the interval after a fetch, made-up kids are refused without asking the server again.
    for round_number in range(4):
        for attempt in range(25):
            token = signed(clock, rsa_key, f"random-{round_number}-{attempt}")
            assert await refused(jwks_verifier, token) == "invalid token"
            clock.advance(0.1)
        assert jwks_server.requests == round_number + 1
        clock.advance(JWKS_REFETCH_INTERVAL_SECONDS)
    # The known key kept working throughout.
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))


async def test_concurrent_fetches_are_coalesced(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    jwks_server.delay = 0.3
    tokens = [signed(clock, rsa_key, "k1") for _ in range(20)]
    principals = await asyncio.gather(*(jwks_verifier.verify(token) for token in tokens))
    assert {principal.organization_id for principal in principals} == {ORG}
    assert jwks_server.requests == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    jwks_server.delay = 0.3
    token = signed(clock, rsa_key, "k1")
    first = asyncio.create_task(jwks_verifier.verify(token))
    second = asyncio.create_task(jwks_verifier.verify(token))
    await asyncio.sleep(0.1)
    first.cancel()
    assert (await second).organization_id == ORG
    with pytest.raises(asyncio.CancelledError):
        await first
    assert jwks_server.requests == 1


async def test_expired_cache_is_refreshed_in_the_background(
    clock: FakeClock,
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
    clock.advance(JWKS_CACHE_SECONDS - 1)
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
    assert jwks_server.requests == 1

    jwks_server.serve(public_jwk(rsa_key_2, "k2"))
    clock.advance(1)
    # A known key does not wait for the fetch that its use starts.
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
    for _ in range(100):
        if jwks_server.requests == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert jwks_server.requests == 2
    assert await refused(jwks_verifier, signed(clock, rsa_key, "k1")) == "invalid token"
    await jwks_verifier.verify(signed(clock, rsa_key_2, "k2"))


async def test_failing_jwks_server_is_a_401_and_is_not_hammered(
    clock: FakeClock,
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    jwks_server.status = 503
    token = signed(clock, rsa_key, "k1")
    with caplog.at_level(logging.WARNING, logger="app.core.auth"):
        for _ in range(10):
            assert await refused(jwks_verifier, token) == "signing keys unavailable"
    assert jwks_server.requests == 1
    assert "HTTP status 503" in caplog.text
    assert token not in caplog.text

    jwks_server.status = 200
    clock.advance(JWKS_REFETCH_INTERVAL_SECONDS)
    await jwks_verifier.verify(token)
    assert jwks_server.requests == 2


async def test_known_keys_survive_a_failed_refresh(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
    jwks_server.status = 500
    clock.advance(JWKS_CACHE_SECONDS)
    for _ in range(3):
        await jwks_verifier.verify(signed(clock, rsa_key, "k1"))
        await asyncio.sleep(0.1)
    assert jwks_server.requests == 2


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"keys": "no"}', b'{"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}]}'],
)
async def test_unusable_jwks_document_is_a_401(
    clock: FakeClock,
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    body: bytes,
) -> None:
    jwks_server.raw = body
    assert await refused(jwks_verifier, signed(clock, rsa_key, "k1")) == "signing keys unavailable"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_jwks_server_down_is_a_401_with_a_log_line(
    clock: FakeClock,
    trusting_context: ssl.SSLContext,
    rsa_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"https://127.0.0.1:{free_port()}/jwks"
    verifier = TokenVerifier(key_settings(jwks_url=url), ssl_context=trusting_context, clock=clock)
    token = signed(clock, rsa_key, "k1")
    with caplog.at_level(logging.WARNING, logger="app.core.auth"):
        assert await refused(verifier, token) == "signing keys unavailable"
    assert "fetching the JWKS document" in caplog.text
    assert token not in caplog.text
    await verifier.aclose()


async def test_jwks_certificate_must_verify(
    clock: FakeClock, jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    verifier = TokenVerifier(key_settings(jwks_url=jwks_server.url), clock=clock)
    with caplog.at_level(logging.WARNING, logger="app.core.auth"):
        assert await refused(verifier, signed(clock, rsa_key, "k1")) == "signing keys unavailable"
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    await verifier.aclose()


async def test_jwks_trusts_the_configured_ca_bundle(
    clock: FakeClock, ca: trustme.CA, jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    jwks_server.serve(public_jwk(rsa_key, "k1"))
    verifier = TokenVerifier(key_settings(jwks_url=jwks_server.url, ca_bundle=bundle), clock=clock)
    assert (await verifier.verify(signed(clock, rsa_key, "k1"))).organization_id == ORG
    await verifier.aclose()


async def test_jwks_document_size_is_bounded(
    clock: FakeClock, jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(public_jwk(rsa_key, "k1"), {"kty": "none", "padding": "x" * 300_000})
    assert await refused(jwks_verifier, signed(clock, rsa_key, "k1")) == "signing keys unavailable"


async def test_a_verified_token_is_remembered_not_checked_again(
    clock: FakeClock, hs_verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        calls.append("decode")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    token = jwt.encode(claims(clock, exp=int(clock.now().timestamp()) + 600), SECRET, algorithm="HS256")
    for _ in range(5):
        assert (await hs_verifier.verify(token)).organization_id == ORG
    assert calls == ["decode"]
    # Remembered until it expires (with the leeway), and refused from then on.
    clock.advance(600 + 29)
    await hs_verifier.verify(token)
    assert calls == ["decode"]
    clock.advance(2)
    assert await refused(hs_verifier, token) == "token expired"


@pytest.mark.parametrize(
    "change",
    [{"exp": 10**400}, {"nbf": 10**400}, {"iat": -(10**400)}, {"sub": "me\ud800"}, {"sub": ""}],
)
async def test_absurd_claims_are_refused_not_a_crash(
    clock: FakeClock, hs_verifier: TokenVerifier, change: dict[str, Any]
) -> None:
    # Signed correctly: only the claims are wrong.
    token = handmade_token({"alg": "HS256", "typ": "JWT"}, {**claims(clock), **change}, sign=SECRET.encode())
    assert await refused(hs_verifier, token) in ("invalid token", "token expired")


async def test_remembered_tokens_are_bounded_least_recently_used_first(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = TokenVerifier(hs_settings(caller_token_cache_size=3), clock=clock)
    decoded: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    tokens = [jwt.encode(claims(clock, sub=f"user-{i}"), SECRET, algorithm="HS256") for i in range(4)]
    try:
        for token in tokens[:3]:
            await verifier.verify(token)
        await verifier.verify(tokens[0])  # now the most recently used
        await verifier.verify(tokens[3])  # evicts tokens[1], the least recently used
        decoded.clear()
        for token in (tokens[0], tokens[2], tokens[3]):
            await verifier.verify(token)
        assert decoded == [], "the three most recently used are remembered"
        await verifier.verify(tokens[1])
        assert decoded == [tokens[1]], "only the evicted one is checked again"
    finally:
        await verifier.aclose()
