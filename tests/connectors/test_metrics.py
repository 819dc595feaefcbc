"""``GET /metrics`` through the real app, after real authorize calls against HTTPS token servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.main import create_app
from tests.conftest import CANARY, canary
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, counter_tokens, recorded_status
from tests.connectors.test_crud import assert_problem
from tests.support.metrics import Scrape, scrape
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]

AUTHORIZE = "connectors_authorize_requests_total"
DURATION = "connectors_authorize_duration_seconds_count"
TOKEN_REQUESTS = "connectors_token_requests_total"
LOOKUPS = "connectors_token_cache_lookups_total"
WAITS = "connectors_token_single_flight_waits_total"
OUTBOUND = "connectors_outbound_request_duration_seconds_count"
STORED = "connectors_stored"


async def _create(client: httpx.AsyncClient, body: dict[str, Any], *, validate: bool = False) -> str:
    response = await client.post("/connectors", json=body, params={"validate": str(validate).lower()})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _assert_nothing_tenant_specific(result: Scrape, *values: str) -> None:
    assert CANARY not in result.text
    for value in values:
        assert value not in result.text


async def test_metrics_need_no_caller_token_and_use_the_text_format(app: Any) -> None:
    result = await scrape(app)
    assert result.content_type.startswith("text/plain; version=0.0.4")
    assert {
        "connectors_authorize_requests",
        "connectors_authorize_duration_seconds",
        "connectors_token_requests",
        "connectors_token_cache_lookups",
        "connectors_token_single_flight_waits",
        "connectors_outbound_request_duration_seconds",
        "connectors_stored",
        "connectors_redis_errors",
    } <= result.families
    for state in ("unverified", "authorized", "rejected", "unreachable"):
        assert result.value(STORED, state=state) == 0


async def test_authorize_outcomes_latency_and_token_cache(
    client_for: ClientFor, scripted_server: ScriptedServer, app: Any
) -> None:
    org = f"org-{uuid.uuid4().hex}"
    client = client_for(org)
    scripted_server.set_default(counter_tokens())
    oauth = await _create(client, payloads.client_credentials(token_url=scripted_server.url("/oauth/token")))
    basic = await _create(client, payloads.basic())

    for _ in range(3):
        assert (await authorize(client, oauth, path="/items")).status_code == 200
    for _ in range(2):
        assert (await authorize(client, basic)).status_code == 200
    assert_problem(
        await authorize(client, basic, path="//evil.example.com"), 422, "path_outside_resource_domain"
    )
    missing = str(uuid.uuid4())
    assert_problem(await authorize(client, missing), 404, "connector_not_found")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as anonymous:
        assert_problem(await authorize(anonymous, oauth), 401, "unauthenticated")

    result = await scrape(app)
    assert result.value(AUTHORIZE, outcome="ok", auth_type="oauth2") == 3
    assert result.value(AUTHORIZE, outcome="ok", auth_type="basic") == 2
    assert result.value(AUTHORIZE, outcome="path_outside_resource_domain", auth_type="basic") == 1
    assert result.value(AUTHORIZE, outcome="connector_not_found", auth_type="unknown") == 1
    assert result.value(AUTHORIZE, outcome="unauthenticated", auth_type="unknown") == 1
    assert result.value(DURATION, auth_type="oauth2") == 3
    assert result.value(DURATION, auth_type="basic") == 3
    assert result.value(DURATION, auth_type="unknown") == 2
    # The first call waited for the one token request; the next two were served from the cache.
    assert result.value(TOKEN_REQUESTS, grant_type="client_credentials", outcome="authorized") == 1
    assert result.value(LOOKUPS, result="miss") == 1
    assert result.value(LOOKUPS, result="hit") == 2
    assert result.value(WAITS) == 0
    assert result.value(OUTBOUND, kind="token", result="2xx") == 1
    assert result.total(OUTBOUND, kind="validation") == 0
    _assert_nothing_tenant_specific(result, org, oauth, basic, missing, "tok-1", "127.0.0.1")


async def test_token_request_outcomes_and_outbound_results(
    client: httpx.AsyncClient, scripted_server: ScriptedServer, app: Any
) -> None:
    token_url = scripted_server.url("/oauth/token")
    scripted_server.set_default(
        Reply.json({"error": "invalid_client", "error_description": canary("desc")}, status=401)
    )
    rejected = await _create(client, payloads.client_credentials("Refused", token_url=token_url))
    for _ in range(2):
        assert_problem(await authorize(client, rejected), 502, "credentials_rejected")

    scripted_server.set_default(Reply.html(503))
    failing = await _create(client, payloads.password_grant("Failing", token_url=token_url))
    validated = await client.post(f"/connectors/{failing}/validate")
    assert validated.json()["status"]["state"] == "unreachable"

    scripted_server.set_default(Reply(status=204))
    body = payloads.basic("Checked", validation_url=scripted_server.url("/auth/check"))
    await _create(client, body, validate=True)

    result = await scrape(app)
    # The rejection is sticky: the second call made no request.
    assert result.value(TOKEN_REQUESTS, grant_type="client_credentials", outcome="rejected") == 1
    assert result.value(TOKEN_REQUESTS, grant_type="password", outcome="unreachable") == 1
    assert result.value(AUTHORIZE, outcome="credentials_rejected", auth_type="oauth2") == 2
    assert result.value(OUTBOUND, kind="token", result="4xx") == 1
    # Retried within the deadline, then counted once with its final answer.
    assert result.value(OUTBOUND, kind="token", result="5xx") == 1
    assert result.value(OUTBOUND, kind="validation", result="2xx") == 1
    assert "invalid_client" not in result.text
    _assert_nothing_tenant_specific(result, rejected, failing, "org-a")


async def test_a_token_endpoint_timeout_is_counted(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    make_token: Callable[..., str],
    scripted_server: ScriptedServer,
) -> None:
    app = await app_factory(settings.model_copy(update={"outbound_timeout_seconds": 0.3}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {make_token()}"},
    ) as client:
        scripted_server.set_default(Reply(status=200, delay=2.0))
        created = await _create(client, payloads.client_credentials(token_url=scripted_server.url("/t")))
        assert_problem(await authorize(client, created), 504, "token_endpoint_timeout")
    result = await scrape(app)
    assert result.value(OUTBOUND, kind="token", result="timeout") == 1
    assert result.value(TOKEN_REQUESTS, grant_type="client_credentials", outcome="unreachable") == 1
    assert result.value(AUTHORIZE, outcome="token_endpoint_timeout", auth_type="oauth2") == 1


async def test_callers_joining_a_token_request_are_counted(
    client: httpx.AsyncClient, scripted_server: ScriptedServer, app: Any
) -> None:
    scripted_server.set_default(counter_tokens(delay=0.5))
    created = await _create(client, payloads.client_credentials(token_url=scripted_server.url("/t")))
    answers = await asyncio.gather(*(authorize(client, created) for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    result = await scrape(app)
    assert scripted_server.count == 1
    assert result.value(TOKEN_REQUESTS, grant_type="client_credentials", outcome="authorized") == 1
    hits, misses = result.value(LOOKUPS, result="hit"), result.value(LOOKUPS, result="miss")
    assert hits + misses == 20
    # One caller started the request; every other one that missed the cache joined it.
    assert result.value(WAITS) == misses - 1
    assert misses > 1


async def test_connectors_by_state_count_every_organization(
    client_for: ClientFor, scripted_server: ScriptedServer, app: Any
) -> None:
    first, second = f"tenant-{uuid.uuid4().hex}", f"tenant-{uuid.uuid4().hex}"
    one, two = client_for(first), client_for(second)
    token_url = scripted_server.url("/oauth/token")
    scripted_server.set_default(counter_tokens())
    ids = [
        await _create(one, payloads.basic("Never checked")),
        await _create(one, payloads.client_credentials("Checked", token_url=token_url), validate=True),
        await _create(two, payloads.client_credentials("Also checked", token_url=token_url), validate=True),
    ]
    scripted_server.set_default(Reply.json({"error": "invalid_grant"}, status=400))
    ids.append(await _create(two, payloads.password_grant("Refused", token_url=token_url)))
    assert_problem(await authorize(two, ids[-1]), 502, "credentials_rejected")
    await recorded_status(two, f"/connectors/{ids[-1]}", "rejected")
    scripted_server.set_default(Reply.html(500))
    ids.append(await _create(two, payloads.client_credentials("Down", token_url=token_url)))
    assert (await two.post(f"/connectors/{ids[-1]}/validate")).json()["status"]["state"] == "unreachable"

    result = await scrape(app)
    assert {
        state: result.value(STORED, state=state)
        for state in ("unverified", "authorized", "rejected", "unreachable")
    } == {"unverified": 1, "authorized": 2, "rejected": 1, "unreachable": 1}
    _assert_nothing_tenant_specific(result, first, second, *ids)

    assert (await one.delete(f"/connectors/{ids[1]}")).status_code == 204
    assert (await scrape(app)).value(STORED, state="authorized") == 1


async def test_each_app_counts_for_itself(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    make_token: Callable[..., str],
) -> None:
    busy, idle = await app_factory(settings), await app_factory(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=busy),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {make_token()}"},
    ) as client:
        created = await _create(client, payloads.basic())
        assert (await authorize(client, created)).status_code == 200
    assert (await scrape(busy)).value(AUTHORIZE, outcome="ok", auth_type="basic") == 1
    assert (await scrape(idle)).total(AUTHORIZE) == 0


def test_metrics_are_documented_as_an_operation_without_a_caller_token() -> None:
    document = create_app(Settings(jwt_secret="x" * 32, encryption_keys="k1:" + "A" * 43)).openapi()
    operation = document["paths"]["/metrics"]["get"]
    assert operation["tags"] == ["health"]
    assert list(operation["responses"]["200"]["content"]) == ["text/plain"]
    assert "security" not in operation
    assert "parameters" not in operation


async def test_a_failing_count_leaves_only_the_connectors_gauge_out(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable() -> dict[str, int]:
        raise OSError("the database went away")

    assert (await scrape(app)).value(STORED, state="unverified") == 0
    monkeypatch.setattr(app.state.connectors, "count_by_state", unavailable)
    result = await scrape(app)
    assert result.total(STORED) == 0
    assert "connectors_stored{" not in result.text
    assert "connectors_authorize_requests" in result.families
