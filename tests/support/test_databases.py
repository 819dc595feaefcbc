"""A test session leaves no database behind on the shared PostgreSQL server.

A small pytest session runs in a subprocess with the suite's own fixtures: one test takes the
session's database, another fails. Before it starts, databases like those a killed session leaves
are planted next to ones it must not touch.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, run_sync
from tests.support import databases

ROOT = Path(__file__).resolve().parents[2]

SESSION = """
import os
from pathlib import Path


def test_takes_the_database(postgres_server: str) -> None:
    Path(os.environ["RECORD_DATABASE_URL"]).write_text(postgres_server)


def test_fails() -> None:
    raise AssertionError("a failing test keeps nothing either")
"""


async def _existing(names: list[str]) -> set[str]:
    admin = make_url(POSTGRES_URL)
    connection = await asyncpg.connect(
        host=admin.host,
        port=admin.port or 5432,
        user=admin.username,
        password=admin.password,
        database=admin.database,
    )
    try:
        rows = await connection.fetch(
            "SELECT datname FROM pg_database WHERE datname = any($1::text[])", names
        )
    finally:
        await connection.close()
    return {row["datname"] for row in rows}


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_session_drops_its_database_and_those_killed_sessions_left(
    postgres_server: str, tmp_path: Path
) -> None:
    admin = make_url(POSTGRES_URL)
    dead = _dead_pid()
    other_host = format((int(databases.host_tag(), 16) + 1) % 2**32, "08x")
    abandoned = databases.database_name(dead)
    kept = {
        "a running process's": databases.database_name(os.getpid()),
        "another machine's": f"{databases.PREFIX}{other_host}_{dead}_{secrets.token_hex(4)}",
        "an unknown format's": f"{databases.PREFIX}{secrets.token_hex(6)}",
    }
    planted = [abandoned, *kept.values()]
    for name in planted:
        run_sync(databases.create_database(admin, name))
    try:
        (tmp_path / "test_session.py").write_text(SESSION)
        record = tmp_path / "database_url"
        # The suite's conftest as a plugin, with the one plugin its fixtures need: loading every
        # installed plugin (hypothesis, schemathesis...) would double the time this takes.
        session = subprocess.Popen(
            [
                *(sys.executable, "-m", "pytest", "-p", "pytest_asyncio.plugin", "-p", "tests.conftest"),
                *("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-p", "no:cacheprovider"),
                *("-q", str(tmp_path / "test_session.py")),
            ],
            cwd=ROOT,
            env={**os.environ, "RECORD_DATABASE_URL": str(record), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = session.communicate(timeout=300)
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()
        assert "1 failed, 1 passed" in output, output

        made = make_url(record.read_text()).database
        assert made is not None and made.startswith(
            f"{databases.PREFIX}{databases.host_tag()}_{session.pid}_"
        )
        existing = run_sync(_existing([made, *planted]))
        assert made not in existing, "the session's own database was left behind"
        assert abandoned not in existing, "a killed session's database was left behind"
        for what, name in kept.items():
            assert name in existing, f"{what} database was dropped"
    finally:
        for name in planted:
            run_sync(databases.drop_database(admin, name))
