"""The command line, run as real processes: configuration errors, migrations, serve, token, help,
version and check."""

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
from typing import Any

import httpx
import jwt
import pytest

from app.core.config import Settings

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


# Help, version and check -------------------------------------------------------------------------


def _options(help_text: str) -> dict[str, str]:
    """Each option of a --help output (but -h) with its help text, wrapped lines joined."""
    options: dict[str, str] = {}
    current: str | None = None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            options[current] = line
        elif line.startswith("   ") and current is not None:
            options[current] += " " + line.strip()
        else:
            current = None
    options.pop("-h")
    return options


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            [],
            [
                "serve the HTTP API",
                "bring the database schema to the newest revision",
                "print a caller JWT signed with the HS256 secret",
                "print a single-use sign-in link to the admin console (development)",
                "re-encrypt every stored secret under the newest key",
                "check settings, database, keys, Redis and caller tokens",
                "--version",
                "CONNECTORS_* environment variables (README.md",
            ],
        ),
        (["serve"], ["CONNECTORS_HOST:CONNECTORS_PORT (default: 127.0.0.1:8000)"]),
        (
            ["migrate"],
            [
                "CONNECTORS_DATABASE_URL (default: SQLite at $CONNECTORS_DATA_DIR/connectors.db,"
                " where CONNECTORS_DATA_DIR defaults to data)"
            ],
        ),
        (
            ["token"],
            [
                "(required)",
                "(default: connectors:read connectors:write connectors:authorize)",
                "lifetime in seconds (default: 3600)",
                "(default: dev)",
            ],
        ),
        (["rotate-keys"], ["connectors re-encrypted per transaction (default: 100)"]),
        (["console-link"], ["(required)", "(default: dev-admin)", "CONNECTORS_DEV_KEYS=true"]),
        (["check"], ["(default: 5.0)", "(default: False)", "0 when every check passed, 1 when one failed"]),
    ],
)
def test_help_states_the_defaults(env: dict[str, str], command: list[str], expected: list[str]) -> None:
    result = run({**env, "COLUMNS": "200"}, *command, "--help")
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout
    for option, text in _options(result.stdout).items():
        assert "(default: " in text or "(required)" in text or option == "--version", text


def test_version(env: dict[str, str]) -> None:
    from app import __version__

    result = run(env, "--version")
    assert result.returncode == 0
    assert result.stdout == f"connectors {__version__}\n"


CANARY_KEY = "CANARY" + "A" * 37  # 43 base64 characters: 32 bytes


def check_env(env: dict[str, str], database_url: str, **settings: str) -> dict[str, str]:
    """Explicit keys (canaries) and ``database_url``; ``settings`` maps names without the prefix."""
    return {
        **env,
        "CONNECTORS_DEV_KEYS": "false",
        "CONNECTORS_JWT_SECRET": CANARY_SECRET,
        "CONNECTORS_ENCRYPTION_KEYS": f"k1:{CANARY_KEY}",
        "CONNECTORS_DATABASE_URL": database_url,
        **{f"CONNECTORS_{name.upper()}": value for name, value in settings.items()},
    }


