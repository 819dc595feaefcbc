"""``private_key_jwt`` connectors through the app, against Authlib's RFC 7523 client authentication."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.config import Settings
from app.main import Overrides
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, recorded_status, unhurried
from tests.connectors.test_crud import assert_problem
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.fakes import FakeTime
from tests.tokens.test_private_key_jwt import (
    EC_KEY,
    OTHER_RSA_KEY,
    RSA_KEY,
    PrivateKey,
    pem_body_lines,
    pem_of,
    private_numbers,
    provider_jwk,
    unverified,
)

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "private_key"}


def signed(token_url: str, client_id: str, pem: str, **auth: Any) -> dict[str, Any]:
    body = payloads.client_credentials(
        name=f"Signed {client_id}",
        token_url=token_url,
        client_id=client_id,
        client_auth_method="private_key_jwt",
        private_key=pem,
        **auth,
    )
    del body["auth"]["client_secret"]
    return body


def register(
    idp: AuthorizationServerThread, client_id: str, key: PrivateKey, alg: str, kid: str | None
) -> None:
    jwk = provider_jwk(pem_of(key), alg, kid)
    idp.add_clients([RegisteredClient(client_id, "", auth_method="private_key_jwt", public_jwk=jwk)])


class Witness:
    """Every response body and log line of a test, searched for key material."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.responses: list[str] = []

    async def record(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(response.text + repr(dict(response.headers)))

    def assert_never_shown(self, key: PrivateKey, *pems: str) -> None:
        logs = [logging.Formatter().format(record) + repr(record.__dict__) for record in self.caplog.records]
        seen = "\n".join(self.responses + logs)
        assert self.responses and logs
        for pem in pems:
            assert not [line for line in pem_body_lines(pem) if line in seen]
        assert not [number for number in private_numbers(key) if len(number) > 8 and number in seen]


@pytest.fixture
def witness(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> Witness:
    caplog.set_level(logging.DEBUG)
    watching = Witness(caplog)
    client.event_hooks["response"] = [*client.event_hooks["response"], watching.record]
    return watching


@pytest.fixture
async def timed(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: Callable[..., httpx.AsyncClient],
    fake_time: FakeTime,
) -> httpx.AsyncClient:
    """A client on an app whose clock the test moves: tokens expire without waiting."""
    return client_for(app=await app_factory(unhurried(settings), Overrides(clock=fake_time)))


def no_private_member(value: Any) -> bool:
    if isinstance(value, dict):
        return not PRIVATE_MEMBERS & set(value) and all(no_private_member(item) for item in value.values())
    if isinstance(value, list):
        return all(no_private_member(item) for item in value)
    return True


async def test_create_read_and_authorize_without_showing_the_key(
    client: httpx.AsyncClient, auth_server: AuthorizationServerThread, witness: Witness
) -> None:
    register(auth_server, "pk-ec", EC_KEY, "ES256", "ec-1")
    traditional = pem_of(EC_KEY, traditional=True)
    body = signed(auth_server.token_url, "pk-ec", traditional, signing_alg="ES256", private_key_id="ec-1")

    response = await client.post("/connectors", json=body)

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"]["state"] == "authorized"
    read = (await client.get(f"/connectors/{created['id']}")).json()
    auth = read["auth"]
    assert auth["client_auth_method"] == "private_key_jwt"
    assert auth["has_private_key"] is True and "has_client_secret" not in auth
    assert (auth["signing_alg"], auth["private_key_id"], auth["assertion_audience"]) == (
        "ES256",
        "ec-1",
        None,
    )
    assert auth["public_jwk"] == auth_server.store.clients["pk-ec"].public_jwk
    assert no_private_member(read) and no_private_member((await client.get("/connectors")).json())

    answer = await authorize(client, created["id"], path="/items")
    assert answer.status_code == 200, answer.text
    token = answer.json()["headers"]["Authorization"].removeprefix("Bearer ")
    record = auth_server.store.find_access_token(token)
    assert record is not None and record.client_id == "pk-ec"
    history = await client.get(f"/connectors/{created['id']}/history")
    assert history.status_code == 200
    witness.assert_never_shown(EC_KEY, traditional, pem_of(EC_KEY))


async def test_a_key_the_provider_does_not_hold_is_refused_on_save_and_at_authorize(
    timed: httpx.AsyncClient, fake_time: FakeTime, auth_server: AuthorizationServerThread
) -> None:
    client = timed
    register(auth_server, "pk-rsa", RSA_KEY, "RS256", None)
    wrong = signed(auth_server.token_url, "pk-rsa", pem_of(OTHER_RSA_KEY))
    assert_problem(await client.post("/connectors", json=wrong), 422, "credentials_rejected")
    assert (await client.get("/connectors")).json()["items"] == []

    body = signed(auth_server.token_url, "pk-rsa", pem_of(RSA_KEY))
    created = (await client.post("/connectors", json=body)).json()
    assert created["status"]["state"] == "authorized"
    assert (await authorize(client, created["id"])).status_code == 200
    # The provider now holds another key; once the token has expired, the next token request is
    # refused, and the refusal sticks: no further request until the connector changes.
    auth_server.store.set_public_jwk("pk-rsa", provider_jwk(pem_of(OTHER_RSA_KEY), "RS256"))
    fake_time.advance(7200)
    requests = auth_server.request_count
    for _ in range(4):
        assert_problem(await authorize(client, created["id"]), 502, "credentials_rejected")
    assert auth_server.request_count == requests + 1
    await recorded_status(client, f"/connectors/{created['id']}", "rejected")


async def test_a_new_key_by_patch_gives_a_new_public_jwk_and_is_the_only_one_used(
    timed: httpx.AsyncClient, fake_time: FakeTime, auth_server: AuthorizationServerThread
) -> None:
    client = timed
    auth_server.store.add_user("svc-user", "CANARY-user-pw")
    register(auth_server, "pk-rotate", RSA_KEY, "PS256", "2025")
    body = signed(
        auth_server.token_url, "pk-rotate", pem_of(RSA_KEY), signing_alg="PS256", private_key_id="2025"
    )
    body["auth"].update(grant_type="password", username="svc-user", password="CANARY-user-pw")
    created = (await client.post("/connectors", json=body)).json()
    url = f"/connectors/{created['id']}"
    first = (await authorize(client, created["id"])).json()["headers"]["Authorization"]

    new_key = ec.generate_private_key(ec.SECP256R1())
    auth_server.store.set_public_jwk("pk-rotate", provider_jwk(pem_of(new_key), "ES256", "2026"))
    before = len(auth_server.store.assertions)
    patched = await client.patch(
        url, json={"auth": {"private_key": pem_of(new_key), "signing_alg": "ES256", "private_key_id": "2026"}}
    )

    assert patched.status_code == 200, patched.text
    auth = patched.json()["auth"]
    assert auth["public_jwk"] == auth_server.store.clients["pk-rotate"].public_jwk
    assert auth["public_jwk"] != created["auth"]["public_jwk"]
    assert (auth["signing_alg"], auth["private_key_id"], auth["grant_type"]) == ("ES256", "2026", "password")
    second = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    # Past the token's life: renewed with the refresh token, which carries an assertion too.
    fake_time.advance(7200)
    third = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    assert len({first, second, third}) == 3
    used = [unverified(assertion) for assertion in auth_server.store.assertions[before:]]
    assert len(used) == 2 and {(header["alg"], header["kid"]) for header, _ in used} == {("ES256", "2026")}
    records = auth_server.store.tokens
    assert len(records) == 3 and records[1].revoked, "the third token came from the refresh grant"


async def test_switching_from_a_client_secret_needs_a_key_and_drops_the_secret(
    client: httpx.AsyncClient, auth_server: AuthorizationServerThread
) -> None:
    register(auth_server, "pk-switch", RSA_KEY, "RS256", None)
    body = payloads.client_credentials(token_url=auth_server.token_url, client_id="pk-switch")
    created = (await client.post("/connectors", json=body, params={"validate": "false"})).json()
    url = f"/connectors/{created['id']}"
    assert created["auth"]["has_client_secret"] is True

    problem = assert_problem(
        await client.patch(url, json={"auth": {"client_auth_method": "private_key_jwt"}}),
        422,
        "invalid_request",
    )
    assert [error["field"] for error in problem["errors"]] == ["auth.private_key"]
    patched = await client.patch(
        url, json={"auth": {"client_auth_method": "private_key_jwt", "private_key": pem_of(RSA_KEY)}}
    )

    assert patched.status_code == 200, patched.text
    auth = patched.json()["auth"]
    assert auth["has_private_key"] is True and "has_client_secret" not in auth
    assert auth["public_jwk"] == auth_server.store.clients["pk-switch"].public_jwk
    assert patched.json()["status"]["state"] == "authorized"
    answer = await authorize(client, created["id"])
    assert answer.status_code == 200, answer.text
