"""What each process holds for authorize, and how changes made elsewhere reach it.

Two apps over one database stand for two replicas: what one changes, the other learns only
through the change log (or, with Redis, a notice that makes it read the log at once).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import delete, func, select, update

from app.connectors.memory import ConnectorMemory, HeldConnector
from app.connectors.models import ChangeSequence, Connector, ConnectorChange
from app.connectors.repository import ChangeRepository
from app.connectors.service import ConnectorService
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.main import Overrides
from app.rotation import rotate
from app.tokens.types import StaticCredential
from tests.conftest import canary
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, counter_tokens
from tests.connectors.test_crud import assert_problem
from tests.support.fakes import FakeTime
from tests.support.redis import RedisServer
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
AppFactory = Callable[..., Awaitable[Any]]
NO_CHECK = {"validate": "false"}


def service_of(app: Any) -> ConnectorService:
    service: ConnectorService = app.state.connectors
    return service


async def _basic(client: httpx.AsyncClient, name: str = "Basic One") -> str:
    response = await client.post("/connectors", json=payloads.basic(name), params=NO_CHECK)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _header(client: httpx.AsyncClient, connector_id: str) -> str:
    response = await authorize(client, connector_id)
    assert response.status_code == 200, response.text
    value: str = response.json()["headers"]["Authorization"]
    return value


async def _new_password(client: httpx.AsyncClient, connector_id: str) -> None:
    response = await client.patch(
        f"/connectors/{connector_id}", json={"auth": {"password": canary("new")}}, params=NO_CHECK
    )
    assert response.status_code == 200, response.text


async def _changed_within(client: httpx.AsyncClient, connector_id: str, before: str, limit: float) -> float:
    """Seconds until ``client``'s app serves something other than ``before``."""
    started = time.monotonic()
    while time.monotonic() - started < limit + 5:
        if await _header(client, connector_id) != before:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError("the change never arrived")


# One process --------------------------------------------------------------------------------------


