"""Acknowledged writes survive the process being killed: SIGKILL, restart, read back.

A write is acknowledged when its success response reached the client. The service sends it only
after the transaction committed, so whatever happens to the process afterwards, the write must be
there when a new process opens the same database. Each test runs on SQLite and on PostgreSQL.

The checks read connectors back through the API of the restarted process, and authorize every
Basic connector: the header carries the decrypted password, so a secret that was lost, torn or
left under the wrong associated data fails the test, not just a missing row.
"""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CANARY, canary
from tests.support.service import (
    ServiceProcess,
    caller_token,
    free_port,
    migrate,
    running_service,
    service_env,
)

NO_CHECK = {"validate": "false"}


@dataclass
class Expected:
    """What a connector must look like after the restart."""

    name: str
    username: str
    password: str
    version: int


def basic_body(name: str, username: str, password: str) -> dict[str, Any]:
    return {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "basic",
            "username": username,
            "password": password,
            "validation_url": "https://127.0.0.1:9/auth/check",
        },
    }


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@pytest.fixture
def org() -> str:
    # A fresh organization as well as a fresh database: nothing another test wrote can match.
    return f"org-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = service_env(database_url, tmp_path / "data", max_connectors_per_org="500")
    migrate(env)
    return env


def restarted(env: dict[str, str], log: Path) -> AbstractContextManager[ServiceProcess]:
    """The same settings and database, on a port of its own."""
    return running_service({**env, "CONNECTORS_PORT": str(free_port())}, log)


