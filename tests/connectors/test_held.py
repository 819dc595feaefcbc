"""How a process comes to hold connectors, on SQLite and PostgreSQL: misses share queries
(``app.connectors.misses``) and answer each caller only with its own organization's connector;
a starting process fills its memory (``preload``), first with the connectors called lately
(``app.connectors.usage``)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from app.connectors import preload as preload_module
from app.connectors.misses import Misses
from app.connectors.models import Connector
from app.connectors.preload import Preload
from app.connectors.repository import ConnectorRepository
from app.core.config import Settings
from app.main import Overrides
from tests.connectors import payloads
from tests.connectors.test_crud import assert_problem
from tests.support.fakes import FakeTime

ORGANIZATIONS = 6
NO_CHECK = {"validate": "false"}


@contextlib.contextmanager
def connector_reads(app: Any) -> Iterator[list[str]]:
    """The statements that read connectors while the block runs, as the driver is given them."""
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM connectors" in statement:
            reads.append(statement)

    db = app.state.connectors.db
    # The misses' and preload's reads run on the SQLite file's reader (Database.scalars).
    engines = [db.engine.sync_engine, *([db._reader] if db._reader is not None else [])]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        yield reads
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)


def preload(service: Any, page: int) -> Preload:
    """A preload of the service's memory from the start, ``page`` connectors a query."""
    return Preload(service.db, service.memory, service.held_from, service.clock, ready_wait=0, page=page)


async def basics(client: httpx.AsyncClient, count: int) -> list[str]:
    """The ids of ``count`` new Basic connectors of the client's organization (no live check)."""
    made = []
    for index in range(count):
        created = await client.post("/connectors", json=payloads.basic(f"C{index}"), params=NO_CHECK)
        assert created.status_code == 201, created.text
        made.append(created.json()["id"])
    return made


