"""The databases a test session makes on the shared PostgreSQL server, and their removal.

Each session (each pytest process) creates one database there, named
``connectors_test_<host>_<pid>_<random>``: ``<host>`` is a short hash of this machine's name
and pid namespace, ``<pid>`` the creating process. The session drops it when it ends, whatever
its tests did. A session that was killed cannot, so every session first drops the leftovers of earlier ones:
databases whose name carries this machine's hash and the pid of a process that no longer exists.
Anything else is left alone: databases of other machines (their pids mean nothing here), of
processes still running, names in another format, and any database someone is connected to
(dropped without ``FORCE``, PostgreSQL refuses).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket

import asyncpg
from sqlalchemy.engine import URL

PREFIX = "connectors_test_"


def host_tag() -> str:
    """Eight hex digits naming this machine, and its process-id namespace, in database names.

    Containers may share a host name but not their pids: the namespace keeps one from taking
    another's live session for a dead one.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.blake2s(f"{socket.gethostname()}\0{namespace}".encode(), digest_size=4).hexdigest()


def database_name(pid: int | None = None) -> str:
    """A fresh name for a database made by process ``pid`` (this one by default)."""
    return f"{PREFIX}{host_tag()}_{pid or os.getpid()}_{secrets.token_hex(4)}"


_NAME = re.compile(rf"^{PREFIX}(?P<host>[0-9a-f]{{8}})_(?P<pid>[0-9]+)_[0-9a-f]{{8}}$")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def abandoned(name: str) -> bool:
    """Whether ``name`` is a database made on this machine by a process that is gone."""
    match = _NAME.match(name)
    if match is None or match["host"] != host_tag():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not process_alive(pid)


async def _connect(admin: URL) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=admin.host,
        port=admin.port or 5432,
        user=admin.username,
        password=admin.password,
        database=admin.database,
        timeout=10,
    )


async def create_database(admin: URL, name: str) -> None:
    connection = await _connect(admin)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def drop_database(admin: URL, name: str) -> None:
    """Drop a database this session made, ending any connection still open to it."""
    connection = await _connect(admin)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def drop_abandoned(admin: URL) -> list[str]:
    """Drop the databases killed sessions of this machine left; the names dropped."""
    connection = await _connect(admin)
    dropped: list[str] = []
    try:
        rows = await connection.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", PREFIX
        )
        for row in rows:
            name: str = row["datname"]
            if not abandoned(name):
                continue
            try:
                await connection.execute(f'DROP DATABASE "{name}"')
            except asyncpg.PostgresError:
                continue  # in use after all, or dropped by another session meanwhile
            dropped.append(name)
    finally:
        await connection.close()
    return dropped
