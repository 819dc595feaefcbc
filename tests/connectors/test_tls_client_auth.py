"""``tls_client_auth`` connectors through the real app, against a real provider that authenticates
clients by their TLS certificate (``tests.support.mtls_server``).

Every response and log line of these tests is searched for each line of the private keys' PEM
bodies (as sent and as stored): none may appear anywhere.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from sqlalchemy import select

from app.connectors.models import Connector
from app.core.db import Database, build_engine
from app.core.logs import JSONFormatter
from tests.conftest import canary
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, recorded_status
from tests.connectors.test_crud import assert_problem
from tests.support.mtls_server import CertificateClient, MutualTLSAuthorizationServer, fingerprint, subject
from tests.support.tls import LocalCA

CLIENT_ID = "svc-mtls"
Pair = tuple[str, str]


class KeyWatch(logging.Handler):
    """Collects every log line and response; ``check`` fails if a line of a watched key is in one."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.lines: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(JSONFormatter().format(record))

    async def on_response(self, response: httpx.Response) -> None:
        await response.aread()
        self.texts.append(response.text + repr(dict(response.headers)))

    def watch(self, key: str) -> str:
        stored = load_pem_private_key(key.encode(), password=None).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
        for pem in (key, stored.decode()):
            self.lines.update(line for line in pem.splitlines() if line and not line.startswith("-----"))
        return key

    def check(self) -> None:
        assert self.texts, "nothing was watched"
        leaks = [text[:200] for text in self.texts if any(line in text for line in self.lines)]
        assert not leaks, f"a line of a private key appeared: {leaks[:3]}"


@pytest.fixture
def keys(client: httpx.AsyncClient) -> Iterator[KeyWatch]:
    watch = KeyWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    hooks = client.event_hooks
    hooks["response"].append(watch.on_response)
    client.event_hooks = hooks
    try:
        yield watch
    finally:
        root.removeHandler(watch)
    watch.check()


@pytest.fixture
def good(local_ca: LocalCA, keys: KeyWatch) -> Pair:
    certificate, key = local_ca.issue_client_certificate(CLIENT_ID)
    return certificate, keys.watch(key)


@pytest.fixture
def idp(local_ca: LocalCA, good: Pair) -> Iterator[MutualTLSAuthorizationServer]:
    context = local_ca.server_context()
    local_ca.verify_client_certificates(context)
    with MutualTLSAuthorizationServer(context) as server:
        register(server, good[0])
        server.store.add_user("svc-user", "CANARY-user-pw")
        yield server


def register(server: MutualTLSAuthorizationServer, certificate: str) -> None:
    """Make ``certificate``'s subject the one the provider accepts for the client."""
    server.add_clients([CertificateClient(CLIENT_ID, tls_client_auth_subject_dn=subject(certificate))])


def body(token_url: str, pair: Pair, grant: str = "client_credentials") -> dict[str, Any]:
    certificate, key = pair
    if grant == "password":
        created = payloads.password_grant(token_url=token_url, client_id=CLIENT_ID)
        created["auth"]["password"] = "CANARY-user-pw"
    else:
        created = payloads.client_credentials(token_url=token_url, client_id=CLIENT_ID)
    del created["auth"]["client_secret"]
    created["auth"].update(
        client_auth_method="tls_client_auth",
        tls_certificate=certificate,
        # Text around the PEM block, as a PKCS #12 export writes it, carries the canary.
        tls_private_key=f"Bag Attributes\n    friendlyName: {canary('key')}\n{key}",
    )
    return created


async def stored(database_url: str, connector_id: str) -> Connector:
    db = Database(build_engine(database_url))
    try:
        async with db.read() as session:
            query = select(Connector).where(Connector.id == uuid.UUID(connector_id))
            return (await session.execute(query)).scalar_one()
    finally:
        await db.dispose()


@pytest.mark.parametrize("grant", ["client_credentials", "password"])
async def test_create_checks_the_certificate_reads_show_it_and_authorize_uses_it(
    client: httpx.AsyncClient, idp: MutualTLSAuthorizationServer, good: Pair, grant: str
) -> None:
    certificate = good[0]
    response = await client.post("/connectors", json=body(idp.token_url, good, grant))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"]["state"] == "authorized"
    expected = {
        "type": "oauth2",
        "grant_type": grant,
        "client_auth_method": "tls_client_auth",
        "client_id": CLIENT_ID,
        "tls_certificate": certificate,
        "has_tls_private_key": True,
        "tls_certificate_subject": subject(certificate),
        "tls_certificate_expires_at": "3000-01-01T00:00:00Z",
    }
    assert expected.items() <= created["auth"].items()
    assert not {"tls_private_key", "client_secret", "has_client_secret"} & created["auth"].keys()
    read = (await client.get(f"/connectors/{created['id']}")).json()
    assert read["auth"] == created["auth"]

    answers = [await authorize(client, created["id"], path="/items") for _ in range(2)]
    assert {answer.status_code for answer in answers} == {200}
    [header] = {answer.json()["headers"]["Authorization"] for answer in answers}
    record = idp.store.find_access_token(header.removeprefix("Bearer "))
    assert record is not None and record.client_id == CLIENT_ID
    # The live check's token served both: one token request, made with the certificate.
    assert [seen.fingerprint if seen else None for seen in idp.seen] == [fingerprint(certificate)]
    assert idp.observed.forms[0]["client_id"] == CLIENT_ID
    assert "client_secret" not in idp.observed.forms[0]
    assert idp.observed.authorization_headers == [None]


