"""A status learned while the database is away (a token request refused during an outage) is
written, with its webhook event, once the database is back. PostgreSQL of the test's own, which
it stops and starts; the app in process, on fake time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.core.db import Database, build_engine
from app.main import Overrides
from app.migrations import upgrade
from app.webhooks.models import WebhookEvent
from tests.conftest import suite_settings
from tests.connectors import payloads
from tests.connectors.test_authorize import token_reply
from tests.support.fakes import FakeTime
from tests.support.postgres import PostgresServer
from tests.support.servers import Reply, ScriptedServer
from tests.support.tls import LocalCA


@pytest.fixture
def settings(own_postgres: PostgresServer, local_ca: LocalCA, tmp_path: Path) -> Settings:
    return suite_settings(
        own_postgres.url,
        tmp_path,
        local_ca,
        # The fake clock jumps hours ahead: what is held stays trusted.
        max_staleness_seconds=86_400,
        change_poll_interval_seconds=0.1,
    )


async def test_a_status_learned_during_an_outage_is_written_when_the_database_is_back(
    settings: Settings,
    own_postgres: PostgresServer,
    app_factory: Callable[..., Any],
    make_token: Callable[..., str],
    scripted_server: ScriptedServer,
    fake_time: FakeTime,
) -> None:
    await upgrade(own_postgres.url)
    app = await app_factory(settings, Overrides(clock=fake_time))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {make_token('org-a')}"},
    )
    db = Database(build_engine(own_postgres.url))
    try:
        hook = await client.post("/webhooks", json={"url": "https://127.0.0.1:9/hooks"})
        assert hook.status_code == 201, hook.text
        scripted_server.set_default(token_reply("first", expires_in=3600))
        body = payloads.client_credentials(token_url=scripted_server.url("/oauth/token"))
        created = await client.post("/connectors", json=body)
        assert created.status_code == 201, created.text
        connector_id = created.json()["id"]
        assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200

        await asyncio.to_thread(own_postgres.stop)
        # The token expires; the provider now refuses the client: the connector is rejected.
        scripted_server.set_default(Reply.json({"error": "invalid_client"}, status=401))
        fake_time.advance(7200)
        learned_at = fake_time.now()
        refused = await client.post(f"/connectors/{connector_id}/authorize", json={})
        assert refused.json()["code"] == "credentials_rejected"
        # The status is held, its write failed: it waits for the database.
        service = app.state.connectors
        async with asyncio.timeout(30):
            while uuid.UUID(connector_id) not in service.status.unwritten:
                await asyncio.sleep(0.01)

        await asyncio.to_thread(own_postgres.start)
        async with asyncio.timeout(30):
            while True:
                answer = await client.get(f"/connectors/{connector_id}")
                if answer.status_code == 200 and answer.json()["status"]["state"] == "rejected":
                    break
                await asyncio.sleep(0.05)
        status = answer.json()["status"]
        assert status["checked_at"] == learned_at.isoformat().replace("+00:00", "Z")
        async with db.read() as session:
            events = (
                (
                    await session.execute(
                        select(WebhookEvent).where(WebhookEvent.type == "connector.status_changed")
                    )
                )
                .scalars()
                .all()
            )
        changes = [json.loads(event.payload)["data"] for event in events]
        assert [(c["previous_state"], c["state"]) for c in changes][-1] == ("authorized", "rejected")
    finally:
        await client.aclose()
        await db.dispose()
