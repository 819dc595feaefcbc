"""Secrets at rest: never stored in plain text, bound to their row and field, rotatable."""

from __future__ import annotations

import base64
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from app.connectors.models import Connector
from app.core.config import Settings
from app.core.crypto import DecryptionError, KeyRing, secret_aad
from app.core.db import Database, build_engine
from app.rotation import rotate
from tests.connectors import payloads
from tests.connectors.test_crud import create


async def _rows(url: str) -> list[Connector]:
    db = Database(build_engine(url))
    try:
        async with db.read() as session:
            return list((await session.execute(select(Connector))).scalars())
    finally:
        await db.dispose()


async def test_no_secret_in_the_database_in_plain_text(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    bodies = [
        payloads.basic(name="b"),
        payloads.password_grant(name="p"),
        payloads.client_credentials(name="c"),
    ]
    sent: list[str] = []
    for body in bodies:
        sent += [v for k, v in body["auth"].items() if k in ("password", "client_secret")]
        await create(client, body)
    assert len(sent) == 4
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite+aiosqlite:///"))
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert raw, "the database file is empty"
        assert b"svc-user" in raw  # the search does find plain text that is stored
    else:
        engine = build_engine(database_url)
        async with engine.connect() as connection:
            result = await connection.execute(text("SELECT CAST(c.* AS text) FROM connectors c"))
            raw = "\n".join(row[0] for row in result).encode()
        await engine.dispose()
        assert b"svc-user" in raw
    for secret in sent:
        assert secret.encode() not in raw
        assert base64.b64encode(secret.encode()) not in raw


async def test_ciphertext_is_bound_to_its_row_and_field(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    first = await create(client, payloads.password_grant(name="first"))
    second = await create(client, payloads.password_grant(name="second"))
    rows = {str(row.id): row for row in await _rows(database_url)}
    ring = KeyRing.from_settings(settings)
    a, b = rows[first["id"]], rows[second["id"]]
    ring.decrypt(a.secrets["password"], aad=secret_aad("org-a", a.id, "password"))
    with pytest.raises(DecryptionError):
        ring.decrypt(a.secrets["password"], aad=secret_aad("org-a", b.id, "password"))
    with pytest.raises(DecryptionError):
        ring.decrypt(a.secrets["password"], aad=secret_aad("org-a", a.id, "client_secret"))
    with pytest.raises(DecryptionError):
        ring.decrypt(a.secrets["password"], aad=secret_aad("org-b", a.id, "password"))


async def _create_rows(client: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    return [await create(client, payloads.password_grant(name=f"c{i}")) for i in range(count)]


async def test_rotation_reencrypts_everything_and_is_rerunnable(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    await _create_rows(client, 5)
    assert settings.encryption_keys is not None
    old = settings.encryption_keys.get_secret_value()
    old_ring = KeyRing(_ring_pairs(old))
    plain_before = {
        (str(row.id), name): old_ring.decrypt(token, aad=secret_aad(row.organization_id, row.id, name))
        for row in await _rows(database_url)
        for name, token in row.secrets.items()
    }
    new_key = secrets.token_bytes(32)
    rotated = KeyRing([("k2", new_key), *_ring_pairs(old)])
    db = Database(build_engine(database_url))
    try:
        report = await rotate(db, rotated, batch_size=2)
        assert (report.rotated, report.failed) == (5, 0)
        again = await rotate(db, rotated, batch_size=2)
        assert (again.rotated, again.skipped, again.failed) == (0, 0, 0)
    finally:
        await db.dispose()
    only_new = KeyRing([("k2", new_key)])
    for row in await _rows(database_url):
        assert row.key_id == "k2"
        for name, token in row.secrets.items():
            assert (
                only_new.decrypt(token, aad=secret_aad(row.organization_id, row.id, name))
                == plain_before[(str(row.id), name)]
            )


def _ring_pairs(raw: str) -> list[tuple[str, bytes]]:
    pairs = []
    for part in raw.split(","):
        key_id, _, encoded = part.partition(":")
        pairs.append((key_id, base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))))
    return pairs


class _Crash(Exception):
    pass


class _CrashingRing(KeyRing):
    """Fails part-way, as a process killed in the middle of a batch would."""

    def __init__(self, keys: list[tuple[str, bytes]], crash_after: int) -> None:
        super().__init__(keys)
        self.left = crash_after

    def encrypt(self, plaintext: str, *, aad: bytes) -> str:
        self.left -= 1
        if self.left < 0:
            raise _Crash()
        return super().encrypt(plaintext, aad=aad)


async def test_interrupted_rotation_finishes_on_rerun(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    await _create_rows(client, 4)
    assert settings.encryption_keys is not None
    keys = [("k2", secrets.token_bytes(32)), *_ring_pairs(settings.encryption_keys.get_secret_value())]
    db = Database(build_engine(database_url))
    try:
        # Batches of one row (two secrets each): the crash hits the third row's batch.
        with pytest.raises(_Crash):
            await rotate(db, _CrashingRing(keys, crash_after=5), batch_size=1)
        assert sorted(row.key_id for row in await _rows(database_url)) == ["k1", "k1", "k2", "k2"]
        report = await rotate(db, KeyRing(keys), batch_size=1)
        assert (report.rotated, report.failed) == (2, 0)
    finally:
        await db.dispose()
    assert {row.key_id for row in await _rows(database_url)} == {"k2"}


async def test_rotation_skips_a_row_changed_meanwhile(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    created = await create(client, payloads.basic())
    db = Database(build_engine(database_url))
    try:
        async with db.write() as session:
            from app.connectors.repository import RotationRepository

            repo = RotationRepository(session)
            (row,) = await repo.batch_not_under("k9", 10)
            await session.execute(
                update(Connector).where(Connector.id == uuid.UUID(created["id"])).values(key_id="k1")
            )
            assert not await repo.replace_secrets(row.organization_id, row.id, "old", row.version, {}, "k9")
    finally:
        await db.dispose()


async def test_rotation_never_undoes_secrets_written_under_the_old_key_meanwhile(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    """A replica not yet given the new ring writes a new password under the old key between the
    rotation's read and its write: the rotation leaves that row, then rotates the new password."""
    created = await create(client, payloads.basic())
    assert settings.encryption_keys is not None
    keys = [("k2", secrets.token_bytes(32)), *_ring_pairs(settings.encryption_keys.get_secret_value())]
    ring = KeyRing(keys)
    db = Database(build_engine(database_url))
    try:
        from app.connectors.repository import RotationRepository

        # The rotation's read and its write, with the update in between (on SQLite a write
        # transaction excludes the service's, so they are two here; the write's condition is
        # what is tested).
        async with db.read() as session:
            (row,) = await RotationRepository(session).batch_not_under("k2", 10)
        aad = secret_aad(row.organization_id, row.id, "password")
        resealed = {"password": ring.encrypt(ring.decrypt(row.secrets["password"], aad=aad), aad=aad)}
        new_password = payloads.basic()["auth"]["password"]
        # The service (its ring still k1 first) saves a new password: same key id, new version.
        patched = await client.patch(
            f"/connectors/{created['id']}",
            json={"auth": {"password": new_password}},
            params={"validate": "false"},
        )
        assert patched.status_code == 200, patched.text
        async with db.write() as session:
            repo = RotationRepository(session)
            assert not await repo.replace_secrets(
                row.organization_id, row.id, "k1", row.version, resealed, "k2"
            )
        report = await rotate(db, ring)
        assert (report.rotated, report.failed) == (1, 0)
    finally:
        await db.dispose()
    (stored,) = await _rows(database_url)
    assert stored.key_id == "k2"
    aad = secret_aad(stored.organization_id, stored.id, "password")
    assert ring.decrypt(stored.secrets["password"], aad=aad) == new_password
