"""Logs at the most verbose level, as ``serve`` configures them, carry no value worth stealing.

The real app runs through its ASGI interface on SQLite and PostgreSQL with
``configure_logging("debug")``; every line the root handler writes (the application's loggers and
every third-party one: SQLAlchemy, the database drivers, httpx, uvicorn...) is kept and searched
for the values of the run: secrets, the token the identity provider issued, the caller's JWT,
ciphertexts read back from the ``secrets`` column, the organization id, connector names and URLs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import secrets
import socket
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.core.config import Settings
from app.core.db import build_engine
from app.core.logs import _QUIETEST, configure_logging
from tests.conftest import ALL_SCOPES, canary
from tests.support.servers import RecordedRequest, Reply, ScriptedServer
from tests.support.service import caller_token, migrate, running_service, service_env

ClientFor = Callable[..., httpx.AsyncClient]


@dataclass
class CapturedLog:
    """The lines written by the root handler ``configure_logging`` installs, in its format."""

    stream: io.StringIO = field(default_factory=io.StringIO)

    def lines(self) -> list[dict[str, Any]]:
        parsed: list[dict[str, Any]] = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return parsed


@pytest.fixture
def debug_log() -> Iterator[CapturedLog]:
    """``configure_logging("debug")`` exactly as ``serve`` calls it, its handler writing to memory.

    Every logger's state is put back afterwards, so later tests see the suite's own setup.
    """
    for name in _QUIETEST:
        logging.getLogger(name)  # so that the state saved below includes them
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [
        logger for logger in list(manager.loggerDict.values()) if isinstance(logger, logging.Logger)
    ]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    captured = CapturedLog()
    configure_logging("debug")
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured.stream)
    try:
        yield captured
    finally:
        for lg, level, handlers, propagate, disabled in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.disabled = disabled
            lg.setLevel(level)


async def _ciphertexts(url: str) -> set[str]:
    """Every value of the ``secrets`` column, read with the bare drivers, which log nothing."""
    parsed = make_url(url)
    query = "SELECT secrets FROM connectors"
    if parsed.get_backend_name() == "sqlite":
        with contextlib.closing(sqlite3.connect(str(parsed.database))) as connection:
            values = [row[0] for row in connection.execute(query)]
    else:
        connection = await asyncpg.connect(
            host=parsed.host,
            port=parsed.port,
            user=parsed.username,
            password=parsed.password,
            database=parsed.database,
        )
        try:
            values = [row[0] for row in await connection.fetch(query)]
        finally:
            await connection.close()
    found: set[str] = set()
    for value in values:
        found.update(json.loads(value).values())
    return found


async def test_debug_logs_hold_no_secret_ciphertext_or_organization(
    debug_log: CapturedLog,
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
) -> None:
    tag = secrets.token_hex(6)
    org = f"org-{tag}"
    issued_token = f"issued-token-{secrets.token_hex(8)}"
    client_secret, new_client_secret, refused_secret = canary("client"), canary("new"), canary("bad")
    oauth_password, basic_password = canary("pw"), canary("basic")
    reject = {"now": False}

    def identity_provider(request: RecordedRequest) -> Reply:
        if request.path.startswith(f"/oauth-{tag}/"):
            if reject["now"]:
                return Reply.json({"error": "invalid_client", "error_description": canary("desc")}, 401)
            return Reply.json({"access_token": issued_token, "token_type": "Bearer", "expires_in": 3600})
        return Reply(status=204)  # the Basic validation URL

    scripted_server.set_default(identity_provider)
    app = await app_factory(settings)
    client = client_for(org, app=app)

    oauth_body = {
        "name": f"OAuth {tag}",
        "resource_domain_url": f"https://oauth-{tag}.example.com/base",
        "auth": {
            "type": "oauth2",
            "grant_type": "password",
            "client_id": f"client-{tag}",
            "client_secret": client_secret,
            "username": f"user-{tag}",
            "password": oauth_password,
            "token_url": scripted_server.url(f"/oauth-{tag}/token"),
            "scope": "read",
        },
    }
    basic_body = {
        "name": f"Basic {tag}",
        "resource_domain_url": f"https://basic-{tag}.example.com",
        "auth": {
            "type": "basic",
            "username": f"basic-user-{tag}",
            "password": basic_password,
            "validation_url": scripted_server.url(f"/check-{tag}"),
        },
    }

    ciphertexts: set[str] = set()
    created = await client.post("/connectors", json=oauth_body)
    assert created.status_code == 201, created.text
    oauth_id = created.json()["id"]
    created = await client.post("/connectors", json=basic_body)
    assert created.status_code == 201, created.text
    basic_id = created.json()["id"]
    ciphertexts |= await _ciphertexts(settings.effective_database_url)

    assert (await client.get("/connectors")).status_code == 200
    assert (await client.get(f"/connectors/{oauth_id}")).status_code == 200
    patched = await client.patch(
        f"/connectors/{oauth_id}",
        json={"name": f"OAuth renamed {tag}", "auth": {"client_secret": new_client_secret}},
    )
    assert patched.status_code == 200, patched.text
    ciphertexts |= await _ciphertexts(settings.effective_database_url)
    assert len(ciphertexts) >= 4

    for connector_id in (oauth_id, basic_id):
        validated = await client.post(f"/connectors/{connector_id}/validate")
        assert validated.status_code == 200, validated.text
    oauth_answer = await client.post(f"/connectors/{oauth_id}/authorize", json={"path": f"/x-{tag}"})
    assert oauth_answer.json()["headers"] == {"Authorization": f"Bearer {issued_token}"}
    basic_answer = await client.post(f"/connectors/{basic_id}/authorize", json={})
    basic_header = basic_answer.json()["headers"]["Authorization"]
    assert basic_header.startswith("Basic ")
    reject["now"] = True
    refused = await client.patch(f"/connectors/{oauth_id}", json={"auth": {"client_secret": refused_secret}})
    assert refused.json()["code"] == "credentials_rejected", refused.text
    assert (await client.get(f"/connectors/{oauth_id}/history")).status_code == 200
    for connector_id in (oauth_id, basic_id):
        assert (await client.delete(f"/connectors/{connector_id}")).status_code == 204

    caller = client.headers["Authorization"].removeprefix("Bearer ")
    values = {
        "organization id": org,
        "client secret": client_secret,
        "new client secret": new_client_secret,
        "refused client secret": refused_secret,
        "OAuth password": oauth_password,
        "Basic password": basic_password,
        "Basic header": basic_header.removeprefix("Basic "),
        "issued token": issued_token,
        "caller token": caller,
        "the run's tag (names, URLs, usernames, client id)": tag,
        **{f"ciphertext {i}": value for i, value in enumerate(sorted(ciphertexts))},
    }
    lines = debug_log.lines()
    access = [line for line in lines if line["logger"] == "connectors.access"]
    assert len(access) == 13
    # The access line names the caller's organization by design; nothing else may.
    assert {line.pop("organization") for line in access} == {org}
    assert any(not line["logger"].startswith("connectors") for line in lines), "no third-party line"
    leaks = [
        f"{what} in {line['logger']}: {json.dumps(line)[:300]}"
        for line in lines
        for what, value in values.items()
        if value in json.dumps(line)
    ]
    assert not leaks, "\n".join(leaks)


async def test_a_failed_statements_error_holds_no_parameter(database_url: str) -> None:
    """What a driver error says (and any traceback printing it) names no bound value."""
    value = f"bound-value-{secrets.token_hex(8)}"
    engine = build_engine(database_url)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as caught:
                await connection.execute(text("INSERT INTO no_such_table (x) VALUES (:x)"), {"x": value})
    finally:
        await engine.dispose()
    assert "no_such_table" in str(caught.value)
    assert value not in str(caught.value)


def test_value_printing_loggers_stay_quiet_at_debug(debug_log: CapturedLog) -> None:
    """Loggers known to print values keep their floor when ``debug`` is asked for."""
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("sqlalchemy.engine.Engine").isEnabledFor(logging.INFO)
    for name in ("aiosqlite", "hpack.hpack", "h2.connection", "websockets.server", "uvicorn.error"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    for name in ("httpx", "httpcore.http11"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name


def _websocket_handshake(port: int, authorization: str) -> bytes:
    """A WebSocket upgrade request carrying ``authorization``; the answer's first bytes."""
    request = (
        "GET /connectors HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Authorization: {authorization}\r\n"
        "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        return sock.recv(1024)


def test_serve_at_debug_logs_no_request_header(tmp_path: Path) -> None:
    """``serve`` at ``debug``: neither an HTTP request nor a WebSocket handshake (which the
    WebSocket library logs header by header at debug) puts the caller's token in the log."""
    env = service_env(
        f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}", tmp_path / "data", log_level="debug"
    )
    migrate(env)
    with running_service(env, tmp_path / "serve.log") as service:
        token = caller_token(env, org=f"org-{secrets.token_hex(6)}", scopes=ALL_SCOPES)
        answer = httpx.get(f"{service.base_url}/connectors", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert _websocket_handshake(service.port, f"Bearer {token}").startswith(b"HTTP/1.1 ")
    records = service.log_records()
    assert any(record["level"] == "debug" for record in records), "no debug line at all"
    assert token not in service.stderr()
