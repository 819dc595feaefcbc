"""Stored secrets the key ring cannot open: a problem of its own, logged once, never a bare 500.

Connectors are written by one app; a second app over the same database has a key ring with the
same key id and other bytes, as a service restarted with a wrong CONNECTORS_ENCRYPTION_KEYS.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from app.connectors.models import Connector
from app.core.config import Settings
from app.core.db import Database, build_engine
from app.core.logs import JSONFormatter
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, token_reply
from tests.connectors.test_crud import assert_problem, create
from tests.support.servers import ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
AppFactory = Callable[..., Awaitable[Any]]
MESSAGE = "a stored secret cannot be decrypted"


@pytest.fixture
async def wrong_key(app_factory: AppFactory, settings: Settings, client_for: ClientFor) -> httpx.AsyncClient:
    """A client of an app whose key k1 has other bytes than the one that wrote the data."""
    other = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    app = await app_factory(settings.model_copy(update={"encryption_keys": SecretStr(f"k1:{other}")}))
    return client_for("org-a", app=app)


@pytest.fixture
def token_server(scripted_server: ScriptedServer) -> ScriptedServer:
    scripted_server.set_default(token_reply("tok"))
    return scripted_server


async def _ciphertexts(database_url: str) -> list[str]:
    db = Database(build_engine(database_url))
    try:
        async with db.read() as session:
            rows = (await session.execute(select(Connector))).scalars()
            return [token.rsplit(":", 1)[1] for row in rows for token in row.secrets.values()]
    finally:
        await db.dispose()


async def _assert_logged_once(
    caplog: pytest.LogCaptureFixture, database_url: str, connector_id: str, answer: httpx.Response
) -> None:
    """One error record for the occurrence, naming the connector and the key id; no ciphertext
    in the log or the answer."""
    records = [r for r in caplog.records if r.getMessage() == MESSAGE]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.ERROR
    assert record.__dict__["connector"] == connector_id
    assert record.__dict__["key_id"] == "k1"
    lines = [JSONFormatter().format(r) for r in caplog.records]
    for ciphertext in await _ciphertexts(database_url):
        assert not any(ciphertext in line for line in lines)
        assert ciphertext not in answer.text
    assert not any("unexpected error" in r.getMessage() for r in caplog.records)
    caplog.clear()


def _oauth(token_server: ScriptedServer, name: str = "OAuth One") -> dict[str, Any]:
    return payloads.client_credentials(name=name, token_url=token_server.url("/oauth/token"))


@pytest.mark.parametrize("kind", ["basic", "client_credentials", "password_grant"])
async def test_authorize_answers_secret_unreadable(
    client: httpx.AsyncClient,
    wrong_key: httpx.AsyncClient,
    token_server: ScriptedServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    body = getattr(payloads, kind)(**({} if kind == "basic" else {"token_url": token_server.url("/t")}))
    connector_id = (await create(client, body))["id"]
    caplog.clear()
    answer = await authorize(wrong_key, connector_id, path="/x")
    assert_problem(answer, 500, "secret_unreadable")
    await _assert_logged_once(caplog, database_url, connector_id, answer)
    # The same stored value is not logged again, however often it is asked for.
    for _ in range(3):
        assert_problem(await authorize(wrong_key, connector_id, path="/x"), 500, "secret_unreadable")
    assert not [r for r in caplog.records if r.getMessage() == MESSAGE]
    # No token request was sent, and the connector was not taken for rejected.
    assert token_server.count == 0
    assert (await wrong_key.get(f"/connectors/{connector_id}")).json()["status"]["state"] == "unverified"


async def test_validate_answers_secret_unreadable(
    client: httpx.AsyncClient,
    wrong_key: httpx.AsyncClient,
    token_server: ScriptedServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    connector_id = (await create(client, _oauth(token_server)))["id"]
    caplog.clear()
    answer = await wrong_key.post(f"/connectors/{connector_id}/validate")
    assert_problem(answer, 500, "secret_unreadable")
    await _assert_logged_once(caplog, database_url, connector_id, answer)
    assert token_server.count == 0
    assert (await wrong_key.get(f"/connectors/{connector_id}")).json()["status"]["state"] == "unverified"


@pytest.mark.parametrize(
    ("kind", "auth"),
    [("basic", {"username": "someone-else"}), ("oauth2", {"scope": "read"})],
)
async def test_an_update_that_needs_the_secrets_answers_secret_unreadable(
    client: httpx.AsyncClient,
    wrong_key: httpx.AsyncClient,
    token_server: ScriptedServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    auth: dict[str, Any],
) -> None:
    body = payloads.basic() if kind == "basic" else _oauth(token_server)
    created = await create(client, body)
    caplog.clear()
    answer = await wrong_key.patch(
        f"/connectors/{created['id']}", json={"auth": auth}, params={"validate": "false"}
    )
    assert_problem(answer, 500, "secret_unreadable")
    await _assert_logged_once(caplog, database_url, created["id"], answer)
    assert (await wrong_key.get(f"/connectors/{created['id']}")).json() == created


@pytest.mark.parametrize("kind", ["basic", "oauth2"])
async def test_a_rename_needs_no_secret(
    client: httpx.AsyncClient,
    wrong_key: httpx.AsyncClient,
    token_server: ScriptedServer,
    kind: str,
) -> None:
    body = payloads.basic() if kind == "basic" else _oauth(token_server)
    created = await create(client, body)
    url = f"/connectors/{created['id']}"
    renamed = await wrong_key.patch(url, json={"name": "Renamed"}, headers={"If-Match": '"1"'})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["version"]) == ("Renamed", 2)

    # Restating stored auth values, as a form sending the whole object back would, is no change.
    restated = {k: v for k, v in body["auth"].items() if k not in ("password", "client_secret")}
    again = await wrong_key.patch(url, json={"name": "Renamed again", "auth": restated})
    assert again.status_code == 200, again.text
    assert (again.json()["name"], again.json()["version"]) == ("Renamed again", 3)
    assert again.json()["auth"] == created["auth"]

    # Authorize still names the problem; the app with the right key serves the renamed connector.
    assert_problem(await authorize(wrong_key, created["id"], path="/x"), 500, "secret_unreadable")
    assert (await authorize(client, created["id"], path="/x")).status_code == 200
