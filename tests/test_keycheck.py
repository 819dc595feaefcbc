"""The key ring checked against the stored secrets: `serve` refuses a ring that cannot open them.

Data is written through the real app under one key ring; `python -m app serve` then starts as a
real process with another, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import event, select

from app.connectors.models import Connector
from app.core.auth import mint_token
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.keycheck import check_key_ring
from app.main import create_app
from tests.connectors import payloads
from tests.connectors.test_crud import create
from tests.support.service import running_service, service_env


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


async def _store(settings: Settings, ring: str, *bodies: dict[str, Any]) -> list[str]:
    """Create connectors through the app with the key ring ``ring``; their ids."""
    ringed = settings.model_copy(update={"encryption_keys": SecretStr(ring)})
    app = create_app(ringed)
    token = mint_token(ringed, organization_id="org-a", scopes=["connectors:write"])
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token}"},
        ) as client,
    ):
        return [str((await create(client, body))["id"]) for body in bodies]


async def _ciphertexts(database_url: str) -> list[str]:
    db = Database(build_engine(database_url))
    try:
        async with db.read() as session:
            rows = (await session.execute(select(Connector))).scalars()
            return [token.rsplit(":", 1)[1] for row in rows for token in row.secrets.values()]
    finally:
        await db.dispose()


def _serve(database_url: str, data_dir: Path, ring: str) -> subprocess.CompletedProcess[str]:
    env = service_env(database_url, data_dir, encryption_keys=ring)
    return subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "CANARY" not in result.stderr
    return lines[0]


async def test_serve_refuses_a_key_id_with_other_bytes(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    right, wrong = _key(), _key()
    ids = await _store(settings, f"k1:{right}", payloads.basic(), payloads.password_grant())
    line = _refusal(_serve(database_url, tmp_path / "data", f"k1:{wrong}"))
    assert "key id k1 of CONNECTORS_ENCRYPTION_KEYS cannot open the stored secrets of connector" in line
    assert any(connector_id in line for connector_id in ids)
    assert right not in line and wrong not in line
    for ciphertext in await _ciphertexts(database_url):
        assert ciphertext not in line


async def test_serve_names_the_key_ids_the_ring_lacks(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    k0, k2 = _key(), _key()
    # A rotation to k2 that stopped half-way: one connector still under k0, one under k2.
    (under_k0,) = await _store(settings, f"k0:{k0}", payloads.basic(name="old"))
    (under_k2,) = await _store(settings, f"k2:{k2},k0:{k0}", payloads.client_credentials(name="new"))

    line = _refusal(_serve(database_url, tmp_path / "data", f"k1:{_key()}"))
    assert "the stored secrets need key ids k0, k2, which CONNECTORS_ENCRYPTION_KEYS does not hold" in line

    line = _refusal(_serve(database_url, tmp_path / "data", f"k2:{k2}"))
    assert "the stored secrets need key id k0, which CONNECTORS_ENCRYPTION_KEYS does not hold" in line
    assert "k2" not in line

    line = _refusal(_serve(database_url, tmp_path / "data", f"k2:{k2},k0:{_key()}"))
    assert (
        f"key id k0 of CONNECTORS_ENCRYPTION_KEYS cannot open the stored secrets of connector {under_k0}"
        in line
    )
    assert under_k2 not in line and "k2" not in line


async def test_serve_starts_with_the_ring_that_wrote_the_data(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    k0, k2 = _key(), _key()
    await _store(settings, f"k0:{k0}", payloads.basic(name="old"))
    await _store(settings, f"k2:{k2},k0:{k0}", payloads.client_credentials(name="new"))
    env = service_env(database_url, tmp_path / "data", encryption_keys=f"k2:{k2},k0:{k0}")
    with running_service(env, tmp_path / "serve.log") as service:
        assert httpx.get(f"{service.base_url}/readyz").status_code == 200


async def test_the_check_reads_one_sample_per_key_id(database_url: str, settings: Settings) -> None:
    k0, k2 = _key(), _key()
    await _store(settings, f"k0:{k0}", *(payloads.basic(name=f"old-{i}") for i in range(3)))
    await _store(settings, f"k2:{k2},k0:{k0}", *(payloads.password_grant(name=f"new-{i}") for i in range(2)))
    db = Database(build_engine(database_url))
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        found = await check_key_ring(db, KeyRing([("k2", _raw(k2)), ("k0", _raw(k0))]))
        assert found.ok and found.opened == ("k0", "k2")
        queries = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        # One for the key ids in use, then one connector under each: never every row; and one for
        # the key ids of webhook secrets (none here).
        assert len(queries) == 4, queries

        lacking = await check_key_ring(db, KeyRing([("k2", _raw(k2))]))
        assert (lacking.missing, lacking.unreadable, lacking.opened) == (("k0",), (), ("k2",))
    finally:
        await db.dispose()


def _raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
