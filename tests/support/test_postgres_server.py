"""The PostgreSQL server of a test's own: it serves, stops for real, and keeps its data across a restart."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from app.core.db import build_engine
from tests.support.postgres import PostgresServer, why_unavailable


async def rows(server: PostgresServer) -> list[tuple[int, str]]:
    connection = await asyncpg.connect(server.dsn, timeout=30)
    try:
        return [tuple(row) for row in await connection.fetch("SELECT id, body FROM notes ORDER BY id")]
    finally:
        await connection.close()


async def test_a_stopped_server_refuses_and_a_restarted_one_has_the_data(
    own_postgres: PostgresServer,
) -> None:
    url = own_postgres.url
    connection = await asyncpg.connect(own_postgres.dsn, timeout=30)
    try:
        await connection.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        await connection.execute("INSERT INTO notes VALUES (1, 'before a fast stop')")

        own_postgres.stop()  # a client is still connected: a fast stop ends its session

        assert not own_postgres.is_running
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await connection.fetchval("SELECT 1")
    finally:
        connection.terminate()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(own_postgres.dsn, timeout=30)

    own_postgres.start()

    assert own_postgres.is_running
    assert own_postgres.url == url  # same port, same data directory
    assert await rows(own_postgres) == [(1, "before a fast stop")]

    connection = await asyncpg.connect(own_postgres.dsn, timeout=30)
    try:
        await connection.execute("INSERT INTO notes VALUES (2, 'before a crash')")
    finally:
        await connection.close()
    own_postgres.stop("immediate")
    own_postgres.start()  # replays the write-ahead log

    assert await rows(own_postgres) == [(1, "before a fast stop"), (2, "before a crash")]


async def test_create_database_answers_a_url_the_application_engine_takes(
    own_postgres: PostgresServer,
) -> None:
    engine = build_engine(own_postgres.create_database("connectors_bench"))
    try:
        async with engine.connect() as connection:
            name = await connection.scalar(text("SELECT current_database()"))
    finally:
        await engine.dispose()

    assert name == "connectors_bench"


@pytest.mark.skipif(why_unavailable() is not None, reason="no PostgreSQL server programs")
def test_close_stops_the_server_and_deletes_its_directory() -> None:
    with PostgresServer() as server:
        directory: Path = server.directory
        assert server.is_running

    assert not directory.exists()
