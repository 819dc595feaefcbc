"""Three real ``serve`` processes over one PostgreSQL database and one Redis, as replicas run."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _truncate_postgres, run_sync
from tests.support.redis import RedisServer
from tests.support.servers import Reply, ScriptedServer
from tests.support.service import (
    ServiceProcess,
    caller_token,
    free_port,
    migrate,
    running_service,
    service_env,
)
from tests.support.tls import LocalCA

OUTBOUND_TIMEOUT = 2.0
LOCK_TIMEOUT = OUTBOUND_TIMEOUT + 2.0  # as app.main sets it


_ISSUED = iter(range(1, 1_000_000))


def tokens_after(delay: float) -> Callable[[object], Reply]:
    def respond(_request: object) -> Reply:
        body = f'{{"access_token": "tok-{next(_ISSUED)}", "token_type": "Bearer", "expires_in": 3600}}'
        return Reply(
            status=200, headers={"Content-Type": "application/json"}, body=body.encode(), delay=delay
        )

    return respond


@pytest.fixture
def replicas(
    postgres_server: str, own_redis: RedisServer, local_ca: LocalCA, tmp_path: Path
) -> Iterator[list[ServiceProcess]]:
    run_sync(_truncate_postgres(postgres_server))
    env = service_env(
        postgres_server,
        tmp_path,
        redis_url=own_redis.url,
        ca_bundle=str(local_ca.ca_bundle),
        outbound_timeout_seconds=str(OUTBOUND_TIMEOUT),
    )
    migrate(env)
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(
                running_service({**env, "CONNECTORS_PORT": str(free_port())}, tmp_path / f"replica-{i}.log")
            )
            for i in range(3)
        ]
        yield started


def _headers(service: ServiceProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {caller_token(service.env, 'org-r')}"}


def _create(service: ServiceProcess, token_url: str, name: str) -> str:
    body: dict[str, Any] = {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "oauth2",
            "client_id": "c",
            "client_secret": "CANARY-replica-secret",
            "token_url": token_url,
            "scope": "read",
        },
    }
    response = httpx.post(
        f"{service.base_url}/connectors", json=body, params={"validate": "false"}, headers=_headers(service)
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _authorize(client: httpx.AsyncClient, service: ServiceProcess, connector_id: str) -> httpx.Response:
    return await client.post(
        f"{service.base_url}/connectors/{connector_id}/authorize",
        json={},
        headers=_headers(service),
        timeout=30,
    )


def test_replicas_share_one_token_request_survive_a_dead_holder_see_changes_and_outlive_redis(
    replicas: list[ServiceProcess], server_tls: Any, own_redis: RedisServer
) -> None:
    with ScriptedServer(server_tls) as idp:
        idp.set_default(tokens_after(0.3))
        cold = _create(replicas[0], idp.url("/oauth/token"), "cold")

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(limits=limits) as client:
                return await asyncio.gather(*(_authorize(client, replicas[i % 3], cold) for i in range(90)))

        answers = asyncio.run(burst())
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["headers"]["Authorization"] for a in answers}) == 1
        assert idp.count == 1, "concurrent cold callers on three replicas made one token request"

        # A replica dies holding the lock, in the middle of its token request.
        idp.set_default(tokens_after(1.0))
        orphan = _create(replicas[1], idp.url("/oauth/token"), "orphan")

        async def kill_mid_fetch() -> tuple[list[httpx.Response], float]:
            async with httpx.AsyncClient() as client:
                doomed = asyncio.create_task(_authorize(client, replicas[0], orphan))
                while idp.count < 2:
                    await asyncio.sleep(0.01)
                replicas[0].kill()
                with contextlib.suppress(httpx.TransportError):
                    await doomed
                started = time.monotonic()
                survivors = await asyncio.gather(
                    _authorize(client, replicas[1], orphan), _authorize(client, replicas[2], orphan)
                )
                return list(survivors), time.monotonic() - started

        survivors, waited = asyncio.run(kill_mid_fetch())
        assert {s.status_code for s in survivors} == {200}
        assert len({s.json()["headers"]["Authorization"] for s in survivors}) == 1
        assert idp.count == 3, "after the lock expired, one surviving replica asked again"
        assert waited < LOCK_TIMEOUT + 1.0 + 1.0, f"survivors waited {waited:.2f} s"

        # A change on one replica is served by the other within 1 s (a notice over Redis wakes its follower).
        idp.set_default(tokens_after(0.0))

        async def propagation() -> float:
            async with httpx.AsyncClient() as client:
                before = (await _authorize(client, replicas[2], cold)).json()["headers"]["Authorization"]
                patched = await client.patch(
                    f"{replicas[1].base_url}/connectors/{cold}",
                    json={"auth": {"scope": "read write"}},
                    params={"validate": "false"},
                    headers=_headers(replicas[1]),
                )
                assert patched.status_code == 200, patched.text
                changed_at = time.monotonic()
                while time.monotonic() - changed_at < 5:
                    now = (await _authorize(client, replicas[2], cold)).json()["headers"]["Authorization"]
                    if now != before:
                        return time.monotonic() - changed_at
                    await asyncio.sleep(0.005)
                raise AssertionError("the change never reached the other replica")

        lag = asyncio.run(propagation())
        print(f"change seen by another replica after {lag * 1000:.1f} ms; survivors waited {waited:.2f} s")
        assert lag < 1.0, f"the other replica served the old version for {lag:.3f} s"
        assert idp.requests[-1].form()["scope"] == "read write"

        # Redis stops: authorize keeps answering, from the in-process cache and straight from the
        # identity provider for a connector no replica has seen yet.
        own_redis.stop()
        fresh = _create(replicas[1], idp.url("/oauth/token"), "fresh")

        async def without_redis() -> list[httpx.Response]:
            async with httpx.AsyncClient() as client:
                return [
                    await _authorize(client, replicas[1], cold),
                    await _authorize(client, replicas[2], cold),
                    await _authorize(client, replicas[2], fresh),
                ]

        assert {r.status_code for r in asyncio.run(without_redis())} == {200}
        assert any("redis" in line["message"] for line in replicas[2].log_records())
        exposition = httpx.get(f"{replicas[2].base_url}/metrics").text
        errors = [
            float(line.rsplit(" ", 1)[1])
            for line in exposition.splitlines()
            if line.startswith("connectors_redis_errors_total{")
        ]
        assert sum(errors) >= 1
