"""Pieces of the connector service on their own. The status recorder: outcomes written in order
with their events, and kept while the database is away (a fake event recorder notes what it is
told; a fake stands in for the database while it is away). Validate: concurrent calls share one
check (a fake live check, held back). The follower's refresh of what is held (a fake token cache
notes what it is told to forget). The rest is real, over SQLite."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.connectors.models import Connector
from app.connectors.repository import ConnectorRepository
from app.connectors.service import ConnectorService, StatusRecorder
from app.core.config import Settings
from app.core.db import Database
from app.core.errors import DatabaseUnavailable
from tests.conftest import sqlite_settings
from tests.connectors import payloads
from tests.support.fakes import FakeTime
from tests.support.tls import LocalCA


@pytest.fixture
def settings(tmp_path: Path, local_ca: LocalCA) -> Settings:
    return sqlite_settings(tmp_path, local_ca)


class NotedEvents:
    """An event recorder that notes each status change it is told of."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []

    async def __call__(
        self, session: object, organization_id: str, event_type: str, data: Mapping[str, Any], *, at: datetime
    ) -> None:
        self.changes.append((event_type, data["previous_state"], data["state"]))


class SwitchableDatabase:
    """The real database, or, while ``away``, one whose writes fail as an unreachable one does."""

    def __init__(self, real: Database) -> None:
        self.real = real
        self.away = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        if self.away:
            raise DatabaseUnavailable()
        async with self.real.write() as session:
            yield session


async def held_basic(
    client: httpx.AsyncClient, app: Any
) -> tuple[uuid.UUID, StatusRecorder, ConnectorService]:
    created = await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})
    assert created.status_code == 201, created.text
    connector_id = created.json()["id"]
    # An authorize loads it into memory: what the recorder's outcomes apply to.
    assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200
    service: ConnectorService = app.state.connectors
    return uuid.UUID(connector_id), service.status, service


async def stored(client: httpx.AsyncClient, connector_id: uuid.UUID) -> dict[str, Any]:
    status: dict[str, Any] = (await client.get(f"/connectors/{connector_id}")).json()["status"]
    return status


async def test_outcomes_are_written_in_the_order_they_happened(client: httpx.AsyncClient, app: Any) -> None:
    connector_id, recorder, service = await held_basic(client, app)
    events = recorder.record_event = NotedEvents()
    key = (connector_id, 1)
    # Three outcomes at once: each write waits for the one before.
    await recorder.record_outcome(key, "authorized", None)
    await recorder.record_outcome(key, "unreachable", "upstream_unreachable")
    await recorder.record_outcome(key, "authorized", None)
    await recorder.record_outcome(key, "authorized", None)  # no change: nothing to write
    await service.background.drain()
    assert events.changes == [
        ("connector.status_changed", "unverified", "authorized"),
        ("connector.status_changed", "authorized", "unreachable"),
        ("connector.status_changed", "unreachable", "authorized"),
    ]
    assert (await stored(client, connector_id))["state"] == "authorized"
    # An outcome for another version than the one held is not the connector's any more.
    await recorder.record_outcome((connector_id, 2), "rejected", "credentials_rejected")
    await service.background.drain()
    assert len(events.changes) == 3


async def test_a_status_learned_while_away_is_written_when_back_with_when_it_was_learned(
    client: httpx.AsyncClient, app: Any, fake_time: FakeTime
) -> None:
    connector_id, recorder, service = await held_basic(client, app)
    events = recorder.record_event = NotedEvents()
    database = SwitchableDatabase(recorder.db)
    recorder.db = database  # type: ignore[assignment]
    recorder.clock = fake_time
    key = (connector_id, 1)

    database.away = True
    await recorder.record_outcome(key, "rejected", "credentials_rejected: invalid_client")
    fake_time.advance(60)
    learned = fake_time.now()
    await recorder.record_outcome(key, "unreachable", "upstream_unreachable")
    fake_time.advance(60)
    await service.background.drain()
    assert events.changes == []
    assert recorder.unwritten[connector_id].was == "unverified"

    database.away = False
    recorder.write_unwritten()
    await service.background.drain()
    # One change, from what is stored to what is true now, recorded at when it was learned.
    assert events.changes == [("connector.status_changed", "unverified", "unreachable")]
    status = await stored(client, connector_id)
    assert status["state"] == "unreachable"
    assert status["checked_at"] == learned.isoformat().replace("+00:00", "Z")
    assert recorder.unwritten == {}


