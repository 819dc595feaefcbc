"""A database outage under a real ``serve`` process, over a PostgreSQL this test stops and starts.

While the database is down, authorize keeps answering for the connectors the process holds,
OAuth renewals included, until the staleness limit; everything that needs the database answers
503 ``database_unavailable`` with ``Retry-After`` on a connection that stays open; the log says
once that the database went away and once that it came back.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.postgres import PostgresServer
from tests.support.servers import Reply, ScriptedServer
from tests.support.service import ServiceProcess, caller_token, migrate, running_service, service_env
from tests.support.tls import LocalCA

MAX_STALENESS = 10.0
# A token is handed out for 90 % of this and renewed from 70 %: several renewals per outage.
TOKEN_LIFETIME = 4


def short_tokens() -> Callable[[object], Reply]:
    issued = iter(range(1, 1_000_000))

    def respond(_request: object) -> Reply:
        payload = {
            "access_token": f"tok-{next(issued)}",
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME,
        }
        return Reply.json(payload)

    return respond


class Caller:
    """One keep-alive HTTP/1.1 connection: a request fails if the server closed it."""

    def __init__(self, service: ServiceProcess) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=15)
        self.token = caller_token(service.env, "org-outage")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        self.connection.request(
            method, path, body=json.dumps(body) if body is not None else None, headers=headers
        )
        response = self.connection.getresponse()
        raw = response.read()
        assert response.getheader("connection") != "close", f"{method} {path} closed the connection"
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            json.loads(raw) if raw else None,
        )

    def authorize(self, connector_id: str) -> tuple[int, dict[str, str], Any]:
        return self.call("POST", f"/connectors/{connector_id}/authorize", {})


@pytest.fixture
def served(own_postgres: PostgresServer, local_ca: LocalCA, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = service_env(
        own_postgres.url,
        tmp_path,
        ca_bundle=str(local_ca.ca_bundle),
        max_staleness_seconds=str(MAX_STALENESS),
        # Three held connectors: the first one created is no longer held when the fourth is.
        connector_cache_size="3",
    )
    migrate(env)
    with running_service(env, tmp_path / "serve.log") as service:
        yield service


def test_authorize_outlives_a_database_outage_until_the_staleness_limit(
    served: ServiceProcess, own_postgres: PostgresServer, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(short_tokens())
    caller = Caller(served)

    def create(auth: dict[str, Any], name: str) -> str:
        body = {"name": name, "resource_domain_url": "https://api.example.com", "auth": auth}
        status, _, created = caller.call("POST", "/connectors?validate=false", body)
        assert status == 201, created
        return str(created["id"])

    basic = {
        "type": "basic",
        "username": "u",
        "password": "CANARY-outage",
        "validation_url": "https://127.0.0.1:9/",
    }
    not_held = create(basic, "not held")
    held = [create(basic, "basic 1"), create(basic, "basic 2")]
    oauth = create(
        {
            "type": "oauth2",
            "client_id": "c",
            "client_secret": "CANARY-outage-secret",
            "token_url": scripted_server.url("/oauth/token"),
        },
        "oauth",
    )
    for connector_id in [*held, oauth]:
        assert caller.authorize(connector_id)[0] == 200

    own_postgres.stop()
    stopped = time.monotonic()
    tokens_before = scripted_server.count
    answers: list[int] = []
    while time.monotonic() - stopped < MAX_STALENESS - 4:
        for connector_id in [*held, oauth]:
            status, _, body = caller.authorize(connector_id)
            answers.append(status)
            assert status == 200, body
        time.sleep(0.1)
    assert scripted_server.count > tokens_before, "tokens were renewed with the database down"

    # What needs the database: the same 503, on a connection that stays open.
    for method, path, body in [
        ("GET", "/connectors", None),
        ("PATCH", f"/connectors/{held[0]}", {"name": "renamed"}),
        ("DELETE", f"/connectors/{held[1]}", None),
        ("POST", f"/connectors/{not_held}/authorize", {}),
    ]:
        status, headers, problem = caller.call(method, path, body)
        assert (status, problem["code"]) == (503, "database_unavailable"), (method, path, problem)
        assert headers["retry-after"] == "5"
    status, _, ready = caller.call("GET", "/readyz")
    assert (status, ready["status"], ready["database"]) == (200, "degraded", "unavailable")
    exposition = httpx.get(f"{served.base_url}/metrics").text
    assert "connectors_database_up 0.0" in exposition
    assert "connectors_held 3.0" in exposition

    # Past the staleness limit, what is held may be out of date: authorize stops too.
    while time.monotonic() - stopped < MAX_STALENESS + 1.5:
        assert caller.call("GET", "/healthz")[0] == 200  # keeps the connection from idling out
        time.sleep(0.2)
    status, _, problem = caller.authorize(held[0])
    assert (status, problem["code"]) == (503, "database_unavailable")
    assert caller.call("GET", "/readyz")[0] == 503

    own_postgres.start()
    deadline = time.monotonic() + 15
    while caller.call("GET", "/connectors")[0] != 200:
        assert time.monotonic() < deadline, "CRUD did not come back"
        time.sleep(0.1)
    while caller.authorize(held[0])[0] != 200:
        assert time.monotonic() < deadline, "authorize did not come back"
        time.sleep(0.1)
    assert caller.authorize(not_held)[0] == 200

    records = served.log_records()
    messages = [record["message"] for record in records]
    assert messages.count("database unavailable") == 1
    assert messages.count("database reachable again") == 1
    assert not [record for record in records if record["level"] == "error"], "no error, no traceback"
    assert len(answers) > 20
