"""The outbox: every connector change and status change writes its event, and its deliveries, in
the change's own transaction; a refused or rolled-back change writes none. Through the real app,
on SQLite and PostgreSQL; nothing is delivered here (see test_delivery)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription
from app.webhooks.secrets import generate_secret, seal_secret
from tests.conftest import CANARY
from tests.connectors import payloads
from tests.connectors.test_crud import NO_CHECK, create
from tests.support.servers import Reply, ScriptedServer


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(build_engine(settings.effective_database_url))
    try:
        yield database
    finally:
        await database.dispose()


async def subscribe(
    db: Database,
    settings: Settings,
    *,
    org: str = "org-a",
    types: list[str] | None = None,
    enabled: bool = True,
) -> uuid.UUID:
    subscription_id = uuid.uuid4()
    keyring = KeyRing.from_settings(settings)
    now = datetime.now(UTC)
    async with db.write() as session:
        session.add(
            WebhookSubscription(
                id=subscription_id,
                organization_id=org,
                url="https://127.0.0.1:9/hooks",
                event_types=types or [],
                enabled=enabled,
                secret=seal_secret(keyring, org, subscription_id, generate_secret()),
                key_id=keyring.primary_key_id,
                state="active",
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
    return subscription_id


async def events(db: Database) -> list[tuple[WebhookEvent, list[uuid.UUID]]]:
    """The events written so far, oldest first, each with the subscriptions it is queued for."""
    async with db.read() as session:
        rows = (await session.execute(select(WebhookEvent).order_by(WebhookEvent.created_at))).scalars().all()
        deliveries = (await session.execute(select(WebhookDelivery))).scalars().all()
    return [(row, sorted(d.subscription_id for d in deliveries if d.event_id == row.id)) for row in rows]


def body(event: WebhookEvent) -> dict[str, Any]:
    assert CANARY not in event.payload
    parsed: dict[str, Any] = json.loads(event.payload)
    assert set(parsed) == {"type", "timestamp", "data"}
    assert parsed["type"] == event.type
    assert parsed["timestamp"].endswith("Z")
    return parsed


async def test_a_change_is_queued_for_each_subscription_that_wants_it(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    every = await subscribe(db, settings)
    deletes_only = await subscribe(db, settings, types=["connector.deleted"])
    await subscribe(db, settings, enabled=False)
    await subscribe(db, settings, org="org-b")

    created = await create(client, payloads.basic())

    [(event, queued)] = await events(db)
    assert event.type == "connector.created" and event.organization_id == "org-a"
    assert queued == [every]
    data = body(event)["data"]
    assert data == {
        "connector_id": created["id"],
        "organization_id": "org-a",
        "name": "Basic One",
        "auth_type": "basic",
        "version": 1,
        "status": "unverified",
    }

    assert (await client.delete(f"/connectors/{created['id']}")).status_code == 204
    (_, _), (deleted, queued) = await events(db)
    assert deleted.type == "connector.deleted" and queued == sorted([every, deletes_only])
    assert body(deleted)["data"] == {
        "connector_id": created["id"],
        "organization_id": "org-a",
        "name": "Basic One",
    }


async def test_an_update_names_the_fields_it_changed_never_their_values(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    created = await create(client, payloads.client_credentials())
    await subscribe(db, settings)

    response = await client.patch(
        f"/connectors/{created['id']}",
        json={"name": "Renamed", "auth": {"client_secret": f"{CANARY}-rotated"}},
        params=NO_CHECK,
    )

    assert response.status_code == 200, response.text
    [(event, _)] = await events(db)
    data = body(event)["data"]
    assert event.type == "connector.updated"
    assert data["changed_fields"] == ["name", "auth.client_secret"]
    assert (data["name"], data["version"]) == ("Renamed", 2)


async def test_a_refused_change_writes_no_event(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    created = await create(client, payloads.basic())
    await subscribe(db, settings)

    taken = await client.post("/connectors", json=payloads.basic(), params=NO_CHECK)
    stale = await client.patch(
        f"/connectors/{created['id']}", json={"name": "Other"}, headers={"If-Match": '"7"'}, params=NO_CHECK
    )
    unchanged = await client.patch(
        f"/connectors/{created['id']}", json={"name": "Basic One"}, params=NO_CHECK
    )

    assert (taken.status_code, stale.status_code, unchanged.status_code) == (409, 412, 200)
    assert await events(db) == []


async def test_no_subscription_no_event(client: httpx.AsyncClient, db: Database) -> None:
    await create(client, payloads.basic())
    assert await events(db) == []


async def test_a_validate_that_changes_the_state_is_an_event(
    client: httpx.AsyncClient, db: Database, settings: Settings, scripted_server: ScriptedServer
) -> None:
    created = await create(client, payloads.basic(validation_url=scripted_server.url("/check")))
    await subscribe(db, settings, types=["connector.status_changed"])
    scripted_server.set_default(Reply(status=401))

    first = await client.post(f"/connectors/{created['id']}/validate")
    assert first.json()["status"]["state"] == "rejected"

    [(event, _)] = await events(db)
    data = body(event)["data"]
    assert event.type == "connector.status_changed"
    assert {k: data[k] for k in ("connector_id", "previous_state", "state", "error_code")} == {
        "connector_id": created["id"],
        "previous_state": "unverified",
        "state": "rejected",
        "error_code": "credentials_rejected",
    }
    assert data["changed_at"].endswith("Z")


async def test_a_token_request_refused_at_authorize_is_an_event(
    client: httpx.AsyncClient, db: Database, settings: Settings, scripted_server: ScriptedServer
) -> None:
    # The provider stopped accepting the client: the connector breaks while flows use it.
    created = await create(client, payloads.client_credentials(token_url=scripted_server.url("/token")))
    await subscribe(db, settings)
    scripted_server.set_default(Reply.json({"error": "invalid_client"}, status=401))

    answer = await client.post(f"/connectors/{created['id']}/authorize", json={})
    assert answer.status_code == 502

    # The status write runs in the background, after the answer.
    async with asyncio.timeout(10):
        while not (written := await events(db)):
            await asyncio.sleep(0.02)
    [(event, _)] = written
    data = body(event)["data"]
    assert event.type == "connector.status_changed"
    assert (data["previous_state"], data["state"], data["error_code"]) == (
        "unverified",
        "rejected",
        "credentials_rejected",
    )
    assert set(data) == {
        "connector_id",
        "organization_id",
        "version",
        "previous_state",
        "state",
        "error_code",
        "provider_error",
        "changed_at",
    }