def check_survivors(
    service: ServiceProcess, env: dict[str, str], org: str, expected: dict[str, Expected], gone: set[str]
) -> None:
    """The restarted service has exactly ``expected`` (secrets included), and none of ``gone``."""
    headers = {"Authorization": f"Bearer {caller_token(env, org)}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=10) as client:
        listing = client.get("/connectors")
        assert listing.status_code == 200, listing.text
        found = {item["id"]: item for item in listing.json()["items"]}
        assert set(found) == set(expected)
        for connector_id, want in expected.items():
            item = found[connector_id]
            assert (item["name"], item["auth"]["username"], item["version"]) == (
                want.name,
                want.username,
                want.version,
            )
            answer = client.post(f"/connectors/{connector_id}/authorize", json={"path": "/x"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["headers"]["Authorization"] == basic_header(want.username, want.password)
        for connector_id in gone:
            assert client.get(f"/connectors/{connector_id}").status_code == 404
            assert client.post(f"/connectors/{connector_id}/authorize", json={}).status_code == 404
        # The database is writable again: no lock or half-written state left by the killed process.
        created = client.post("/connectors", json=basic_body("after restart", "u", "p"), params=NO_CHECK)
        assert created.status_code == 201, created.text
        assert client.delete(f"/connectors/{created.json()['id']}").status_code == 204


def assert_no_secret_logged(*services: ServiceProcess) -> None:
    for service in services:
        assert CANARY not in service.stderr()


def test_acknowledged_writes_survive_sigkill(env: dict[str, str], org: str, tmp_path: Path) -> None:
    expected: dict[str, Expected] = {}
    gone: set[str] = set()
    headers = {"Authorization": f"Bearer {caller_token(env, org)}"}

    with (
        running_service(env, tmp_path / "first.log") as first,
        httpx.Client(base_url=first.base_url, headers=headers, timeout=10) as client,
    ):

        def create(name: str) -> str:
            password = canary(name)
            response = client.post("/connectors", json=basic_body(name, "user", password), params=NO_CHECK)
            assert response.status_code == 201, response.text
            connector_id: str = response.json()["id"]
            expected[connector_id] = Expected(name, "user", password, 1)
            return connector_id

        def update(connector_id: str, name: str) -> None:
            want = expected[connector_id]
            password = canary(name)
            body = {"name": name, "auth": {"username": f"{name}-user", "password": password}}
            response = client.patch(
                f"/connectors/{connector_id}",
                json=body,
                params=NO_CHECK,
                headers={"If-Match": f'"{want.version}"'},
            )
            assert response.status_code == 200, response.text
            assert response.json()["version"] == want.version + 1
            expected[connector_id] = Expected(name, f"{name}-user", password, want.version + 1)

        def delete(connector_id: str) -> None:
            response = client.delete(f"/connectors/{connector_id}")
            assert response.status_code == 204, response.text
            del expected[connector_id]
            gone.add(connector_id)

        ids = [create(f"connector {i}") for i in range(8)]
        update(ids[0], "renamed 0")
        update(ids[1], "renamed 1")
        update(ids[1], "renamed 1 again")
        delete(ids[2])
        delete(ids[3])
        update(ids[4], "renamed 4")
        create("late create")
        delete(ids[5])
        # The last three acknowledgements are a create, an update and a delete; the process dies
        # the moment the last one arrives.
        create("last create")
        update(ids[6], "last update")
        delete(ids[7])
        first.kill()

    with restarted(env, tmp_path / "second.log") as second:
        check_survivors(second, env, org, expected, gone)
    assert_no_secret_logged(first, second)


@dataclass
class Outcome:
    """One write sent while the process may die: ``acknowledged`` is None when no answer came."""

    kind: str
    connector_id: str | None
    body: dict[str, Any]
    acknowledged: httpx.Response | None = None


async def test_acknowledged_concurrent_writes_survive_sigkill(
    env: dict[str, str], org: str, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {caller_token(env, org)}"}
    seeded: dict[str, Expected] = {}
    outcomes: list[Outcome] = []
    kill_after = 25

    with running_service(env, tmp_path / "first.log") as first:
        async with httpx.AsyncClient(
            base_url=first.base_url,
            headers=headers,
            timeout=30,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        ) as client:
            for i in range(20):
                password = canary(f"seed{i}")
                response = await client.post(
                    "/connectors", json=basic_body(f"seed {i}", "user", password), params=NO_CHECK
                )
                assert response.status_code == 201, response.text
                seeded[response.json()["id"]] = Expected(f"seed {i}", "user", password, 1)
            seed_ids = list(seeded)

            outcomes += [
                Outcome("create", None, basic_body(f"new {i}", f"user {i}", canary(f"new{i}")))
                for i in range(60)
            ]
            outcomes += [
                Outcome("update", connector_id, {"name": f"updated {i}", "auth": {"password": canary("upd")}})
                for i, connector_id in enumerate(seed_ids[:10])
            ]
            outcomes += [Outcome("delete", connector_id, {}) for connector_id in seed_ids[10:]]
            # Creates, updates and deletes interleaved, the same way on every run.
            random.Random(7).shuffle(outcomes)
            acknowledgements = 0

            async def send(outcome: Outcome) -> None:
                nonlocal acknowledgements
                try:
                    if outcome.kind == "create":
                        response = await client.post("/connectors", json=outcome.body, params=NO_CHECK)
                    elif outcome.kind == "update":
                        response = await client.patch(
                            f"/connectors/{outcome.connector_id}", json=outcome.body, params=NO_CHECK
                        )
                    else:
                        response = await client.delete(f"/connectors/{outcome.connector_id}")
                except httpx.TransportError:
                    return  # sent, perhaps applied, never acknowledged
                assert response.status_code in (200, 201, 204), response.text
                outcome.acknowledged = response
                acknowledgements += 1
                if acknowledgements == kill_after:
                    # At once, in the same turn of the event loop that saw the acknowledgement.
                    first.signal(signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(send(outcome) for outcome in outcomes)), timeout=60)
        first.wait(timeout=10)

    acknowledged = [outcome for outcome in outcomes if outcome.acknowledged is not None]
    unknown = [outcome for outcome in outcomes if outcome.acknowledged is None]
    assert len(acknowledged) >= kill_after
    assert unknown, "every write finished before the kill: nothing was in flight"

    expected = dict(seeded)
    gone: set[str] = set()
    for outcome in acknowledged:
        assert outcome.acknowledged is not None
        if outcome.kind == "create":
            created = outcome.acknowledged.json()
            auth = outcome.body["auth"]
            expected[created["id"]] = Expected(outcome.body["name"], auth["username"], auth["password"], 1)
        elif outcome.kind == "update":
            assert outcome.connector_id is not None
            expected[outcome.connector_id] = Expected(
                outcome.body["name"], "user", outcome.body["auth"]["password"], 2
            )
        else:
            assert outcome.connector_id is not None
            del expected[outcome.connector_id]
            gone.add(outcome.connector_id)

    with restarted(env, tmp_path / "second.log") as second:
        # Writes without an answer may or may not have happened, but each one wholly or not at all.
        response = httpx.get(
            f"{second.base_url}/connectors",
            headers={"Authorization": f"Bearer {caller_token(env, org)}"},
        )
        assert response.status_code == 200, response.text
        listing = response.json()["items"]
        found = {item["id"]: item for item in listing}
        for outcome in unknown:
            if outcome.kind == "create":
                match = [item for item in listing if item["name"] == outcome.body["name"]]
                if match:
                    (item,) = match
                    auth = outcome.body["auth"]
                    expected[item["id"]] = Expected(item["name"], auth["username"], auth["password"], 1)
            elif outcome.kind == "update":
                assert outcome.connector_id is not None
                if found[outcome.connector_id]["version"] == 2:
                    expected[outcome.connector_id] = Expected(
                        outcome.body["name"], "user", outcome.body["auth"]["password"], 2
                    )
            else:
                assert outcome.connector_id is not None
                if outcome.connector_id not in found:
                    del expected[outcome.connector_id]
                    gone.add(outcome.connector_id)
        check_survivors(second, env, org, expected, gone)
    assert_no_secret_logged(first, second)
