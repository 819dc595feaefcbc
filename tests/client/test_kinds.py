"""The client's models of each kind of credentials, against the real service.

API keys are checked live at a real HTTPS server on loopback, which is also their resource: it
accepts the one key, in the header or in the query. Keys contain the canary, and only
``/authorize`` hands one out, so its answers are read by a client of their own (``authorizer``),
whose responses the guard does not read; log lines are still watched (httpx's own, which name
every URL and so a key sent in the query, are kept at the level the service runs them).

OAuth 2.0 connectors with ``private_key_jwt`` and ``tls_client_auth`` are saved without a live
check: what is tested is that their reads, parsed into the client's models, keep every member the
service sent, and never a private key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
import trustme
from connectors_client import (
    ApiKeyAuthIn,
    ApiKeyAuthOut,
    AsyncConnectorsClient,
    AuthPatch,
    Conflict,
    Connector,
    ConnectorAuth,
    ConnectorCreate,
    ConnectorPatch,
    ConnectorsClient,
    ConsentRequired,
    ConsentStart,
    CredentialsRejected,
    DestinationRefused,
    OAuth2AuthorizationCodeIn,
    OAuth2AuthorizationCodeOut,
    OAuth2ClientCredentialsPrivateKeyJWTIn,
    OAuth2ClientCredentialsPrivateKeyJWTOut,
    OAuth2ClientCredentialsTlsClientAuthIn,
    OAuth2ClientCredentialsTlsClientAuthOut,
    OAuth2PasswordPrivateKeyJWTIn,
    OAuth2PasswordPrivateKeyJWTOut,
    OAuth2PasswordTlsClientAuthIn,
    OAuth2PasswordTlsClientAuthOut,
    SecretRequired,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import import_key
from pydantic import SecretStr

from tests.client.conftest import Flavour, LiveService, run
from tests.conftest import CANARY, canary
from tests.support.fakes import FakeTime
from tests.support.proxy import TunnelProxy
from tests.support.servers import RecordedRequest, Reply, ScriptedServer
from tests.support.tls import LocalCA

HEADER = "X-API-Key"
PARAMETER = "api_key"


@pytest.fixture(autouse=True)
def production_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    """httpx at the level the service runs it: below WARNING it logs every request's URL."""
    caplog.set_level(logging.WARNING, logger="httpx")


@pytest.fixture
async def authorizer(
    flavour: Flavour, live: LiveService
) -> AsyncIterator[ConnectorsClient | AsyncConnectorsClient]:
    """A client of the flavour's kind and organization, for ``/authorize`` only."""
    if flavour.is_async:
        async with AsyncConnectorsClient(live.base_url, live.token()) as async_client:
            yield async_client
    else:
        with ConnectorsClient(live.base_url, live.token()) as client:
            yield client


class KeyedResource:
    """An HTTPS API under ``/api`` that accepts ``key`` in the ``X-API-Key`` header or in the
    ``api_key`` query parameter (the first one, decoded), and answers the path it got."""

    def __init__(self, server: ScriptedServer, key: str) -> None:
        self.server = server
        self.key = key
        server.set_default(self._answer)

    def _answer(self, request: RecordedRequest) -> Reply:
        query = parse_qs(urlsplit(request.path).query)
        if request.headers.get(HEADER.lower()) == self.key or query.get(PARAMETER, [""])[0] == self.key:
            return Reply.json({"path": request.path})
        return Reply.json({"error": "invalid key"}, 401)

    def url(self, path: str) -> str:
        return self.server.url(path)


@pytest.fixture
def api_key() -> str:
    # Characters a URL must encode, so that the query parameter is seen encoded and decoded.
    return canary("key") + "+/=&%?#"


@pytest.fixture
def keyed(scripted_server: ScriptedServer, api_key: str) -> KeyedResource:
    return KeyedResource(scripted_server, api_key)


