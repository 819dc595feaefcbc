"""Which database failures are an outage (503 database_unavailable) and which are not."""

from __future__ import annotations

import secrets
import socket
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.connectors.models import Organization
from app.core.db import Database, _unreachable, build_engine, sqlite_reader
from app.core.errors import DatabaseUnavailable
from tests.conftest import _sqlite_database
from tests.support.service import free_port


def _sqlite_error(code: int) -> DBAPIError:
    error = sqlite3.OperationalError("message")
    error.sqlite_errorcode = code
    return DBAPIError("SELECT 1", None, error)


def _postgres_error(cls: type[Exception]) -> DBAPIError:
    return DBAPIError("SELECT 1", None, cls("message"))


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (_sqlite_error(sqlite3.SQLITE_BUSY), True),
        (_sqlite_error(sqlite3.SQLITE_IOERR | (3 << 8)), True),  # an extended code of IOERR
        (_sqlite_error(sqlite3.SQLITE_ERROR), False),  # no such table, a syntax error: bugs
        (_postgres_error(asyncpg.exceptions.CannotConnectNowError), True),  # 57P03, starting up
        (_postgres_error(asyncpg.exceptions.AdminShutdownError), True),  # 57P01
        (_postgres_error(asyncpg.exceptions.ConnectionFailureError), True),  # 08006
        (_postgres_error(asyncpg.exceptions.TooManyConnectionsError), True),  # 53300
        (_postgres_error(asyncpg.exceptions.UndefinedTableError), False),
        (IntegrityError("INSERT", None, Exception("duplicate")), False),
        (PoolTimeout(), True),
        (ConnectionRefusedError(), True),
        (ValueError(), False),
    ],
)
def test_what_counts_as_unreachable(error: BaseException, unreachable: bool) -> None:
    assert _unreachable(error) is unreachable


async def test_a_server_that_refuses_connections_is_unavailable_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(build_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"))
    try:
        for _ in range(3):
            with pytest.raises(DatabaseUnavailable):
                async with db.read() as session:
                    await session.execute(text("SELECT 1"))
    finally:
        await db.dispose()
    assert [record.getMessage() for record in caplog.records if record.name == "app.core.db"] == [
        "database unavailable"
    ]


async def test_a_statement_error_on_sqlite_is_not_an_outage(tmp_path: Path) -> None:
    db = Database(build_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    try:
        with pytest.raises(DBAPIError):
            async with db.read() as session:
                await session.execute(text("SELECT * FROM no_such_table"))
        assert db.available
    finally:
        await db.dispose()


async def test_while_away_one_attempt_per_interval_reaches_for_the_database() -> None:
    accepted = 0
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        nonlocal accepted
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted += 1
            connection.close()  # a server that drops every connection

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    now = [100.0]
    db = Database(
        build_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"),
        retry_interval=0.5,
        monotonic=lambda: now[0],
    )

    async def attempt() -> None:
        with pytest.raises(DatabaseUnavailable):
            async with db.read() as session:
                await session.execute(text("SELECT 1"))

    try:
        await attempt()
        tried = accepted
        assert tried >= 1
        for _ in range(5):
            await attempt()  # within the interval: no new connection
        assert accepted == tried
        now[0] += 0.5
        await attempt()
        assert accepted > tried
    finally:
        await db.dispose()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        listener.close()
        thread.join(timeout=5)


# One-trip reads ---------------------------------------------------------------------------------


async def test_one_trip_reads_see_every_committed_write_and_return_detached_rows(database_url: str) -> None:
    db = Database(build_engine(database_url))
    organization = f"org-{secrets.token_hex(4)}"
    try:
        for number in range(3):
            async with db.write() as session:
                await session.execute(
                    insert(Organization).values(id=f"{organization}-{number}", created_at=datetime.now(UTC))
                )
            rows = await db.scalars(select(Organization).where(Organization.id.startswith(organization)))
            # Each read sees the write committed just before it, from any connection.
            assert sorted(row.id for row in rows) == [f"{organization}-{n}" for n in range(number + 1)]
            assert all(inspect(row).detached for row in rows)
    finally:
        await db.dispose()


async def test_on_a_sqlite_file_a_one_trip_read_runs_in_another_thread_and_only_reads(tmp_path: Path) -> None:
    db = Database(build_engine(await _sqlite_database(tmp_path)))
    reader = db._reader
    assert reader is not None
    threads: list[int] = []

    def note_thread(*_args: Any) -> None:
        threads.append(threading.get_ident())

    event.listen(reader, "before_cursor_execute", note_thread)
    try:
        assert await db.scalars(select(Organization)) == []
        # The read's statement ran on the reader's connection, in another thread.
        assert threads and threading.get_ident() not in threads
        # Its connections refuse to write.
        with pytest.raises(DBAPIError, match="readonly"), reader.connect() as connection:
            connection.execute(text("INSERT INTO organizations (id, created_at) VALUES ('x', '2026-01-01')"))
    finally:
        await db.dispose()


async def test_a_sqlite_file_that_cannot_be_opened_makes_a_one_trip_read_unavailable(tmp_path: Path) -> None:
    db = Database(build_engine(f"sqlite+aiosqlite:///{tmp_path / 'no-such-directory' / 'x.db'}"))
    try:
        with pytest.raises(DatabaseUnavailable):
            await db.scalars(select(Organization))
        assert not db.available
    finally:
        await db.dispose()


async def test_a_one_trip_read_never_creates_the_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "no such file?.db"
    db = Database(build_engine(f"sqlite+aiosqlite:///{missing}"))
    try:
        with pytest.raises(DatabaseUnavailable):
            await db.scalars(select(Organization))
        assert not missing.exists()
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite://",
        "sqlite+aiosqlite:///file::memory:?uri=true",
        "sqlite+aiosqlite:///file:named.db?mode=ro&uri=true",
        "postgresql+asyncpg://postgres@127.0.0.1/postgres",
    ],
)
def test_only_a_sqlite_file_named_by_its_path_gets_a_reader(url: str) -> None:
    assert sqlite_reader(build_engine(url)) is None
