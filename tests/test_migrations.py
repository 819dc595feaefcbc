"""The migrations and the models describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from alembic import command
from app.core.db import build_engine
from app.migrations import alembic_config, current_revision, head_revision, upgrade
from app.models import metadata


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def _run(url: str, step: Any, *args: Any) -> Any:
    engine = build_engine(url)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(step, *args)
    finally:
        await engine.dispose()


async def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert await current_revision(database_url) == head_revision()
    assert await _run(database_url, _differences) == []


async def test_the_newest_migration_goes_down_and_up_again(database_url: str) -> None:
    try:
        await _run(database_url, _downgrade, "0007")
        assert await current_revision(database_url) == "0007"
        # The comparison does see differences: what the newest revision adds.
        missing = await _run(database_url, _differences)
        assert sorted(_describe(difference) for difference in missing) == [
            "add_column connectors.used_at",
            "add_index ix_connectors_preload",
        ]
    finally:
        await upgrade(database_url)
    assert await current_revision(database_url) == head_revision() == "0008"
    assert await _run(database_url, _differences) == []


def _describe(difference: Any) -> str:
    kind = difference[0]
    if kind == "add_column":
        _, _schema, table, column = difference
        return f"{kind} {table}.{column.name}"
    return f"{kind} {difference[1].name}"