async def test_an_api_key_in_a_header(
    flavour: Flavour,
    authorizer: ConnectorsClient | AsyncConnectorsClient,
    keyed: KeyedResource,
    api_key: str,
    fake_time: FakeTime,
) -> None:
    api = flavour.connectors
    body = ConnectorCreate(
        name="Keyed",
        resource_domain_url=keyed.url("/api"),
        auth=ApiKeyAuthIn(key=api_key, name=HEADER, validation_url=keyed.url("/api/me")),
    )
    assert api_key not in repr(body) and api_key not in body.model_dump_json()

    created = await run(api.create(body))  # checked live at the validation URL
    assert created.status.state == "authorized"
    [check] = keyed.server.requests
    assert (check.path, check.headers[HEADER.lower()]) == ("/api/me", api_key)
    auth = created.auth
    assert isinstance(auth, ApiKeyAuthOut)
    assert (auth.type, auth.in_, auth.name, auth.prefix) == ("api_key", "header", HEADER, None)
    assert (auth.validation_url, auth.has_key) == (keyed.url("/api/me"), True)
    assert await run(api.get(created.id)) == created

    answer = await run(authorizer.authorize(created.id, "/v1/items?id=7"))
    assert answer.headers == {HEADER: api_key}
    assert answer.url == keyed.url("/api/v1/items?id=7")
    assert (answer.resource_origin, answer.expires_at) == (keyed.url(""), None)
    assert api_key not in repr(answer)

    connector_auth = ConnectorAuth(authorizer, created.id, clock=fake_time.now)
    response = await run(flavour.resource.get(keyed.url("/api/v1/items?id=7"), auth=connector_auth))
    assert (response.status_code, response.json()) == (200, {"path": "/api/v1/items?id=7"})
    assert keyed.server.count == 2

    # A prefix, by a patch: "Bearer <key>" is not the key, so the check refuses it; nothing changes.
    with pytest.raises(CredentialsRejected):
        await run(api.update(created.id, ConnectorPatch(auth=AuthPatch(prefix="Bearer"))))
    assert (await run(api.get(created.id))).version == 1


async def test_an_api_key_in_the_query(
    flavour: Flavour,
    authorizer: ConnectorsClient | AsyncConnectorsClient,
    keyed: KeyedResource,
    api_key: str,
    fake_time: FakeTime,
) -> None:
    api = flavour.connectors
    encoded = f"{PARAMETER}={quote(api_key, safe='')}"
    created = await run(
        api.create(
            ConnectorCreate(
                name="Keyed in the query",
                resource_domain_url=keyed.url("/api"),
                auth=ApiKeyAuthIn.model_validate(
                    {
                        "type": "api_key",
                        "key": api_key,
                        "in": "query",
                        "name": PARAMETER,
                        "prefix": None,
                        "validation_url": keyed.url("/api/me"),
                    }
                ),
            )
        )
    )
    assert created.status.state == "authorized"
    [check] = keyed.server.requests
    assert check.path == f"/api/me?{encoded}"
    assert HEADER.lower() not in check.headers
    auth = created.auth
    assert isinstance(auth, ApiKeyAuthOut)
    assert (auth.in_, auth.name, auth.prefix, auth.has_key) == ("query", PARAMETER, None, True)

    # The key is in the URL, in place of the caller's parameter of that name; no header.
    answer = await run(authorizer.authorize(created.id, f"/v1/items?{PARAMETER}=caller&id=7"))
    assert answer.url == keyed.url(f"/api/v1/items?id=7&{encoded}")
    assert (answer.headers, answer.expires_at) == ({}, None)
    assert api_key not in repr(answer) and quote(api_key, safe="") not in repr(answer)

    # ConnectorAuth puts it in the request's query: from the kept answer for a plain path, and
    # from an answer for that path for one it leaves to the service (an escape in the path).
    connector_auth = ConnectorAuth(authorizer, created.id, clock=fake_time.now)
    for path, sent in [
        (f"/api/v1/items?{PARAMETER}=caller&id=7", f"/api/v1/items?id=7&{encoded}"),
        ("/api", f"/api?{encoded}"),
        ("/api/v1/items%20list", f"/api/v1/items%20list?{encoded}"),
    ]:
        response = await run(flavour.resource.get(keyed.url(path), auth=connector_auth))
        assert (response.status_code, response.json()) == (200, {"path": sent})
    assert keyed.server.count == 4

    # Moved to a header and its validation URL removed (null) by a patch: a change of the
    # validation URL needs the key again, here a new one.
    move = AuthPatch(in_="header", name=HEADER, validation_url=None)
    with pytest.raises(SecretRequired) as required:
        await run(api.update(created.id, ConnectorPatch(auth=move), validate=False))
    assert [error.field for error in required.value.errors] == ["auth.key"]
    rotated = canary("rotated")
    moved = await run(
        api.update(
            created.id,
            ConnectorPatch(auth=move.model_copy(update={"key": SecretStr(rotated)})),
            if_match=created.etag,
            validate=False,
        )
    )
    assert isinstance(moved.auth, ApiKeyAuthOut)
    assert (moved.auth.in_, moved.auth.name, moved.auth.validation_url) == ("header", HEADER, None)
    answer = await run(authorizer.authorize(created.id))
    assert (answer.url, answer.headers) == (keyed.url("/api"), {HEADER: rotated})