async def test_a_status_changed_and_changed_back_while_away_writes_nothing(
    client: httpx.AsyncClient, app: Any
) -> None:
    connector_id, recorder, service = await held_basic(client, app)
    events = recorder.record_event = NotedEvents()
    database = SwitchableDatabase(recorder.db)
    recorder.db = database  # type: ignore[assignment]
    key = (connector_id, 1)
    await recorder.record_outcome(key, "authorized", None)
    await service.background.drain()

    database.away = True
    await recorder.record_outcome(key, "unreachable", "upstream_unreachable")
    await recorder.record_outcome(key, "authorized", None)
    await service.background.drain()
    database.away = False
    recorder.write_unwritten()
    await service.background.drain()
    assert events.changes == [("connector.status_changed", "unverified", "authorized")]
    assert recorder.unwritten == {}


class GatedChecker:
    """A live check that waits for ``gate``, counting the checks made (``CheckTools``)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.checks = 0

    async def static(self, url: str, credential: object) -> None:
        self.checks += 1
        await self.gate.wait()

    async def token(self, config: object) -> Any:
        raise AssertionError("no token request in this test")


async def test_concurrent_validates_share_one_check_and_its_answer(
    client: httpx.AsyncClient, app: Any
) -> None:
    """The service's validate on its own, with a fake live check: ten callers, one check."""
    connector_id, _, service = await held_basic(client, app)
    checker = service.checker = GatedChecker()
    callers = [asyncio.create_task(service.validate("org-a", connector_id)) for _ in range(10)]
    while checker.checks == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)
    # One caller giving up does not end the check for the others.
    callers[0].cancel()
    checker.gate.set()
    answers = await asyncio.gather(*callers[1:])
    assert checker.checks == 1
    assert {answer.connector.status.state for answer in answers} == {"authorized"}
    assert {answer.retry_after for answer in answers} == {None}
    # Within the interval, another call checks nothing and says when the next may run.
    again = await service.validate("org-a", connector_id)
    assert checker.checks == 1 and again.retry_after is not None


class NotedForgets:
    """Token cache stand-in for the follower's refresh: notes which connectors' tokens go."""

    def __init__(self) -> None:
        self.forgotten: list[uuid.UUID] = []

    def forget(self, connector_id: Any) -> None:
        self.forgotten.append(connector_id)


async def test_the_followers_refresh_holds_a_newer_copy_and_drops_a_deleted_one(
    client: httpx.AsyncClient, app: Any
) -> None:
    """What the follower hands the service, on its own: a row changed by another replica (a new
    version) replaces the copy held, and its tokens go; a connector no longer found is dropped."""
    connector_id, _, service = await held_basic(client, app)
    tokens = service.tokens = NotedForgets()  # type: ignore[assignment]
    key = ("org-a", connector_id)
    async with service.db.write() as session:
        await session.execute(
            update(Connector)
            .where(Connector.id == connector_id)
            .values(version=2, change_seq=Connector.change_seq + 1, name="Renamed elsewhere")
        )
    assert list(service._changed([key, key])) == [key]  # held: read it again (once)
    async with service.db.read() as session:
        row = await ConnectorRepository(session).get("org-a", connector_id)
    assert row is not None
    service._refresh([row], [key])
    held = service.memory.peek(connector_id)
    assert held is not None and held.version == 2
    assert tokens.forgotten == [connector_id]
    # An older copy offered later (a late read) does not replace the newer one.
    stale = dataclasses.replace(held, version=1, change_seq=held.change_seq - 1)
    assert not service.memory.offer(connector_id, stale)
    # Asked for, and not found: deleted elsewhere.
    service._refresh([], [key])
    assert service.memory.peek(connector_id) is None
    assert tokens.forgotten == [connector_id, connector_id]
