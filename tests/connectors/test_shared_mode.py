"""Two app instances over one database and one Redis, as two replicas: what one does, the other
sees, without extra token requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import SecretStr

from app.core.config import Settings
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize
from tests.support.redis import RedisServer
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]


async def _two_replicas(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings, own_redis: RedisServer
) -> tuple[Any, Any]:
    shared = settings.model_copy(update={"redis_url": SecretStr(own_redis.url)})
    first, second = await app_factory(shared), await app_factory(shared)
    for app in (first, second):
        await asyncio.wait_for(app.state.broadcast.subscribed.wait(), timeout=5)
    return first, second


async def _until_ok(client: httpx.AsyncClient, connector_id: str) -> httpx.Response:
    # The other replica hears of the change within milliseconds; bounded wait for it.
    for _ in range(200):
        response = await authorize(client, connector_id)
        if response.status_code == 200:
            return response
        await asyncio.sleep(0.01)
    return response


async def test_validation_on_one_replica_clears_a_rejection_on_both(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
    own_redis: RedisServer,
) -> None:
    first, second = await _two_replicas(app_factory, settings, own_redis)
    a, b = client_for(app=first), client_for(app=second)
    scripted_server.queue(Reply.json({"error": "invalid_client"}, status=401))
    scripted_server.set_default(
        Reply.json({"access_token": "good", "token_type": "Bearer", "expires_in": 3600})
    )
    body = payloads.client_credentials(token_url=scripted_server.url("/token"))
    connector_id = (await a.post("/connectors", json=body, params={"validate": "false"})).json()["id"]

    assert (await authorize(a, connector_id)).json()["code"] == "credentials_rejected"
    assert (await authorize(b, connector_id)).json()["code"] == "credentials_rejected"
    assert scripted_server.count == 1, "the rejection was shared, not asked again"

    validated = await a.post(f"/connectors/{connector_id}/validate")
    assert validated.json()["status"]["state"] == "authorized"
    for client in (a, b):
        answer = await _until_ok(client, connector_id)
        assert answer.status_code == 200, answer.text
        assert answer.json()["headers"]["Authorization"] == "Bearer good"
    # The rejected request and the validation: the token the check got served both replicas.
    assert scripted_server.count == 2


async def test_the_token_of_a_validated_change_serves_every_replica(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
    own_redis: RedisServer,
) -> None:
    issued = iter(range(1, 100))
    scripted_server.set_default(
        lambda _request: Reply.json(
            {"access_token": f"tok-{next(issued)}", "token_type": "Bearer", "expires_in": 3600}
        )
    )
    first, second = await _two_replicas(app_factory, settings, own_redis)
    a, b = client_for(app=first), client_for(app=second)
    body = payloads.client_credentials(token_url=scripted_server.url("/token"))
    connector_id = (await a.post("/connectors", json=body)).json()["id"]
    assert (await authorize(b, connector_id)).json()["headers"]["Authorization"] == "Bearer tok-1"
    patched = await a.patch(f"/connectors/{connector_id}", json={"auth": {"scope": "read"}})
    assert patched.status_code == 200, patched.text
    for client in (a, b):
        for _ in range(200):
            answer = (await authorize(client, connector_id)).json()["headers"]["Authorization"]
            if answer == "Bearer tok-2":
                break
            await asyncio.sleep(0.01)
        assert answer == "Bearer tok-2"
    assert scripted_server.count == 2, "the live checks of create and update; nothing more"