async def test_concurrent_misses_share_one_query_and_answer_only_their_own_organization(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    # Connectors written through one app; another app on the same database holds none of them.
    writer = await app_factory(settings)
    made: dict[str, list[str]] = {}
    for number in range(ORGANIZATIONS):
        org = f"org-{number}"
        made[org] = await basics(client_for(org, app=writer), 3)
    gone = made["org-0"].pop()
    assert (await client_for("org-0", app=writer).delete(f"/connectors/{gone}")).status_code == 204

    # Not filled at its start: every call below is a miss.
    fresh = await app_factory(settings.model_copy(update={"preload_connectors": False}))
    calls = [
        client_for(org, app=fresh).post(f"/connectors/{connector_id}/authorize", json={})
        for org, ids in made.items()
        for connector_id in ids
    ]
    # Another organization's connector, a deleted one and one that never was: all not found.
    strangers = [
        client_for("org-1", app=fresh).post(f"/connectors/{made['org-2'][0]}/authorize", json={}),
        client_for("org-0", app=fresh).post(f"/connectors/{gone}/authorize", json={}),
        client_for("org-0", app=fresh).post(f"/connectors/{uuid.uuid4()}/authorize", json={}),
    ]
    with connector_reads(fresh) as reads:
        answers = await asyncio.gather(*calls, *strangers)
    assert [answer.status_code for answer in answers[: len(calls)]] == [200] * len(calls)
    assert [answer.json()["code"] for answer in answers[len(calls) :]] == ["connector_not_found"] * 3
    # 20 misses in all: far fewer queries (the first misses may go before the rest arrive).
    assert 1 <= len(reads) <= 3, reads
    # The owner's call still finds its connector after another organization asked for it.
    owner = await client_for("org-2", app=fresh).post(f"/connectors/{made['org-2'][0]}/authorize", json={})
    assert owner.status_code == 200


class _Row:
    def __init__(self, organization_id: str, connector_id: uuid.UUID) -> None:
        self.organization_id = organization_id
        self.id = connector_id


async def test_a_failed_query_fails_its_callers_only_and_the_next_query_runs() -> None:
    asked: list[list[uuid.UUID]] = []
    fail = True

    async def fetch(ids: Sequence[uuid.UUID]) -> Sequence[Connector]:
        asked.append(list(ids))
        await asyncio.sleep(0)
        if fail:
            raise ConnectionError("the database is away")
        return [_Row("org", connector_id) for connector_id in ids]  # type: ignore[misc]

    misses = Misses(fetch, batch=2)
    first = [uuid.uuid4() for _ in range(3)]
    results = await asyncio.gather(*(misses.get("org", i) for i in first), return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    # In batches of at most two.
    assert [len(ids) for ids in asked] == [2, 1]
    fail = False
    again = await asyncio.gather(*(misses.get("org", i) for i in first))
    assert [row.id for row in again if row is not None] == first
    await misses.aclose()


async def test_a_caller_giving_up_does_not_cancel_the_others() -> None:
    release = asyncio.Event()

    async def fetch(ids: Sequence[uuid.UUID]) -> Sequence[Connector]:
        await release.wait()
        return [_Row("org", connector_id) for connector_id in ids]  # type: ignore[misc]

    misses = Misses(fetch)
    connector_id = uuid.uuid4()
    impatient = asyncio.ensure_future(misses.get("org", connector_id))
    patient = asyncio.ensure_future(misses.get("org", connector_id))
    await asyncio.sleep(0.01)
    impatient.cancel()
    release.set()
    row = await patient
    assert row is not None and row.id == connector_id
    with pytest.raises(asyncio.CancelledError):
        await impatient
    await misses.aclose()


async def test_a_starting_process_holds_the_most_recently_changed_connectors_up_to_its_capacity(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    writer = await app_factory(settings)
    ids: list[str] = []
    for number in range(4):
        ids += await basics(client_for(f"org-{number}", app=writer), 3)
    # The oldest one changed last: it is among the most recent now.
    first = client_for("org-0", app=writer)
    renamed = await first.patch(
        f"/connectors/{ids[0]}",
        json={"name": "Renamed"},
        headers={"If-Match": '"1"'},
        params={"validate": "false"},
    )
    assert renamed.status_code == 200, renamed.text

    # Room for 5 of the 12.
    filled = {"connector_cache_size": 5, "preload_connectors": True}
    fresh = await app_factory(settings.model_copy(update=filled))
    service = fresh.state.connectors
    memory = service.memory
    for _ in range(200):
        if len(memory) == 5:
            break
        await asyncio.sleep(0.01)
    held = set(map(str, memory.held_ids()))
    assert held == {ids[0], *ids[-4:]}
    # Nothing held is replaced or pushed out by a later fill, and a fill once full holds nothing.
    assert await preload(service, page=3).run() == 0
    assert set(map(str, memory.held_ids())) == held

    # Held means answered without a query.
    with connector_reads(fresh) as reads:
        answer = await client_for("org-3", app=fresh).post(f"/connectors/{ids[-1]}/authorize", json={})
    assert answer.status_code == 200 and reads == []


async def test_a_connector_changed_while_its_page_is_read_is_not_held_from_that_read(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    quiet = settings.model_copy(update={"preload_connectors": False})
    writer = await app_factory(quiet)
    client = client_for("org-0", app=writer)
    made = await basics(client, 3)
    fresh = await app_factory(quiet)
    service = fresh.state.connectors
    reading = service.db.scalars

    # The follower reports a change of the first connector while the page is being read.
    async def read_then_change(statement: Any) -> Sequence[Connector]:
        rows: Sequence[Connector] = await reading(statement)
        service.memory.changed(uuid.UUID(made[0]))
        return rows

    service.db.scalars = read_then_change
    try:
        assert await preload(service, page=10).run() == 2
    finally:
        service.db.scalars = reading
    assert set(map(str, service.memory.held_ids())) == set(made[1:])


async def test_connectors_called_lately_are_noted_once_an_hour_and_loaded_first(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    preloading = settings.model_copy(update={"preload_connectors": True})
    writer = await app_factory(preloading)
    client = client_for("org-0", app=writer)
    made = await basics(client, 5)
    # The two oldest are called (twice: noted once); the newest three are not.
    usage = writer.state.connectors.usage
    for connector_id in made[:2] * 2:
        assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200
    assert await usage.flush() == 2
    assert await usage.flush() == 0

    # A new process with room for two holds the two that were called, not the newest.
    filled = {"connector_cache_size": 2, "preload_connectors": True}
    fresh = await app_factory(settings.model_copy(update=filled))
    memory = fresh.state.connectors.memory
    for _ in range(200):
        if len(memory) == 2:
            break
        await asyncio.sleep(0.01)
    assert set(map(str, memory.held_ids())) == set(made[:2])


async def test_a_connector_noted_within_the_hour_by_another_process_is_not_written_again(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    preloading = settings.model_copy(update={"preload_connectors": True})
    first = await app_factory(preloading)
    client = client_for("org-0", app=first)
    connector_id = (await client.post("/connectors", json=payloads.basic(), params=NO_CHECK)).json()["id"]
    assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200
    await first.state.connectors.usage.flush()
    service = first.state.connectors
    (row,) = await service.db.scalars(ConnectorRepository.select_by_ids([uuid.UUID(connector_id)]))
    noted = row.used_at
    assert noted is not None

    # Another process calls it too: its write finds the mark recent and leaves it.
    second = await app_factory(preloading)
    other = client_for("org-0", app=second)
    assert (await other.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200
    await second.state.connectors.usage.flush()
    (row,) = await service.db.scalars(ConnectorRepository.select_by_ids([uuid.UUID(connector_id)]))
    assert row.used_at == noted


async def test_without_preload_no_call_is_noted(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> None:
    """Nothing reads the usage marks then: neither the calls nor the stop write any."""
    app = await app_factory(settings.model_copy(update={"preload_connectors": False}))
    assert app.state.connectors.usage is None
    client = client_for("org-0", app=app)
    connector_id = (await basics(client, 1))[0]
    assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200
    await app.state.connectors.aclose()
    (row,) = await app.state.connectors.db.scalars(
        ConnectorRepository.select_by_ids([uuid.UUID(connector_id)])
    )
    assert row.used_at is None


@pytest.fixture
def later_pages_wait(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Preload reads two connectors a query; a phase's pages after its first wait for the event."""
    monkeypatch.setattr(preload_module, "PAGE", 2)
    go_on = asyncio.Event()
    step = Preload.step

    async def waiting(preload: Preload) -> None:
        if preload._before is not None:
            await go_on.wait()
        await step(preload)

    monkeypatch.setattr(Preload, "step", waiting)
    return go_on


async def called_lately(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
) -> list[str]:
    """Five connectors, all marked as called lately, written by a process without preload."""
    writer = await app_factory(settings.model_copy(update={"preload_connectors": False}))
    made = await basics(client_for("org-0", app=writer), 5)
    now = datetime.now(UTC)
    async with writer.state.connectors.db.write() as session:
        await ConnectorRepository(session).mark_used([uuid.UUID(i) for i in made], now, not_since=now)
    return made


async def test_a_starting_process_says_so_until_the_connectors_called_lately_are_held(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
    later_pages_wait: asyncio.Event,
) -> None:
    made = await called_lately(app_factory, client_for, settings)
    fresh = await app_factory(settings.model_copy(update={"preload_connectors": True}))
    client = client_for("org-0", app=fresh)

    starting = await client.get("/readyz")
    problem = assert_problem(starting, 503, "starting")
    assert starting.headers["Retry-After"] == "1"
    assert problem["detail"] == "loading the connectors called lately (2 held so far)"
    # It serves meanwhile: the newest two (its first page) from memory, another by its first call.
    memory = fresh.state.connectors.memory
    assert set(map(str, memory.held_ids())) == set(made[3:])
    for connector_id in (made[4], made[0]):
        assert (await client.post(f"/connectors/{connector_id}/authorize", json={})).status_code == 200

    later_pages_wait.set()
    for _ in range(500):
        if (await client.get("/readyz")).status_code == 200:
            break
        await asyncio.sleep(0.01)
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    # The other two were held by the preload's later pages.
    assert set(map(str, memory.held_ids())) == set(made)
    assert fresh.state.connectors.preloader.held == 4


async def test_a_starting_process_is_ready_after_the_wait_whatever_it_holds(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
    fake_time: FakeTime,
    later_pages_wait: asyncio.Event,
) -> None:
    await called_lately(app_factory, client_for, settings)
    waits = {"preload_connectors": True, "preload_ready_wait_seconds": 20, "max_staleness_seconds": 86_400}
    fresh = await app_factory(settings.model_copy(update=waits), Overrides(clock=fake_time))
    client = client_for("org-0", app=fresh)
    fake_time.advance(19.9)
    assert_problem(await client.get("/readyz"), 503, "starting")
    fake_time.advance(0.1)
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    # Still loading: two held.
    assert len(fresh.state.connectors.memory) == 2


async def test_without_a_wait_a_starting_process_is_ready_at_once(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
    later_pages_wait: asyncio.Event,
) -> None:
    await called_lately(app_factory, client_for, settings)
    no_wait = {"preload_connectors": True, "preload_ready_wait_seconds": 0}
    fresh = await app_factory(settings.model_copy(update=no_wait))
    assert (await client_for("org-0", app=fresh).get("/readyz")).json() == {"status": "ready"}
    assert len(fresh.state.connectors.memory) == 2


async def test_a_preload_that_fails_stops_and_logs_the_error_class_only(
    app_factory: Callable[..., Awaitable[Any]],
    client_for: Callable[..., httpx.AsyncClient],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await called_lately(app_factory, client_for, settings)
    service = (await app_factory(settings.model_copy(update={"preload_connectors": False}))).state.connectors

    def unholdable(row: Connector) -> Any:
        raise ValueError(f"CANARY-preload {row.id}")

    failing = Preload(service.db, service.memory, unholdable, service.clock, ready_wait=30)
    assert await failing.run() == 0
    assert failing.used is None and failing.starting() is None
    (record,) = [r for r in caplog.records if r.getMessage() == "preloading connectors failed"]
    assert record.__dict__["error"] == "ValueError"
    assert "CANARY-preload" not in caplog.text
