"""Database engine and transactions.

Two session makers share one engine: ``read`` and ``write``. On SQLite a write transaction starts
with ``BEGIN IMMEDIATE`` so that two writers never both read and then race to upgrade their lock
(which SQLite answers with an immediate "database is locked"); they queue on the busy timeout
instead. On PostgreSQL both are ordinary transactions and row locks do the serialising.

Transactions are short and never span an outbound call: a service opens one with
``async with db.write() as session`` and the block commits on success, rolls back on error.

``scalars`` reads one SELECT of ORM entities in as few trips as the driver allows. aiosqlite
runs each call of the driver in its thread, and a read transaction makes about ten such calls
(BEGIN, cursor, execute, fetch, close, COMMIT, the pool's reset), each waiting a turn of the
event loop: under load a read took many busy turns. On a SQLite file, ``scalars`` therefore runs
the whole read in one worker thread, on a synchronous engine of its own over the same file
(read-only connections); elsewhere it is an ordinary read transaction.

A database that cannot be reached (refused or dropped connections, a server shutting down, a
connect that times out, SQLite's lock wait running out) surfaces as ``DatabaseUnavailable``,
which callers answer with a 503 and ``Retry-After``; errors of the statements themselves
(constraint violations, bugs) pass unchanged. The first such failure logs one line, and the
first success after it another: an outage is two lines in the log, not one per request. While
it is away, one transaction per ``retry_interval`` tries to reach it (the change follower polls
every second, so recovery is noticed within about that); the others fail at once, so callers
never queue behind connection attempts that time out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

from opentelemetry.trace import Span, SpanKind, Tracer, get_current_span
from sqlalchemy import Select, create_engine, event, text
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry

from app.core import tracing
from app.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_SECONDS = 5.0
# While the database is away, how often a transaction may try to reach it; the others answer
# DatabaseUnavailable at once instead of each waiting for its own failed connection attempt.
RETRY_INTERVAL_SECONDS = 0.5

T = TypeVar("T")


def build_engine(url: str, *, pool_size: int = 10, command_timeout: float | None = None) -> AsyncEngine:
    """The engine for ``url``; ``command_timeout`` bounds each PostgreSQL statement (the service
    sets it, so that a server that stopped answering becomes ``DatabaseUnavailable``)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, hide_parameters=True
        )
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=CONNECT_TIMEOUT_SECONDS,
        hide_parameters=True,
        connect_args={"timeout": CONNECT_TIMEOUT_SECONDS, "command_timeout": command_timeout},
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take over transaction control from the driver so BEGIN IMMEDIATE can be issued.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_reader(engine: AsyncEngine) -> Engine | None:
    """A synchronous engine over the SQLite file ``engine`` uses, whose connections only read
    (``Database.scalars``) and never create the file; None unless ``engine`` is SQLite over a
    file named by its path (an in-memory database, or one named by a URI, is read as usual)."""
    url = engine.url
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or url.query:
        return None
    reader = create_engine(
        url.set(
            drivername="sqlite",
            database=f"file:{quote(os.path.abspath(database))}",
            query={"mode": "rw", "uri": "true"},
        ),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        hide_parameters=True,
    )

    @event.listens_for(reader, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return reader


class Database:
    """The engine and the two kinds of transaction the service uses."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retry_interval: float = RETRY_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        tracer: Tracer | None = None,
    ) -> None:
        """``retry_interval``: while the database is away, at most one attempt to reach it per
        interval; every other transaction in between fails at once. ``tracer``: a span per
        statement (``trace_statements``)."""
        self.engine = engine
        # A SQLite file's one-trip reads (``scalars``) run on this engine, in a worker thread.
        self._reader = sqlite_reader(engine)
        if tracer is not None:
            trace_statements(engine, tracer)
            if self._reader is not None:
                trace_statements(self._reader, tracer)
        self.retry_interval = retry_interval
        self._monotonic = monotonic
        self._retry_at = -math.inf
        self._read = async_sessionmaker(engine, expire_on_commit=False)
        self._write = async_sessionmaker(
            engine.execution_options(sqlite_immediate=True), expire_on_commit=False
        )
        # False between the first failure to reach the database and the next success.
        self.available = True

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._reachable(), self._read() as session, session.begin():
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        async with self._reachable(), self._write() as session, session.begin():
            yield session

    async def scalars(self, statement: Select[T]) -> Sequence[T]:
        """Every entity one SELECT reads, in one trip to a worker thread on a SQLite file (see the
        module's docstring), else in a read transaction. The entities are detached: what the
        statement loaded, and nothing more, can be read of them."""
        if self._reader is None:
            async with self.read() as session:
                return (await session.scalars(statement)).all()
        async with self._reachable():
            return await asyncio.to_thread(self._read_scalars, self._reader, statement)

    @staticmethod
    def _read_scalars(reader: Engine, statement: Select[T]) -> Sequence[T]:
        with Session(reader) as session:
            return session.scalars(statement).all()

    async def ping(self) -> None:
        async with self._reachable(), self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    @asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Turn a database that cannot be reached into ``DatabaseUnavailable``; log changes once."""
        if not self.available:
            now = self._monotonic()
            if now < self._retry_at:
                raise DatabaseUnavailable()
            self._retry_at = now + self.retry_interval
        try:
            yield
        except Exception as error:
            if not _unreachable(error):
                self._answered()  # the database answered, if only with a refusal
                raise
            if self.available:
                self.available = False
                self._retry_at = self._monotonic() + self.retry_interval
                log.warning("database unavailable", extra={"error": type(error).__name__})
            raise DatabaseUnavailable() from None
        self._answered()

    def _answered(self) -> None:
        if not self.available:
            self.available = True
            log.warning("database reachable again")

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._reader is not None:
            self._reader.dispose()


# Tracing ---------------------------------------------------------------------------------------

# Where a statement's span waits for its end: on its execution context, which lives as long.
_SPAN_ATTRIBUTE = "_connectors_span"


def trace_statements(engine: AsyncEngine | Engine, tracer: Tracer) -> None:
    """A client span per statement run inside a traced operation (a request, or work a request
    started), under the span current where it was awaited.

    Statements outside one (the change follower's polls, once a second per process) are not
    traced: each would be a trace of its own, and the follower's lag is a metric. A span records
    the database system, the operation (the statement's first keyword: SELECT, UPDATE, BEGIN,
    ...) and, when the statement is built from one table, that table's name: never the
    statement's text or its parameters. A failure records the exception's class name.
    """
    system = engine.dialect.name
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        _connection: Connection, _cursor: Any, statement: str, _parameters: Any, context: Any, _many: bool
    ) -> None:
        if context is None or not get_current_span().get_span_context().is_valid:
            return
        operation = _operation(statement)
        table = _table(context)
        attributes: dict[str, Any] = {"db.system": system, "db.operation.name": operation}
        if table is not None:
            attributes["db.collection.name"] = table
        name = f"{operation} {table}" if table is not None else operation
        setattr(
            context,
            _SPAN_ATTRIBUTE,
            tracing.start_span(tracer, name, kind=SpanKind.CLIENT, attributes=attributes),
        )

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _after(
        _connection: Connection, _cursor: Any, _statement: str, _parameters: Any, context: Any, _many: bool
    ) -> None:
        _end(context)

    @event.listens_for(sync_engine, "handle_error")
    def _failed(exception_context: ExceptionContext) -> None:
        _end(exception_context.execution_context, exception_context.original_exception)


def _end(context: Any, error: BaseException | None = None) -> None:
    """End the span of the statement ``context`` runs, if it has one still open."""
    span: Span | None = getattr(context, _SPAN_ATTRIBUTE, None)
    if span is None:
        return
    setattr(context, _SPAN_ATTRIBUTE, None)
    if error is not None:
        tracing.mark_failed(span, error)
    span.end()


def _operation(statement: str) -> str:
    """The statement's first word, if it is a plain keyword (it is never a value)."""
    words = statement.split(None, 1)
    first = words[0].upper() if words else ""
    return first if first.isascii() and first.isalpha() and len(first) <= 16 else "OTHER"


def _table(context: Any) -> str | None:
    """The one table a compiled statement is about, when that is known without more work."""
    compiled = getattr(context, "compiled", None)
    table = getattr(getattr(compiled, "statement", None), "table", None)  # INSERT, UPDATE, DELETE
    if table is None:
        froms = getattr(getattr(compiled, "compile_state", None), "froms", None)
        if froms is not None and len(froms) == 1:
            table = froms[0]
    name = getattr(table, "name", None)
    return name if isinstance(name, str) else None


# SQLite result codes (the primary code, the low byte) that say the file could not be used now.
_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
    }
)
# PostgreSQL SQLSTATEs of a server that cannot serve now: connection exceptions (class 08), a
# server shutting down, crashed or starting up (57P01-57P03), too many connections (53300).
_POSTGRES_UNAVAILABLE = frozenset({"57P01", "57P02", "57P03", "53300"})


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached, rather than refused a statement."""
    if isinstance(error, SQLAlchemyTimeoutError):
        return True  # no pooled connection came free in time: every one is stuck connecting
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        original = error.orig
        if isinstance(original, sqlite3.Error):
            code = getattr(original, "sqlite_errorcode", None)
            return isinstance(code, int) and code & 0xFF in _SQLITE_UNAVAILABLE
        sqlstate = getattr(original, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate.startswith("08") or sqlstate in _POSTGRES_UNAVAILABLE
        return isinstance(error, InterfaceError)
    # Raised as they are by drivers while connecting (refused, reset, timed out).
    return isinstance(error, OSError | TimeoutError)