# OAuth 2.0 client authentication by private key or certificate ----------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_of(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM: none of a private key's may ever be shown."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def public_jwk(pem: str, alg: str, kid: str) -> dict[str, Any]:
    """The public JWK of ``pem``, derived by joserfc (not by the service's code)."""
    jwk: dict[str, Any] = import_key(
        pem.encode(), "RSA", parameters={"alg": alg, "use": "sig", "kid": kid}
    ).as_dict(private=False)
    return jwk


async def raw_read(live: LiveService, connector: Connector) -> dict[str, Any]:
    """The connector as the service sends it, unparsed."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {live.token()}"}) as http:
        response = await http.get(f"{live.base_url}/connectors/{connector.id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def assert_round_trip(live: LiveService, connector: Connector, secrets: list[str]) -> None:
    """The parsed read keeps every member the service sent, and no secret is among them."""
    raw = await raw_read(live, connector)
    assert Connector.model_validate(raw) == connector
    assert connector.model_dump(mode="json", by_alias=True) == raw
    text = repr(raw) + repr(connector)
    for secret in secrets:
        assert secret not in text


async def test_private_key_jwt_reads_round_trip(
    flavour: Flavour, live: LiveService, scripted_server: ScriptedServer
) -> None:
    api = flavour.connectors
    key_pem = pem_of(rsa_key())
    token_url = scripted_server.url("/oauth/token")
    body = ConnectorCreate(
        name="Signed",
        resource_domain_url=scripted_server.url("/api"),
        auth=OAuth2ClientCredentialsPrivateKeyJWTIn(
            client_id="signed-client",
            token_url=token_url,
            scope="read",
            private_key=key_pem,
            private_key_id="key-1",
            signing_alg="PS256",
            assertion_audience="https://idp.example.test/",
        ),
    )
    assert all(line not in repr(body) + body.model_dump_json() for line in pem_body_lines(key_pem))

    created = await run(api.create(body, validate=False))
    assert created.status.state == "unverified"
    auth = created.auth
    assert isinstance(auth, OAuth2ClientCredentialsPrivateKeyJWTOut)
    assert (auth.client_auth_method, auth.grant_type, auth.client_id) == (
        "private_key_jwt",
        "client_credentials",
        "signed-client",
    )
    assert (auth.has_private_key, auth.private_key_id, auth.signing_alg) == (True, "key-1", "PS256")
    assert auth.assertion_audience == "https://idp.example.test/"
    assert auth.public_jwk == public_jwk(key_pem, "PS256", "key-1")
    assert not hasattr(auth, "has_client_secret")
    await assert_round_trip(live, created, pem_body_lines(key_pem))
    assert scripted_server.count == 0  # validate=False: no token request

    # A new key and no key id, by a patch: the public key follows, the kid is gone.
    new_pem = pem_of(rsa_key())
    patched = await run(
        api.update(
            created.id,
            ConnectorPatch(auth=AuthPatch(private_key=new_pem, private_key_id=None, signing_alg="RS256")),
            if_match=created.etag,
            validate=False,
        )
    )
    assert isinstance(patched.auth, OAuth2ClientCredentialsPrivateKeyJWTOut)
    assert (patched.version, patched.auth.private_key_id, patched.auth.signing_alg) == (2, None, "RS256")
    expected = public_jwk(new_pem, "RS256", "unused")
    del expected["kid"]
    assert patched.auth.public_jwk == expected
    await assert_round_trip(live, patched, pem_body_lines(key_pem) + pem_body_lines(new_pem))

    # The password grant, with the same client authentication.
    password = canary("user")
    grant = await run(
        api.create(
            ConnectorCreate(
                name="Signed user",
                resource_domain_url=scripted_server.url("/api"),
                auth=OAuth2PasswordPrivateKeyJWTIn(
                    client_id="signed-client",
                    token_url=token_url,
                    username="svc-user",
                    password=password,
                    private_key=key_pem,
                ),
            ),
            validate=False,
        )
    )
    assert isinstance(grant.auth, OAuth2PasswordPrivateKeyJWTOut)
    assert (grant.auth.username, grant.auth.has_password, grant.auth.signing_alg) == (
        "svc-user",
        True,
        "RS256",
    )
    assert (grant.auth.private_key_id, grant.auth.assertion_audience) == (None, None)
    await assert_round_trip(live, grant, [*pem_body_lines(key_pem), password])
    listed = await run(api.list())
    assert {c.id: c for c in listed.items} == {patched.id: patched, grant.id: grant}


def rsa_client_certificate(local_ca: LocalCA, common_name: str) -> tuple[str, str]:
    """A client certificate with an RSA key, issued by the local CA: its chain and its key."""
    leaf = local_ca.ca.issue_cert(
        f"{common_name}.clients.example.test", common_name=common_name, key_type=trustme.KeyType.RSA
    )
    chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes().decode()


async def test_tls_client_auth_reads_round_trip(
    flavour: Flavour, live: LiveService, scripted_server: ScriptedServer, local_ca: LocalCA
) -> None:
    api = flavour.connectors
    chain, key_pem = rsa_client_certificate(local_ca, "svc-client")
    leaf = x509.load_pem_x509_certificate(chain.encode())
    created = await run(
        api.create(
            ConnectorCreate(
                name="Certified",
                resource_domain_url=scripted_server.url("/api"),
                auth=OAuth2ClientCredentialsTlsClientAuthIn(
                    client_id="mtls-client",
                    token_url=scripted_server.url("/oauth/token"),
                    tls_certificate=chain,
                    tls_private_key=key_pem,
                ),
            ),
            validate=False,
        )
    )
    auth = created.auth
    assert isinstance(auth, OAuth2ClientCredentialsTlsClientAuthOut)
    assert (auth.client_auth_method, auth.grant_type) == ("tls_client_auth", "client_credentials")
    assert auth.has_tls_private_key
    assert auth.tls_certificate_subject == leaf.subject.rfc4514_string()
    assert auth.tls_certificate_expires_at == leaf.not_valid_after_utc
    # The chain is public and shown, the client's certificate first.
    shown = x509.load_pem_x509_certificates(auth.tls_certificate.encode())
    assert shown == x509.load_pem_x509_certificates(chain.encode())
    assert not hasattr(auth, "has_client_secret")
    await assert_round_trip(live, created, pem_body_lines(key_pem))

    # The password grant, with a certificate of another key type (EC) from the same CA.
    password = canary("user")
    other_chain, other_key = local_ca.issue_client_certificate("svc-other")
    grant = await run(
        api.create(
            ConnectorCreate(
                name="Certified user",
                resource_domain_url=scripted_server.url("/api"),
                auth=OAuth2PasswordTlsClientAuthIn(
                    client_id="mtls-client",
                    token_url=scripted_server.url("/oauth/token"),
                    username="svc-user",
                    password=password,
                    tls_certificate=other_chain,
                    tls_private_key=other_key,
                ),
            ),
            validate=False,
        )
    )
    assert isinstance(grant.auth, OAuth2PasswordTlsClientAuthOut)
    other_leaf = x509.load_pem_x509_certificate(other_chain.encode())
    assert grant.auth.tls_certificate_subject == other_leaf.subject.rfc4514_string()
    await assert_round_trip(live, grant, [*pem_body_lines(other_key), password])

    # The certificate and its key rotated together by a patch.
    patched = await run(
        api.update(
            created.id,
            ConnectorPatch(auth=AuthPatch(tls_certificate=other_chain, tls_private_key=other_key)),
            validate=False,
        )
    )
    assert isinstance(patched.auth, OAuth2ClientCredentialsTlsClientAuthOut)
    assert patched.auth.tls_certificate_subject == grant.auth.tls_certificate_subject
    await assert_round_trip(live, patched, pem_body_lines(key_pem) + pem_body_lines(other_key))
    assert scripted_server.count == 0
    assert CANARY in password


# Redirects --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_redirect_never_carries_a_key_out_of_the_resource_domain(
    flavour: Flavour,
    authorizer: ConnectorsClient | AsyncConnectorsClient,
    keyed: KeyedResource,
    api_key: str,
    local_ca: LocalCA,
    other_origin: ScriptedServer,
    where: str,
) -> None:
    """httpx follows redirects without asking the auth flow again; each hop is held to the rule of
    the first request: within the base path it goes with the key, anywhere else it is refused."""
    created = await run(
        flavour.connectors.create(
            ConnectorCreate(
                name=f"Keyed in the {where}",
                resource_domain_url=keyed.url("/api"),
                auth=ApiKeyAuthIn.model_validate(
                    {
                        "type": "api_key",
                        "key": api_key,
                        "in": where,
                        "name": PARAMETER if where == "query" else HEADER,
                    }
                ),
            ),
            validate=False,
        )
    )
    answer_keys = keyed._answer
    moves = {
        "/api/v1/away": other_origin.url("/api/v1/items"),
        "/api/v1/outside": keyed.url("/elsewhere"),
        "/api/v1/odd": keyed.url("/api/v1/%2e%2e/x"),
        "/api/v1/moved": keyed.url("/api/v1/items"),
    }

    def answer(request: RecordedRequest) -> Reply:
        target = moves.get(request.path.partition("?")[0])
        if target is not None:
            return Reply(status=302, headers={"Location": target})
        return answer_keys(request)

    keyed.server.set_default(answer)
    connector_auth = ConnectorAuth(authorizer, created.id)
    verify = ssl.create_default_context(cafile=str(local_ca.ca_bundle))
    if flavour.is_async:
        async with httpx.AsyncClient(verify=verify, follow_redirects=True, auth=connector_auth) as http:
            followed = await http.get(keyed.url("/api/v1/moved"))
            refusals = []
            for path in ["/api/v1/away", "/api/v1/outside", "/api/v1/odd"]:
                with pytest.raises(DestinationRefused) as refused:
                    await http.get(keyed.url(path))
                refusals.append(refused.value)
    else:
        with httpx.Client(verify=verify, follow_redirects=True, auth=connector_auth) as sync_http:
            followed = sync_http.get(keyed.url("/api/v1/moved"))
            refusals = []
            for path in ["/api/v1/away", "/api/v1/outside", "/api/v1/odd"]:
                with pytest.raises(DestinationRefused) as refused:
                    sync_http.get(keyed.url(path))
                refusals.append(refused.value)

    # Within the base path: followed. A header key goes along (the server accepted it at the new
    # path); a query key does not, since the hop's URL is the Location as the server wrote it.
    hops = [request for request in keyed.server.requests if request.path.startswith("/api/v1/items")]
    assert hops
    if where == "header":
        assert followed.status_code == 200, followed.text
        assert followed.json() == {"path": "/api/v1/items"}
    else:
        assert followed.status_code == 401
        assert all(PARAMETER not in hop.path for hop in hops)
    # Elsewhere: nothing reached the other origin, nor the same origin outside the base path.
    assert other_origin.count == 0
    paths = [request.path.partition("?")[0] for request in keyed.server.requests]
    assert "/elsewhere" not in paths and not any("%2e" in path for path in paths)
    assert all(api_key not in str(error) for error in refusals)


async def test_through_an_https_proxy_keys_go_and_redirects_are_still_judged(
    flavour: Flavour,
    authorizer: ConnectorsClient | AsyncConnectorsClient,
    keyed: KeyedResource,
    api_key: str,
    local_ca: LocalCA,
    other_origin: ScriptedServer,
) -> None:
    """The proxy's CONNECT carries no credentials and passes; the request inside the tunnel, and
    every redirect after it, is judged as without a proxy."""
    created = await run(
        flavour.connectors.create(
            ConnectorCreate(
                name="Keyed behind a proxy",
                resource_domain_url=keyed.url("/api"),
                auth=ApiKeyAuthIn(key=api_key, name=HEADER),
            ),
            validate=False,
        )
    )
    answer_keys = keyed._answer

    def answer(request: RecordedRequest) -> Reply:
        if request.path == "/api/v1/away":
            return Reply(status=302, headers={"Location": other_origin.url("/api/v1/items")})
        return answer_keys(request)

    keyed.server.set_default(answer)
    connector_auth = ConnectorAuth(authorizer, created.id)
    verify = ssl.create_default_context(cafile=str(local_ca.ca_bundle))
    with TunnelProxy() as proxy:
        options: dict[str, Any] = {"verify": verify, "follow_redirects": True, "auth": connector_auth}
        if flavour.is_async:
            async with httpx.AsyncClient(proxy=proxy.url, **options) as http:
                ok = await http.get(keyed.url("/api/v1/items"))
                with pytest.raises(DestinationRefused):
                    await http.get(keyed.url("/api/v1/away"))
        else:
            with httpx.Client(proxy=proxy.url, **options) as sync_http:
                ok = sync_http.get(keyed.url("/api/v1/items"))
                with pytest.raises(DestinationRefused):
                    sync_http.get(keyed.url("/api/v1/away"))
        tunnels = list(proxy.tunnels)
    assert (ok.status_code, ok.json()) == (200, {"path": "/api/v1/items"})
    assert tunnels[0] == f"127.0.0.1:{keyed.server.port}"
    # The redirect's tunnel to the other origin may open (it carries no credentials): no request
    # went through it.
    assert other_origin.count == 0


async def test_authorization_code_reads_round_trip_and_consent_starts(
    flavour: Flavour, live: LiveService, scripted_server: ScriptedServer
) -> None:
    api = flavour.connectors
    secret = canary("ac")
    body = ConnectorCreate(
        name="Calendar",
        resource_domain_url=scripted_server.url("/api"),
        auth=OAuth2AuthorizationCodeIn(
            client_id="ac-client",
            client_secret=secret,
            token_url=scripted_server.url("/oauth/token"),
            authorization_url=scripted_server.url("/oauth/authorize"),
            scope="calendar.read",
            extra_authorization_params={"prompt": "consent"},
        ),
    )
    created = await run(api.create(body))
    assert created.status.state == "consent_required"
    auth = created.auth
    assert isinstance(auth, OAuth2AuthorizationCodeOut)
    assert auth.redirect_uri.endswith("/oauth/callback")
    assert (auth.has_refresh_token, auth.connected_at, auth.granted_scope) == (False, None, None)
    await assert_round_trip(live, created, [secret])
    with pytest.raises(ConsentRequired) as refused:
        await run(api.authorize(created.id))
    assert isinstance(refused.value, Conflict)
    started = await run(api.consent(created.id))
    assert isinstance(started, ConsentStart)
    query = parse_qs(urlsplit(started.authorization_url).query)
    assert query["client_id"] == ["ac-client"] and query["prompt"] == ["consent"]
    assert "state" not in repr(started)
    # Nothing was sent anywhere: the consent happens in the admin's browser.
    assert scripted_server.count == 0
