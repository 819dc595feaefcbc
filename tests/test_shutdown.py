"""SIGTERM with work in flight: answers finish, new connections are refused, nothing is left dangling.

The service runs as a real ``python -m app serve`` process. Its token endpoint is a scripted HTTPS
server on 127.0.0.1 whose answers the test holds back with events, so "in flight" is a fact the
test observes (the request reached the identity provider), not a guess made with a sleep.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CANARY, _truncate_postgres, canary, run_sync
from tests.support.redis import RedisServer
from tests.support.servers import RecordedRequest, Reply, ScriptedServer
from tests.support.service import caller_token, migrate, running_service, service_env
from tests.support.tls import LocalCA

NO_CHECK = {"validate": "false"}
# Long enough for the service to answer from the cache while its refresh runs in the background,
# short enough that the refresh point (70 % of the lifetime) comes quickly.
SHORT_LIFETIME = 4
EXIT_BOUND_SECONDS = 10.0
WAIT_SECONDS = 20.0


def token_reply(token: str, expires_in: int) -> Reply:
    return Reply.json({"access_token": token, "token_type": "Bearer", "expires_in": expires_in})


class IdentityProvider:
    """Token endpoints on a scripted server: ``/slow`` and ``/refresh`` answer when released."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.slow_arrived = threading.Event()
        self.release_slow = threading.Event()
        self.refresh_arrived = threading.Event()
        self.release_refresh = threading.Event()
        self._refresh_count = 0
        self._lock = threading.Lock()
        server.set_default(self._respond)

    def _respond(self, request: RecordedRequest) -> Reply:
        if request.path == "/slow":
            self.slow_arrived.set()
            self.release_slow.wait(WAIT_SECONDS)
            return token_reply("slow-token", 3600)
        with self._lock:
            self._refresh_count += 1
            first = self._refresh_count == 1
        if first:
            return token_reply("short-token", SHORT_LIFETIME)
        self.refresh_arrived.set()
        self.release_refresh.wait(WAIT_SECONDS)
        return token_reply("renewed-token", 3600)

    def release_all(self) -> None:
        self.release_slow.set()
        self.release_refresh.set()


@pytest.fixture
def idp(scripted_server: ScriptedServer) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(scripted_server)
    try:
        yield provider
    finally:
        # Handler threads blocked on an event must end before the server is stopped.
        provider.release_all()


def oauth_body(name: str, token_url: str) -> dict[str, Any]:
    return {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "oauth2",
            "grant_type": "client_credentials",
            "client_id": f"{name}-client",
            "client_secret": canary(name),
            "token_url": token_url,
        },
    }


async def test_sigterm_drains_in_flight_requests_and_stops_refreshes(
    database_url: str, tmp_path: Path, local_ca: LocalCA, idp: IdentityProvider
) -> None:
    await sigterm_with_work_in_flight(database_url, tmp_path, local_ca, idp)


async def test_sigterm_with_the_shared_token_cache(
    postgres_server: str, own_redis: RedisServer, tmp_path: Path, local_ca: LocalCA, idp: IdentityProvider
) -> None:
    """The same, as replicas run: PostgreSQL and Redis (shared tokens, change notices)."""
    run_sync(_truncate_postgres(postgres_server))
    await sigterm_with_work_in_flight(postgres_server, tmp_path, local_ca, idp, redis_url=own_redis.url)


async def sigterm_with_work_in_flight(
    database_url: str, tmp_path: Path, local_ca: LocalCA, idp: IdentityProvider, **settings: str
) -> None:
    env = service_env(
        database_url,
        tmp_path / "data",
        ca_bundle=str(local_ca.ca_bundle),
        outbound_timeout_seconds="15",
        **settings,
    )
    # Every warning printed, not only the default few: an unclosed socket or transport at
    # shutdown shows up as a stderr line that is not a JSON log record.
    env["PYTHONWARNINGS"] = "default"
    migrate(env)
    headers = {"Authorization": f"Bearer {caller_token(env, 'org-shutdown')}"}

    with running_service(env, tmp_path / "serve.log") as service:
        async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as client:
            ids = {}
            for name, path in (("refreshing", "/refresh"), ("slow", "/slow")):
                created = await client.post(
                    "/connectors", json=oauth_body(name, idp.server.url(path)), params=NO_CHECK
                )
                assert created.status_code == 201, created.text
                ids[name] = created.json()["id"]

            # A short-lived token, then calls until one of them starts its renewal in the
            # background; the renewal reaches the identity provider and is held there.
            refreshing = f"/connectors/{ids['refreshing']}/authorize"
            deadline = time.monotonic() + SHORT_LIFETIME * 3
            while not idp.refresh_arrived.is_set():
                assert time.monotonic() < deadline, "no background renewal started"
                answer = await client.post(refreshing, json={})
                assert answer.status_code == 200, answer.text
                assert answer.json()["headers"]["Authorization"] == "Bearer short-token"
                await asyncio.to_thread(idp.refresh_arrived.wait, 0.05)

            # A request waiting on the identity provider when the signal arrives.
            in_flight = asyncio.create_task(client.post(f"/connectors/{ids['slow']}/authorize", json={}))
            assert await asyncio.to_thread(idp.slow_arrived.wait, WAIT_SECONDS)
            assert not in_flight.done()

            service.signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.to_thread(service.wait_for_log, "Waiting for connections to close")
            # The listening socket is closed while the request is still being served.
            with pytest.raises(httpx.ConnectError):
                await asyncio.to_thread(httpx.get, f"{service.base_url}/healthz", timeout=2)
            assert not in_flight.done()

            idp.release_slow.set()
            answer = await asyncio.wait_for(in_flight, WAIT_SECONDS)
            assert answer.status_code == 200, answer.text
            assert answer.json()["headers"] == {"Authorization": "Bearer slow-token"}
            assert answer.headers["cache-control"] == "no-store"

            # The process does not wait for the held renewal: it is cancelled and the process ends.
            status = await asyncio.to_thread(service.wait, EXIT_BOUND_SECONDS)
            elapsed = time.monotonic() - signalled
            assert status in (0, -signal.SIGTERM)
            assert elapsed < EXIT_BOUND_SECONDS
            assert not idp.release_refresh.is_set()

    stderr = service.stderr()
    records = service.log_records()  # every line is a JSON record: no traceback, no warning text
    messages = [record["message"] for record in records]
    assert "Application shutdown complete." in messages
    assert any(message.startswith("Finished server process") for message in messages)
    problems = [r for r in records if r["level"] in ("warning", "error", "critical") or "exception" in r]
    assert problems == []
    assert "Task was destroyed" not in stderr
    assert "Traceback" not in stderr
    assert CANARY not in stderr
    slow = [
        r
        for r in records
        if r["logger"] == "connectors.access" and r["route"] == "/connectors/{connector_id}/authorize"
    ]
    assert slow[-1]["status"] == 200
    # Two requests to /refresh (the first token and the held renewal), one to /slow.
    assert sorted(request.path for request in idp.server.requests) == ["/refresh", "/refresh", "/slow"]
