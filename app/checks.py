"""``python -m app check``: whether what ``serve`` needs is in place, one verdict per part.

The checks read nothing the service would not and write nothing: a SQLite file that does not
exist is reported, not created (``app.cli`` likewise stands keys made in memory in for development
keys ``serve`` would generate). A JWKS document is fetched by the service's own ``TokenVerifier``,
so with its client and limits. Each check that talks to another system runs under one deadline.

What they report names hosts, ports, database names, key ids and connector ids, never a password,
a key, a secret or a full URL; a failure to connect is named by the exception's type, since
driver messages may carry connection details.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth import JwksUnavailable, TokenVerifier
from app.core.config import ConfigError, Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.keycheck import check_key_ring
from app.migrations import alembic_config

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict on one part, with a line for an operator."""

    name: str
    status: Status
    detail: str

    def line(self) -> str:
        label = "FAILED" if self.status == "failed" else self.status
        return f"{label:<8}{self.name:<16}{self.detail}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def database_target(url: str) -> str:
    """Which database ``url`` names: dialect, host, port and database; never a user or password."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    database = parsed.database or ""
    if backend == "sqlite":
        if database and database != ":memory:" and not database.startswith("file:"):
            database = os.path.abspath(database)
        return f"sqlite {database or ':memory:'}"
    host = parsed.host or "(default host)"
    if ":" in host:
        host = f"[{host}]"
    return f"{backend} {host}:{parsed.port or 5432}/{database}"


def redis_target(url: str) -> str:
    """Which Redis ``url`` names: host, port and database number (or socket path); no credentials."""
    parts = urlsplit(url)
    chosen = parse_qs(parts.query).get("db", [""])[0]
    if parts.scheme == "unix":
        return f"unix:{parts.path} db {chosen or '0'}"
    database = chosen or parts.path.strip("/") or "0"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    tls = " (TLS)" if parts.scheme == "rediss" else ""
    return f"{host}:{parts.port or 6379}/{database}{tls}"


def _public_url(url: str) -> str:
    """``url`` without user information, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":(not a port)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _cause(error: BaseException) -> str:
    """The driver's own exception type under SQLAlchemy's wrappers (``InvalidPasswordError``)."""
    seen: BaseException = error
    original = getattr(error, "orig", None)
    if isinstance(original, BaseException):
        seen = original
        while seen.__cause__ is not None:
            seen = seen.__cause__
    return type(seen).__name__


def _sqlite_file_missing(url: str) -> str | None:
    """The absolute path of a SQLite database file that does not exist, else None."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or "uri" in parsed.query:
        return None
    path = os.path.abspath(database)
    return None if os.path.exists(path) else path


def _failed(
    name: str, what: str, error: BaseException, deadline: asyncio.Timeout, seconds: float
) -> CheckResult:
    """A failed check naming the error's type, or the deadline when that is what ended it."""
    reason = f"no answer within {seconds:g} s" if deadline.expired() else _cause(error)
    return CheckResult(name, "failed", f"{what}: {reason}")


async def _current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


def _schema_check(current: str | None) -> CheckResult:
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if current == head:
        return CheckResult("schema", "ok", f"at revision {current}, the newest")
    if current is None:
        detail = f"not migrated (the newest revision is {head}): run `python -m app migrate`"
    elif current not in {script.revision for script in scripts.walk_revisions()}:
        detail = (
            f"at revision {current}, which this version does not know (its newest is {head}):"
            " the database was migrated by a newer version"
        )
    else:
        detail = f"at revision {current}, the newest is {head}: run `python -m app migrate`"
    return CheckResult("schema", "failed", detail)


async def _key_check(settings: Settings, engine: AsyncEngine) -> CheckResult:
    ring = KeyRing.from_settings(settings)
    found = await check_key_ring(Database(engine), ring)
    held = ", ".join(ring.key_ids)
    if not found.ok:
        return CheckResult("encryption_keys", "failed", "; ".join(found.problems()))
    if not found.opened:
        return CheckResult(
            "encryption_keys", "ok", f"no stored secrets to open yet; the key ring holds {held}"
        )
    opened = ", ".join(found.opened)
    return CheckResult(
        "encryption_keys", "ok", f"the key ring ({held}) opens the stored secrets (under {opened})"
    )