async def test_a_certificate_the_provider_refuses_marks_the_connector_rejected(
    client: httpx.AsyncClient, idp: MutualTLSAuthorizationServer, local_ca: LocalCA, keys: KeyWatch
) -> None:
    certificate, key = local_ca.issue_client_certificate("someone-else")
    refused = body(idp.token_url, (certificate, keys.watch(key)))
    assert_problem(await client.post("/connectors", json=refused), 422, "credentials_rejected")
    assert (await client.get("/connectors")).json()["items"] == []
    assert idp.request_count == 1

    response = await client.post("/connectors", json=refused, params={"validate": "false"})
    assert response.status_code == 201, response.text
    connector_id = response.json()["id"]
    for _ in range(3):
        assert_problem(await authorize(client, connector_id), 502, "credentials_rejected")
    # Refused once: the following calls fail fast, without asking the provider again.
    assert idp.request_count == 2
    await recorded_status(client, f"/connectors/{connector_id}", "rejected")


async def test_rotation_needs_the_new_certificate_and_its_key_together(
    client: httpx.AsyncClient,
    idp: MutualTLSAuthorizationServer,
    local_ca: LocalCA,
    good: Pair,
    keys: KeyWatch,
    database_url: str,
) -> None:
    created = (await client.post("/connectors", json=body(idp.token_url, good))).json()
    url = f"/connectors/{created['id']}"
    first = (await authorize(client, created["id"])).json()["headers"]["Authorization"]

    # The provider is told of the new certificate (its subject), then the connector gets it.
    new_certificate, new_key = local_ca.issue_client_certificate(CLIENT_ID)
    register(idp, new_certificate)
    rotation = {"tls_certificate": new_certificate, "tls_private_key": keys.watch(new_key)}
    patched = await client.patch(url, json={"auth": rotation})
    assert patched.status_code == 200, patched.text
    rotated = patched.json()
    assert rotated["version"] == created["version"] + 1
    assert rotated["status"]["state"] == "authorized"
    assert rotated["auth"]["tls_certificate"] == new_certificate
    assert rotated["auth"]["tls_certificate_subject"] == subject(new_certificate)
    second = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    assert second != first
    assert idp.seen[-1] is not None and idp.seen[-1].fingerprint == fingerprint(new_certificate)
    requests = idp.request_count

    # A certificate without its key: the stored key does not belong to it.
    stray, stray_key = local_ca.issue_client_certificate(CLIENT_ID)
    keys.watch(stray_key)
    refused = await client.patch(url, json={"auth": {"tls_certificate": stray}})
    problem = assert_problem(refused, 422, "invalid_request")
    assert problem["errors"] == [
        {
            "field": "auth.tls_private_key",
            "reason": "does not belong to tls_certificate: their public keys differ",
        }
    ]
    assert (await client.get(url)).json() == rotated
    row = await stored(database_url, created["id"])
    assert row.version == rotated["version"] and row.auth_config["tls_certificate"] == new_certificate
    assert (await authorize(client, created["id"])).json()["headers"]["Authorization"] == second
    assert idp.request_count == requests


async def test_a_secret_client_moves_to_a_certificate_with_both_and_loses_its_secret(
    client: httpx.AsyncClient, idp: MutualTLSAuthorizationServer, good: Pair, database_url: str
) -> None:
    certificate, key = good
    secret_body = payloads.client_credentials(token_url=idp.token_url, client_id=CLIENT_ID)
    created = (await client.post("/connectors", json=secret_body, params={"validate": "false"})).json()
    url = f"/connectors/{created['id']}"
    assert created["auth"]["has_client_secret"] is True

    switch: dict[str, Any] = {"client_auth_method": "tls_client_auth"}
    problem = assert_problem(await client.patch(url, json={"auth": switch}), 422, "invalid_request")
    assert sorted(error["field"] for error in problem["errors"]) == [
        "auth.tls_certificate",
        "auth.tls_private_key",
    ]
    switch["tls_certificate"] = certificate
    problem = assert_problem(await client.patch(url, json={"auth": switch}), 422, "invalid_request")
    assert [error["field"] for error in problem["errors"]] == ["auth.tls_private_key"]
    assert (await client.get(url)).json()["version"] == created["version"]

    switch["tls_private_key"] = key
    patched = await client.patch(url, json={"auth": switch})
    assert patched.status_code == 200, patched.text
    moved = patched.json()
    assert moved["status"]["state"] == "authorized"
    assert moved["auth"]["client_auth_method"] == "tls_client_auth"
    assert moved["auth"]["has_tls_private_key"] is True
    assert "has_client_secret" not in moved["auth"]
    row = await stored(database_url, created["id"])
    assert set(row.secrets) == {"tls_private_key"}
    assert "client_secret" not in row.auth_config
    answer = await authorize(client, created["id"])
    assert answer.status_code == 200, answer.text
    assert [seen.fingerprint if seen else None for seen in idp.seen] == [fingerprint(certificate)]