async def test_a_change_made_here_is_served_at_once(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    # Its follower does not poll during the test: only the write can have replaced the copy.
    app = await app_factory(polled_by_hand(settings))
    client = client_for(app=app)
    connector_id = await _basic(client)
    before = await _header(client, connector_id)
    polls = service_of(app).follower.cursor
    await _new_password(client, connector_id)
    # No poll in between: the write itself replaced the copy.
    assert service_of(app).follower.cursor == polls
    assert await _header(client, connector_id) != before
    assert (await client.delete(f"/connectors/{connector_id}")).status_code == 204
    assert_problem(await authorize(client, connector_id), 404, "connector_not_found")


async def test_every_write_numbers_its_change_in_commit_order(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    first = await _basic(client, "first")
    second = await _basic(client, "second")
    await _new_password(client, first)
    assert (await client.delete(f"/connectors/{second}")).status_code == 204
    db = Database(build_engine(settings.effective_database_url))
    try:
        async with db.read() as session:
            rows = (await session.execute(select(ConnectorChange).order_by(ConnectorChange.seq))).scalars()
            changes = [(row.seq, str(row.connector_id)) for row in rows]
    finally:
        await db.dispose()
    seqs = [seq for seq, _ in changes]
    assert seqs == list(range(seqs[0], seqs[0] + 4)), "numbers have no gaps"
    assert [connector for _, connector in changes] == [first, second, first, second]


# Two processes -------------------------------------------------------------------------------------


async def replicas(
    app_factory: AppFactory, client_for: ClientFor, here: Settings, there: Settings
) -> tuple[Any, httpx.AsyncClient, httpx.AsyncClient]:
    """Two apps over one database, as two replicas: the one the test watches and its client, and
    a client of the other one, where the changes are made."""
    watched = await app_factory(here)
    return watched, client_for(app=watched), client_for(app=await app_factory(there))


def polled_by_hand(settings: Settings) -> Settings:
    """The background follower polls once at start, then only after a minute: the test polls."""
    return settings.model_copy(update={"change_poll_interval_seconds": 60})


async def test_the_follower_brings_changes_deletes_and_status_made_elsewhere(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor, scripted_server: ScriptedServer
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    basic = await _basic(client_there)
    scripted_server.set_default(counter_tokens())
    body = payloads.client_credentials(token_url=scripted_server.url("/oauth/token"))
    created = await client_there.post("/connectors", json=body, params=NO_CHECK)
    oauth = created.json()["id"]
    before = await _header(client_here, basic)
    assert await _header(client_here, oauth) == "Bearer tok-1"

    await _new_password(client_there, basic)
    changed = await client_there.patch(
        f"/connectors/{oauth}", json={"auth": {"scope": "read"}}, params=NO_CHECK
    )
    assert changed.status_code == 200
    # Until this process reads the change log, it serves what it holds; one poll brings both.
    assert await _header(client_here, basic) == before
    assert await service_of(here).follower.poll() >= 2
    assert await _header(client_here, basic) != before
    assert await _header(client_here, oauth) == "Bearer tok-2"
    assert scripted_server.requests[-1].form()["scope"] == "read"

    # A status recorded elsewhere (the provider now refuses the credentials) is held here too.
    scripted_server.set_default(Reply.json({"error": "invalid_client"}, status=401))
    validated = await client_there.post(f"/connectors/{oauth}/validate")
    assert validated.json()["status"]["state"] == "rejected"
    await service_of(here).follower.poll()
    requests = scripted_server.count
    assert_problem(await authorize(client_here, oauth), 502, "credentials_rejected")
    assert scripted_server.count == requests, "a rejected connector is answered without a request"

    assert (await client_there.delete(f"/connectors/{basic}")).status_code == 204
    await service_of(here).follower.poll()
    assert_problem(await authorize(client_here, basic), 404, "connector_not_found")


async def test_without_a_push_a_change_is_served_within_two_seconds(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    _, client_here, client_there = await replicas(app_factory, client_for, settings, settings)
    connector_id = await _basic(client_there)
    before = await _header(client_here, connector_id)
    await _new_password(client_there, connector_id)
    lag = await _changed_within(client_here, connector_id, before, 2.0)
    # The bound: one poll interval (1 s) plus one query.
    assert lag < 2.0, f"served the old copy for {lag:.2f} s"


async def test_with_a_push_a_change_is_served_within_one_second(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor, own_redis: RedisServer
) -> None:
    # A poll interval far beyond the bound: only the notice can bring the change in time.
    update = {"redis_url": SecretStr(own_redis.url), "change_poll_interval_seconds": 30}
    shared = settings.model_copy(update=update)
    here, there = await app_factory(shared), await app_factory(shared)
    for app in (here, there):
        await asyncio.wait_for(app.state.broadcast.subscribed.wait(), 10)
    client_here, client_there = client_for(app=here), client_for(app=there)
    connector_id = await _basic(client_there)
    before = await _header(client_here, connector_id)
    await _new_password(client_there, connector_id)
    lag = await _changed_within(client_here, connector_id, before, 1.0)
    assert lag < 1.0, f"served the old copy for {lag:.2f} s"


async def test_pruned_changes_make_a_follower_refresh_everything_it_holds(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    connector_id = await _basic(client_there)
    before = await _header(client_here, connector_id)
    await _new_password(client_there, connector_id)
    await _new_password(client_there, await _basic(client_there, "other"))
    db = Database(build_engine(settings.effective_database_url))
    try:
        async with db.write() as session:
            newest = (await session.execute(select(func.max(ConnectorChange.seq)))).scalar_one()
            await session.execute(delete(ConnectorChange).where(ConnectorChange.seq < newest))
    finally:
        await db.dispose()
    await service_of(here).follower.poll()
    assert await _header(client_here, connector_id) != before


# Staleness -------------------------------------------------------------------------------------


async def test_past_the_staleness_limit_authorize_answers_503_until_the_follower_hears_again(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor, fake_time: FakeTime
) -> None:
    limited = polled_by_hand(settings).model_copy(update={"max_staleness_seconds": 200})
    app = await app_factory(limited, Overrides(clock=fake_time))
    client = client_for(app=app)
    connector_id = await _basic(client)
    await _header(client, connector_id)
    fake_time.advance(199)
    await _header(client, connector_id)
    fake_time.advance(2)
    refused = await authorize(client, connector_id)
    assert_problem(refused, 503, "database_unavailable")
    assert refused.headers["retry-after"] == "5"
    await service_of(app).follower.poll()
    await _header(client, connector_id)


# Bounds -----------------------------------------------------------------------------------------


async def test_held_connectors_are_bounded_and_the_least_recently_used_goes_first(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    app = await app_factory(settings.model_copy(update={"connector_cache_size": 3}))
    client = client_for(app=app)
    service = service_of(app)
    ids = [await _basic(client, f"connector {i}") for i in range(5)]
    for connector_id in ids:
        await _header(client, connector_id)
    assert len(service.memory) == 3
    held = set(service.memory.held_ids())
    assert held == {uuid.UUID(connector_id) for connector_id in ids[2:]}
    # A use makes it the most recent: the next one to go is the oldest unused.
    await _header(client, ids[2])
    await _header(client, ids[0])
    assert set(service.memory.held_ids()) == {uuid.UUID(i) for i in (ids[0], ids[2], ids[4])}


async def test_concurrent_misses_share_one_load() -> None:
    memory = ConnectorMemory(10)
    loads = 0
    release = asyncio.Event()

    async def load() -> HeldConnector:
        nonlocal loads
        loads += 1
        await release.wait()
        return _held(change_seq=1)

    key = uuid.uuid4()
    waiting = [asyncio.create_task(memory.load("org-a", key, load)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiting)
    assert loads == 1
    assert all(result is results[0] for result in results)
    assert memory.get(key) is results[0]


async def test_a_change_seen_during_a_load_makes_it_load_again() -> None:
    memory = ConnectorMemory(10)
    answers = [_held(change_seq=1), _held(change_seq=2)]
    started, release = asyncio.Event(), asyncio.Event()

    async def load() -> HeldConnector:
        started.set()
        await release.wait()
        return answers.pop(0)

    key = uuid.uuid4()
    waiting = asyncio.create_task(memory.load("org-a", key, load))
    await started.wait()
    assert memory.changed(key) is False  # not held yet, but its load is now stale
    release.set()
    held = await waiting
    assert held is not None
    assert held.change_seq == 2
    assert answers == []


async def test_an_older_copy_never_replaces_a_newer_one() -> None:
    memory = ConnectorMemory(10)
    key = uuid.uuid4()
    assert memory.offer(key, _held(change_seq=5))
    assert not memory.offer(key, _held(change_seq=4))
    held = memory.get(key)
    assert held is not None
    assert held.change_seq == 5


def _held(change_seq: int) -> HeldConnector:
    return HeldConnector(
        organization_id="org-a",
        version=1,
        change_seq=change_seq,
        base_url="https://api.example.com",
        origin="https://api.example.com",
        state="unverified",
        auth_type="basic",
        grant_type=None,
        public={},
        sealed={},
        credential=StaticCredential(headers={"Authorization": "Basic x"}),
    )


# What the follower must survive -------------------------------------------------------------------


async def _write(settings: Settings, *statements: Any) -> None:
    db = Database(build_engine(settings.effective_database_url))
    try:
        async with db.write() as session:
            for statement in statements:
                await session.execute(statement)
    finally:
        await db.dispose()


async def test_changes_pruned_with_nothing_newer_still_refresh_what_is_held(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    connector_id = await _basic(client_there)
    before = await _header(client_here, connector_id)
    await service_of(here).follower.poll()
    await _new_password(client_there, connector_id)
    await _write(settings, delete(ConnectorChange))
    await service_of(here).follower.poll()
    assert await _header(client_here, connector_id) != before


async def test_a_counter_that_went_back_replaces_every_held_copy(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    connector_id = await _basic(client_there)
    await _new_password(client_there, connector_id)
    await service_of(here).follower.poll()
    before = await _header(client_here, connector_id)
    # As after restoring an older backup: the counter and the row's number are lower than held.
    await _new_password(client_there, connector_id)
    await _write(
        settings,
        update(ChangeSequence).values(last_seq=1),
        update(Connector).values(change_seq=1),
        delete(ConnectorChange),
    )
    await service_of(here).follower.poll()
    assert await _header(client_here, connector_id) != before
    assert service_of(here).follower.cursor == 1


async def test_the_first_poll_rereads_what_was_held_before_it(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    connector_id = await _basic(client_here)
    before = await _header(client_here, connector_id)
    await _new_password(client_there, connector_id)
    service_of(here).follower.cursor = None  # as when the database was away at start
    await service_of(here).follower.poll()
    assert await _header(client_here, connector_id) != before


async def test_a_row_that_cannot_be_opened_answers_its_problem_and_following_goes_on(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    here, client_here, client_there = await replicas(
        app_factory, client_for, polled_by_hand(settings), settings
    )
    broken, fine = await _basic(client_there, "broken"), await _basic(client_there, "fine")
    await _header(client_here, broken)
    before = await _header(client_here, fine)
    await service_of(here).follower.poll()
    await _new_password(client_there, fine)
    # A secret this key ring cannot open (written under a key it lacks, say), and its change.
    await _new_password(client_there, broken)
    await _write(
        settings,
        update(Connector).where(Connector.id == uuid.UUID(broken)).values(secrets={"password": "v1:k9:AAAA"}),
    )
    await service_of(here).follower.poll()
    assert await _header(client_here, fine) != before
    # The old header is no longer served: the new copy is held, and answers its problem.
    assert_problem(await authorize(client_here, broken), 500, "secret_unreadable")
    held = service_of(here).memory.get(uuid.UUID(broken))
    assert held is not None and held.unreadable


async def test_a_rejection_outlives_no_evicted_copy(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor, scripted_server: ScriptedServer
) -> None:
    here = await app_factory(polled_by_hand(settings).model_copy(update={"connector_cache_size": 1}))
    there = await app_factory(settings)
    client_here, client_there = client_for(app=here), client_for(app=there)
    scripted_server.set_default(Reply.json({"error": "invalid_client"}, status=401))
    body = payloads.client_credentials(token_url=scripted_server.url("/oauth/token"))
    oauth = (await client_there.post("/connectors", json=body, params=NO_CHECK)).json()["id"]
    assert_problem(await authorize(client_here, oauth), 502, "credentials_rejected")
    await _header(client_here, await _basic(client_there))  # evicts the OAuth copy, not its tokens
    await service_of(here).follower.poll()
    scripted_server.set_default(counter_tokens())
    validated = await client_there.post(f"/connectors/{oauth}/validate")
    assert validated.json()["status"]["state"] == "authorized"
    await service_of(here).follower.poll()
    assert await _header(client_here, oauth) == "Bearer tok-2"


async def test_key_rotation_beside_live_writes_neither_deadlocks_nor_loses_a_change(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor
) -> None:
    client = client_for(app=await app_factory(settings))
    ids = [await _basic(client, f"connector {i}") for i in range(5)]
    # Restarted with a new key first, as the README says, then rotated while serving.
    assert settings.encryption_keys is not None
    newer = f"k2:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"
    both = SecretStr(f"{newer},{settings.encryption_keys.get_secret_value()}")
    rotated_settings = settings.model_copy(update={"encryption_keys": both})
    app = await app_factory(rotated_settings)
    client = client_for(app=app)
    db = Database(build_engine(settings.effective_database_url))
    try:
        rotation = asyncio.create_task(rotate(db, KeyRing.from_settings(rotated_settings), batch_size=2))
        await asyncio.gather(*(_new_password(client, connector_id) for connector_id in ids))
        report = await rotation
    finally:
        await db.dispose()
    assert report.failed == 0
    await service_of(app).follower.poll()
    for connector_id in ids:
        await _header(client, connector_id)


async def test_pruning_deletes_only_changes_older_than_the_retention(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    await _basic(client)
    db = Database(build_engine(settings.effective_database_url))
    try:
        async with db.read() as session:
            (changed_at,) = (await session.execute(select(ConnectorChange.changed_at))).scalars()
        for before, left in ((changed_at, 1), (changed_at + timedelta(microseconds=1), 0)):
            async with db.write() as session:
                await ChangeRepository(session).prune(before)
            async with db.read() as session:
                assert (
                    await session.execute(select(func.count()).select_from(ConnectorChange))
                ).scalar_one() == left
    finally:
        await db.dispose()