def verdicts(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """``check``'s summary: each check's name with its verdict and detail; no secret in it."""
    assert "CANARY" not in result.stdout + result.stderr
    *lines, last = result.stdout.splitlines()
    assert last == "all checks passed" if result.returncode == 0 else last.endswith("failed")
    found: dict[str, tuple[str, str]] = {}
    for line in lines:
        verdict, name, detail = line.split(None, 2)
        found[name] = (verdict, detail)
    assert list(found) == ["settings", "database", "schema", "encryption_keys", "redis", "caller_tokens"]
    return found


def _target(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return f"sqlite {url.database}"
    return f"postgresql {url.host}:{url.port or 5432}/{url.database}"


@pytest.mark.parametrize("with_redis", [False, True], ids=["without-redis", "with-redis"])
def test_check_passes_on_a_migrated_database(
    env: dict[str, str], database_url: str, with_redis: bool, request: pytest.FixtureRequest
) -> None:
    from app.migrations import head_revision

    env = check_env(env, database_url)
    if with_redis:
        redis = request.getfixturevalue("own_redis")
        env["CONNECTORS_REDIS_URL"] = redis.url
    result = run(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    found = verdicts(result)
    assert found["settings"] == ("ok", "read from the environment")
    assert found["database"] == ("ok", _target(database_url))
    assert found["schema"] == ("ok", f"at revision {head_revision()}, the newest")
    assert found["encryption_keys"] == ("ok", "no stored secrets to open yet; the key ring holds k1")
    if with_redis:
        assert found["redis"] == ("ok", f"127.0.0.1:{redis.port}/0 answered PING")
    else:
        assert found["redis"] == ("skipped", "CONNECTORS_REDIS_URL is not set")
    assert found["caller_tokens"] == ("ok", "HS256 with CONNECTORS_JWT_SECRET")

    as_json = run(env, "check", "--json")
    assert as_json.returncode == 0
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is True
    assert [(c["name"], c["status"], c["detail"]) for c in summary["checks"]] == [
        (name, verdict.lower(), detail) for name, (verdict, detail) in found.items()
    ]


@pytest.mark.parametrize("revision", ["base", "previous"])
async def test_check_fails_on_a_database_behind_the_newest_revision(
    env: dict[str, str], database_url: str, revision: str
) -> None:
    from alembic.script import ScriptDirectory

    from app.migrations import alembic_config, head_revision, upgrade
    from tests.test_migrations import _downgrade, _run

    head = head_revision()
    assert head is not None
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head).down_revision
    assert isinstance(previous, str)
    await _run(database_url, _downgrade, previous if revision == "previous" else "base")
    try:
        result = run(check_env(env, database_url), "check")
    finally:
        await upgrade(database_url)
    assert result.returncode == 1
    found = verdicts(result)
    assert found["database"][0] == "ok"
    if revision == "base":
        expected = f"not migrated (the newest revision is {head}): run `python -m app migrate`"
    else:
        expected = f"at revision {previous}, the newest is {head}: run `python -m app migrate`"
    assert found["schema"] == ("FAILED", expected)
    assert found["encryption_keys"] == ("skipped", "the schema is not at the newest revision")
    assert result.stdout.splitlines()[-1] == "1 check failed"


def test_check_creates_nothing_where_there_is_no_database(env: dict[str, str], tmp_path: Path) -> None:
    data = Path(env["CONNECTORS_DATA_DIR"])
    result = run(env, "check")  # development keys, the default SQLite file under a missing directory
    assert result.returncode == 1
    found = verdicts(result)
    assert found["settings"] == (
        "ok",
        f"read from the environment; no development keys at {data / 'dev-keys.json'} yet"
        " (serve generates them): checked with keys made for this check",
    )
    assert found["database"] == (
        "FAILED",
        f"no SQLite database at {data / 'connectors.db'}: run `python -m app migrate`",
    )
    assert found["schema"] == ("skipped", "the database was not reached")
    assert found["encryption_keys"] == ("skipped", "the database was not reached")
    assert not data.exists()


async def test_check_names_the_key_id_that_cannot_open_the_stored_secrets(
    env: dict[str, str], database_url: str, settings: Settings, client: httpx.AsyncClient
) -> None:
    import base64
    import secrets

    from tests.connectors import payloads
    from tests.connectors.test_crud import create

    connector_id = (await create(client, payloads.basic()))["id"]
    assert settings.encryption_keys is not None
    right = settings.encryption_keys.get_secret_value()
    result = run({**check_env(env, database_url), "CONNECTORS_ENCRYPTION_KEYS": right}, "check")
    assert result.returncode == 0, result.stdout
    assert verdicts(result)["encryption_keys"] == (
        "ok",
        "the key ring (k1) opens the stored secrets (under k1)",
    )
    assert right.split(":")[1] not in result.stdout

    wrong = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    result = run({**check_env(env, database_url), "CONNECTORS_ENCRYPTION_KEYS": f"k1:{wrong}"}, "check")
    assert result.returncode == 1
    verdict, detail = verdicts(result)["encryption_keys"]
    assert verdict == "FAILED"
    assert detail.startswith(
        f"key id k1 of CONNECTORS_ENCRYPTION_KEYS cannot open the stored secrets of connector {connector_id}"
    )
    assert wrong not in result.stdout


def test_check_reports_a_database_it_cannot_reach_without_its_password(env: dict[str, str]) -> None:
    port = _free_port()  # nothing listens there
    url = f"postgresql+asyncpg://connectors:CANARY-db-password@127.0.0.1:{port}/connectors"
    result = run(check_env(env, url), "check")
    assert result.returncode == 1
    found = verdicts(result)
    assert found["database"] == (
        "FAILED",
        f"cannot reach postgresql 127.0.0.1:{port}/connectors: ConnectionRefusedError",
    )
    assert found["schema"] == ("skipped", "the database was not reached")


def test_check_gives_up_on_a_database_that_does_not_answer(env: dict[str, str]) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"postgresql+asyncpg://connectors:CANARY-db-password@127.0.0.1:{port}/connectors"
        result = run(check_env(env, url), "check", "--timeout", "0.5")
    assert result.returncode == 1
    assert verdicts(result)["database"] == (
        "FAILED",
        f"cannot reach postgresql 127.0.0.1:{port}/connectors: no answer within 0.5 s",
    )


@pytest.mark.parametrize("redis", ["closed-port", "wrong-credentials"])
def test_check_reports_a_redis_failure_without_its_password(
    env: dict[str, str], tmp_path: Path, redis: str, request: pytest.FixtureRequest
) -> None:
    database = tmp_path / "connectors.db"
    env = check_env(env, f"sqlite+aiosqlite:///{database}")
    assert run(env, "migrate").returncode == 0
    if redis == "closed-port":
        port, error = _free_port(), "ConnectionError"
    else:
        port, error = request.getfixturevalue("own_redis").port, "AuthenticationError"
    env["CONNECTORS_REDIS_URL"] = f"redis://checker:CANARY-redis-password@127.0.0.1:{port}/0"
    result = run(env, "check")
    assert result.returncode == 1
    found = verdicts(result)
    assert found["redis"] == ("FAILED", f"PING to 127.0.0.1:{port}/0 failed: {error}")
    assert [name for name, (verdict, _) in found.items() if verdict != "ok"] == ["redis"]


def test_check_fetches_the_jwks_document(
    env: dict[str, str], tmp_path: Path, scripted_server: Any, local_ca: Any
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    from tests.support.servers import Reply

    database = tmp_path / "connectors.db"
    env = check_env(env, f"sqlite+aiosqlite:///{database}")
    assert run(env, "migrate").returncode == 0
    del env["CONNECTORS_JWT_SECRET"]
    env["CONNECTORS_CA_BUNDLE"] = str(local_ca.ca_bundle)
    env["CONNECTORS_JWKS_URL"] = scripted_server.url("/keys.json")
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    jwk = {**RSAAlgorithm.to_jwk(public, as_dict=True), "kid": "idp-1", "use": "sig"}
    where = f"the JWKS document at {scripted_server.url('/keys.json')}"

    scripted_server.queue(Reply.json({"keys": [jwk]}), Reply(status=500))
    result = run(env, "check")
    assert result.returncode == 0, result.stdout
    assert verdicts(result)["caller_tokens"] == ("ok", f"{where}: 1 signing key (idp-1)")

    result = run(env, "check")
    assert result.returncode == 1
    assert verdicts(result)["caller_tokens"] == ("FAILED", f"{where}: HTTP status 500")
    assert [request.path for request in scripted_server.requests] == ["/keys.json", "/keys.json"]

    del env["CONNECTORS_JWKS_URL"]
    result = run({**env, "CONNECTORS_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nCANARY"}, "check")
    assert result.returncode == 1
    assert verdicts(result)["caller_tokens"] == ("FAILED", "CONNECTORS_JWT_PUBLIC_KEY: not a PEM public key")


@pytest.mark.parametrize(
    ("name", "value"),
    [("CONNECTORS_PORT", "eighty"), ("CONNECTORS_ENCRYPTION_KEYS", "k1:CANARYnotbase64")],
)
def test_check_with_a_bad_setting_stops_with_one_line(env: dict[str, str], name: str, value: str) -> None:
    result = run({**explicit_keys(env), name: value}, "check", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"connectors: {name}: ")
    assert "CANARY" not in result.stderr
