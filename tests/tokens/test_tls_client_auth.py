"""``tls_client_auth`` token requests against a real provider that authenticates clients by their
TLS certificate (``tests.support.mtls_server``), over the real outbound client."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from app.connectors.kinds.client_auth.tls_client_auth import METHOD
from app.core.errors import AppError, CredentialsRejected
from app.core.outbound import OutboundClient
from app.tokens.oauth import OAuth2TokenClient
from app.tokens.types import ClientAuth, OAuth2Config, TokenFetcher
from tests.support.mtls_server import CertificateClient, MutualTLSAuthorizationServer, fingerprint, subject
from tests.support.tls import LocalCA

CLIENT_ID = "svc-mtls"


def _client_auth(certificate: str, key: str) -> ClientAuth:
    return METHOD.build({"tls_certificate": certificate}, {"tls_private_key": SecretStr(key)})


def _config(token_url: str, certificate: str, key: str, grant: str = "client_credentials") -> OAuth2Config:
    if grant == "password":
        return OAuth2Config(
            grant_type="password",
            token_url=token_url,
            client_id=CLIENT_ID,
            client_auth=_client_auth(certificate, key),
            scope="read",
            username="svc-user",
            password=SecretStr("CANARY-user-pw"),
        )
    return OAuth2Config(
        grant_type="client_credentials",
        token_url=token_url,
        client_id=CLIENT_ID,
        client_auth=_client_auth(certificate, key),
        scope="read",
    )


def _key_lines(key: str) -> list[str]:
    return [line for line in key.splitlines() if line and not line.startswith("-----")]


def _all_text(error: BaseException) -> str:
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        if isinstance(current, AppError):
            parts += [current.detail, repr(current.extra)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


@pytest.fixture(scope="module")
def good(local_ca: LocalCA) -> tuple[str, str]:
    return local_ca.issue_client_certificate("svc-mtls")


def _server(
    local_ca: LocalCA, registered: str, version: ssl.TLSVersion | None = None
) -> MutualTLSAuthorizationServer:
    context = local_ca.server_context()
    local_ca.verify_client_certificates(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    server = MutualTLSAuthorizationServer(context)
    server.add_clients([CertificateClient(CLIENT_ID, tls_client_auth_subject_dn=subject(registered))])
    server.store.add_user("svc-user", "CANARY-user-pw")
    return server


@pytest.fixture
def idp(local_ca: LocalCA, good: tuple[str, str]) -> Iterator[MutualTLSAuthorizationServer]:
    with _server(local_ca, good[0]) as server:
        yield server


@pytest.fixture
def fetch(outbound: OutboundClient) -> TokenFetcher:
    return OAuth2TokenClient(outbound, default_token_lifetime_seconds=900)


@pytest.mark.parametrize("grant", ["client_credentials", "password"])
async def test_the_certificate_authenticates_the_client_and_no_secret_is_sent(
    fetch: TokenFetcher, idp: MutualTLSAuthorizationServer, good: tuple[str, str], grant: str
) -> None:
    certificate, key = good
    config = _config(idp.token_url, certificate, key, grant)
    issued = await fetch(config)
    record = idp.store.find_access_token(issued.access_token)
    assert record is not None and record.client_id == CLIENT_ID
    refreshes = 0
    if grant == "password":
        # The refresh grant authenticates the client the same way.
        assert issued.refresh_token is not None
        renewed = await fetch(config, issued.refresh_token)
        assert idp.store.find_access_token(renewed.access_token) is not None
        refreshes = 1
    assert idp.request_count == 1 + refreshes
    for seen, form, header in zip(
        idp.observed.certificates, idp.observed.forms, idp.observed.authorization_headers, strict=True
    ):
        assert seen is not None and seen.fingerprint == fingerprint(certificate)
        assert seen.subject == subject(certificate)
        assert form["client_id"] == CLIENT_ID
        assert "client_secret" not in form and "client_assertion" not in form
        assert header is None


async def test_a_certificate_not_registered_for_the_client_is_rejected(
    fetch: TokenFetcher, idp: MutualTLSAuthorizationServer, local_ca: LocalCA
) -> None:
    certificate, key = local_ca.issue_client_certificate("someone-else")
    with pytest.raises(CredentialsRejected) as caught:
        await fetch(_config(idp.token_url, certificate, key))
    assert caught.value.extra.get("provider_error") == "invalid_client"
    # The TLS layer let it through (the CA is the one it trusts); the client check refused it.
    [seen] = idp.seen
    assert seen is not None and seen.fingerprint == fingerprint(certificate)
    assert not any(line in _all_text(caught.value) for line in _key_lines(key))


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
        pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
    ],
)
async def test_an_expired_certificate_is_refused_in_the_handshake(
    fetch: TokenFetcher, local_ca: LocalCA, version: ssl.TLSVersion
) -> None:
    # Registered by subject, so only the TLS layer's verdict on the dates can refuse it.
    certificate, key = local_ca.issue_client_certificate("svc-mtls", expired=True)
    with _server(local_ca, certificate, version) as server:
        with pytest.raises(CredentialsRejected) as caught:
            await fetch(_config(server.token_url, certificate, key))
        assert server.request_count == 0
    assert "refused the client certificate (certificate expired)" in caught.value.detail
    assert not any(line in _all_text(caught.value) for line in _key_lines(key))