async def _database_checks(settings: Settings, seconds: float) -> list[CheckResult]:
    """Reaching the database, its schema revision, then the key ring against its stored secrets;
    what cannot be checked after a failure is skipped."""
    url = settings.effective_database_url
    target = database_target(url)
    unreached = [
        CheckResult("schema", "skipped", "the database was not reached"),
        CheckResult("encryption_keys", "skipped", "the database was not reached"),
    ]
    missing = _sqlite_file_missing(url)
    if missing is not None:
        detail = f"no SQLite database at {missing}: run `python -m app migrate`"
        return [CheckResult("database", "failed", detail), *unreached]
    engine = build_engine(url, pool_size=1, command_timeout=seconds)
    try:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                current = await _current_revision(engine)
        except Exception as error:
            return [_failed("database", f"cannot reach {target}", error, deadline, seconds), *unreached]
        schema = _schema_check(current)
        results = [CheckResult("database", "ok", target), schema]
        if schema.status != "ok":
            results.append(
                CheckResult("encryption_keys", "skipped", "the schema is not at the newest revision")
            )
            return results
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                results.append(await _key_check(settings, engine))
        except Exception as error:
            what = "cannot read the stored secrets"
            results.append(_failed("encryption_keys", what, error, deadline, seconds))
        return results
    finally:
        await engine.dispose()


async def _redis_check(settings: Settings, seconds: float) -> CheckResult:
    if settings.redis_url is None:
        return CheckResult("redis", "skipped", "CONNECTORS_REDIS_URL is not set")
    url = settings.redis_url.get_secret_value()
    try:
        target = redis_target(url)
        client = Redis.from_url(url, socket_timeout=seconds, socket_connect_timeout=seconds)
    except ValueError:
        return CheckResult("redis", "failed", "CONNECTORS_REDIS_URL is not a Redis URL")
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            await client.ping()
    except Exception as error:
        return _failed("redis", f"PING to {target} failed", error, deadline, seconds)
    finally:
        await client.aclose()
    return CheckResult("redis", "ok", f"{target} answered PING")


async def _caller_token_check(settings: Settings, seconds: float) -> CheckResult:
    """The configured secret or public key loads; a JWKS document is fetched as the service does."""
    try:
        verifier = TokenVerifier(settings)
    except ConfigError as error:
        return CheckResult("caller_tokens", "failed", str(error))
    try:
        if settings.jwks_url is None:
            source = (
                "CONNECTORS_JWT_SECRET" if settings.jwt_secret is not None else "CONNECTORS_JWT_PUBLIC_KEY"
            )
            return CheckResult("caller_tokens", "ok", f"{verifier.algorithm} with {source}")
        where = f"the JWKS document at {_public_url(settings.jwks_url)}"
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                key_ids = await verifier.jwks_key_ids()
        except JwksUnavailable as error:
            return CheckResult("caller_tokens", "failed", f"{where}: {error}")
        except Exception as error:
            return _failed("caller_tokens", f"cannot fetch {where}", error, deadline, seconds)
        noun = "signing key" if len(key_ids) == 1 else "signing keys"
        return CheckResult("caller_tokens", "ok", f"{where}: {len(key_ids)} {noun} ({', '.join(key_ids)})")
    finally:
        await verifier.aclose()


async def run_checks(
    settings: Settings, *, seconds_per_check: float, note: str = "read"
) -> list[CheckResult]:
    """Every check, in order: the settings (``note`` says what to know of them), the database, its
    schema, the encryption keys, Redis and the caller-token verification."""
    return [
        CheckResult("settings", "ok", note),
        *await _database_checks(settings, seconds_per_check),
        await _redis_check(settings, seconds_per_check),
        await _caller_token_check(settings, seconds_per_check),
    ]
