"""The command line, run as real processes: configuration errors, migrations, serve, token."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

CANARY_SECRET = "CANARY-jwt-secret-0123456789abcdef0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTORS_")}
    return {
        **base,
        "CONNECTORS_DATA_DIR": str(tmp_path / "data"),
        "CONNECTORS_DEV_KEYS": "true",
        "CONNECTORS_PORT": str(_free_port()),
    }


def run(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def explicit_keys(env: dict[str, str]) -> dict[str, str]:
    """The environment with a JWT secret and an encryption key set, and no development keys."""
    return {
        **env,
        "CONNECTORS_DEV_KEYS": "false",
        "CONNECTORS_JWT_SECRET": CANARY_SECRET,
        "CONNECTORS_ENCRYPTION_KEYS": "k1:" + "A" * 43,
    }


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CONNECTORS_PORT", "eighty", "CONNECTORS_PORT"),
        ("CONNECTORS_DATABASE_URL", "mysql://x", "CONNECTORS_DATABASE_URL"),
        ("CONNECTORS_ENCRYPTION_KEYS", "k1:CANARYnotbase64", "CONNECTORS_ENCRYPTION_KEYS"),
        ("CONNECTORS_MAX_CONNECTORS_PER_ORG", "0", "CONNECTORS_MAX_CONNECTORS_PER_ORG"),
    ],
)
def test_a_bad_setting_stops_with_one_line(env: dict[str, str], name: str, value: str, expected: str) -> None:
    result = run({**env, name: value}, "serve")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "CANARY" not in result.stderr


def test_missing_keys_without_dev_keys(env: dict[str, str]) -> None:
    result = run({**env, "CONNECTORS_DEV_KEYS": "false"}, "serve")
    assert result.returncode == 2
    assert "CONNECTORS_ENCRYPTION_KEYS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_refuses_an_unmigrated_database(env: dict[str, str]) -> None:
    result = run(env, "serve")
    assert result.returncode == 2
    assert "python -m app migrate" in result.stderr


def test_token_command_mints_a_verifiable_token(env: dict[str, str]) -> None:
    env = {**env, "CONNECTORS_DEV_KEYS": "false", "CONNECTORS_JWT_SECRET": CANARY_SECRET}
    env["CONNECTORS_ENCRYPTION_KEYS"] = "k1:" + "A" * 43
    result = run(env, "token", "--org", "acme", "--scope", "connectors:read", "--ttl", "60")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), CANARY_SECRET, algorithms=["HS256"], audience="connectors")
    assert claims["org_id"] == "acme"
    assert claims["scope"] == "connectors:read"
    assert claims["iss"] == "connectors"
    assert CANARY_SECRET not in result.stderr


def test_token_needs_no_encryption_key(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "CONNECTORS_DEV_KEYS"}
    result = run({**env, "CONNECTORS_JWT_SECRET": CANARY_SECRET}, "token", "--org", "acme")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), CANARY_SECRET, algorithms=["HS256"], audience="connectors")
    assert claims["org_id"] == "acme"
    assert result.stderr == ""
    assert not Path(env["CONNECTORS_DATA_DIR"]).exists()


def test_token_elsewhere_creates_nothing_and_says_where_it_looked(
    env: dict[str, str], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in env.items() if k != "CONNECTORS_DATA_DIR"}
    result = run(env, "token", "--org", "acme", cwd=elsewhere)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "CONNECTORS_JWT_SECRET" in lines[0]
    assert str(elsewhere.resolve() / "data" / "dev-keys.json") in lines[0]
    assert list(elsewhere.iterdir()) == []


def test_token_names_the_development_key_file_it_read(env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "elsewhere" / "data" / "dev-keys.json"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(
        json.dumps({"CONNECTORS_JWT_SECRET": CANARY_SECRET, "CONNECTORS_ENCRYPTION_KEYS": "dev1:" + "A" * 43})
    )
    env = {k: v for k, v in env.items() if k != "CONNECTORS_DATA_DIR"}
    result = run(env, "token", "--org", "acme", cwd=key_file.parent.parent)
    assert result.returncode == 0, result.stderr
    jwt.decode(result.stdout.strip(), CANARY_SECRET, algorithms=["HS256"], audience="connectors")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(key_file.resolve()) in lines[0]
    assert "CANARY" not in result.stderr
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["dev-keys.json"]


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.1", "address already in use"), ("192.0.2.1", "cannot assign requested address")],
)
def test_serve_that_cannot_listen_says_so_in_one_line(env: dict[str, str], host: str, reason: str) -> None:
    env = explicit_keys(env)
    assert run(env, "migrate").returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run({**env, "CONNECTORS_HOST": host, "CONNECTORS_PORT": str(port)}, "serve")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"connectors: cannot listen on {host}:{port}: {reason}"]
    assert "startup complete" not in result.stderr


@pytest.mark.parametrize("command", [["migrate"], ["serve"], ["token", "--org", "acme"]])
def test_unknown_variables_are_named_in_one_warning(env: dict[str, str], command: list[str]) -> None:
    env = {
        **env,
        "CONNECTORS_DATABSE_URL": "sqlite+aiosqlite:///CANARY.db",
        "CONNECTORS_COLOUR": "CANARY",
        "CONNECTORS_JWT_SECRET": CANARY_SECRET,
        "CONNECTORS_LOG_LEVEL": "info",
        "CONNECTORS_TEST_POSTGRES_URL": "postgresql+asyncpg://nowhere/x",
        "CONNECTORS_TEST_REDIS_URL": "redis://nowhere",
    }
    result = run(env, *command)
    warnings = [line for line in result.stderr.splitlines() if "unknown settings ignored" in line]
    assert len(warnings) == 1, result.stderr
    message = json.loads(warnings[0])["message"]
    assert message == (
        "unknown settings ignored: CONNECTORS_COLOUR,"
        " CONNECTORS_DATABSE_URL (did you mean CONNECTORS_DATABASE_URL?)"
    )
    assert "CANARY" not in result.stderr


@pytest.mark.parametrize(
    ("command", "relative"),
    [
        (["migrate"], False),
        (["migrate"], True),
        (["serve"], False),
        (["token", "--org", "acme"], False),
        (["rotate-keys"], True),
    ],
)
def test_sqlite_database_in_a_missing_directory_is_refused(
    env: dict[str, str], tmp_path: Path, command: list[str], relative: bool
) -> None:
    missing = tmp_path / "missing" / "dir"
    path = "missing/dir/x.db" if relative else str(missing / "x.db")
    env = {**explicit_keys(env), "CONNECTORS_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    result = run(env, *command, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("connectors: CONNECTORS_DATABASE_URL: ")
    assert lines[0].endswith(f"the directory {missing.resolve()} does not exist")
    assert not (tmp_path / "missing").exists()


def test_migrate_creates_the_sqlite_file_in_an_existing_directory(
    env: dict[str, str], tmp_path: Path
) -> None:
    database = tmp_path / "db" / "connectors.db"
    database.parent.mkdir()
    result = run({**env, "CONNECTORS_DATABASE_URL": f"sqlite+aiosqlite:///{database}"}, "migrate")
    assert result.returncode == 0, result.stderr
    assert database.is_file()


def test_the_default_database_is_made_under_data_and_reused(env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in env.items() if k != "CONNECTORS_DATA_DIR"}
    for _ in range(2):
        result = run(env, "migrate", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "connectors.db").is_file()


@pytest.fixture
def served(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str, dict[str, str]]]:
    migrated = run(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{env['CONNECTORS_PORT']}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("the server did not start")
        yield process, base, env
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_answers_logs_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[str], str, dict[str, str]],
) -> None:
    process, base, env = served
    token = run(env, "token", "--org", "acme").stdout.strip()
    listing = httpx.get(f"{base}/connectors", headers={"Authorization": f"Bearer {token}"})
    assert listing.status_code == 200
    assert listing.json() == {"items": [], "limit": 5}
    assert httpx.get(f"{base}/readyz").status_code == 200
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert process.stderr is not None
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert sum("generated development keys" in m for m in messages) == 1
    assert any("shutdown complete" in m for m in messages)
    access = [line for line in lines if line["logger"] == "connectors.access"]
    listed = next(line for line in access if line["route"] == "/connectors")
    assert listed["method"] == "GET"
    assert listed["status"] == 200
    assert listed["organization"] == "acme"
    assert isinstance(listed["duration_ms"], float)
    assert token not in json.dumps(lines)
    assert (Path(env["CONNECTORS_DATA_DIR"]) / "dev-keys.json").stat().st_mode & 0o077 == 0


async def test_rotate_keys_command(env: dict[str, str]) -> None:
    import base64
    import secrets

    from sqlalchemy import select

    from app.connectors.models import Connector
    from app.core.config import Settings
    from app.core.db import Database, build_engine
    from app.main import create_app

    old = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    new = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    env = {**env, "CONNECTORS_DEV_KEYS": "false", "CONNECTORS_JWT_SECRET": "s" * 40}
    assert run(env, "migrate").returncode == 0
    url = f"sqlite+aiosqlite:///{Path(env['CONNECTORS_DATA_DIR']) / 'connectors.db'}"
    settings = Settings(database_url=url, jwt_secret="s" * 40, encryption_keys=f"old:{old}")
    app = create_app(settings)
    from app.core.auth import mint_token

    token = mint_token(settings, organization_id="acme", scopes=["connectors:write"])
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token}"},
        ) as client,
    ):
        for i in range(3):
            body = {
                "name": f"c{i}",
                "resource_domain_url": "https://api.example.com",
                "auth": {
                    "type": "basic",
                    "username": "u",
                    "password": f"CANARY-{i}",
                    "validation_url": "https://a.example.com/",
                },
            }
            assert (
                await client.post("/connectors", json=body, params={"validate": "false"})
            ).status_code == 201

    result = run(
        {**env, "CONNECTORS_ENCRYPTION_KEYS": f"new:{new},old:{old}"}, "rotate-keys", "--batch-size", "2"
    )
    assert result.returncode == 0, result.stderr
    finished = [json.loads(line) for line in result.stderr.splitlines() if "key rotation finished" in line]
    assert finished[0]["rotated"] == 3
    db = Database(build_engine(url))
    async with db.read() as session:
        assert {row.key_id for row in (await session.execute(select(Connector))).scalars()} == {"new"}
    await db.dispose()
