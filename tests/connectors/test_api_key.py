"""API-key connectors through the real app, on SQLite and PostgreSQL.

The validation URL and the resource domain are one real HTTPS server on 127.0.0.1 (the scripted
server), so every request the service sends on its own, a check or anything authorize might do,
is counted where it arrives. Keys contain the canary: the guard fails a test if one appears in a
read, a list, a history, an error or a log line. Only ``/authorize`` hands a key out, so its
answers are read by a client of their own (``authorizer``), which the guard does not watch; log
lines written while it is served are still watched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import CANARY, TokenFactory, canary
from tests.connectors import payloads
from tests.connectors.test_crud import NO_CHECK, assert_problem, create
from tests.support.servers import Reply, ScriptedServer


@pytest.fixture(autouse=True)
def production_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    """httpx at the level the service runs it (``app.core.logs.configure_logging``): below
    WARNING it logs every request's URL, and a query key is in the validation URL's."""
    caplog.set_level(logging.WARNING, logger="httpx")


@pytest.fixture
async def authorizer(app: Any, make_token: TokenFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the same organization as ``client``, for ``/authorize`` only."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {make_token()}"},
    ) as client:
        yield client


def api_key_body(server: ScriptedServer, title: str = "Keyed API", **auth: Any) -> dict[str, Any]:
    """A connector whose resource domain is ``server``; ``auth`` adds to or replaces the auth fields."""
    return {
        "name": title,
        "resource_domain_url": server.url(""),
        "auth": {"type": "api_key", "key": canary("key"), "name": "X-API-Key", **auth},
    }


async def authorized(client: httpx.AsyncClient, connector_id: str, path: str | None = None) -> dict[str, Any]:
    response = await client.post(f"/connectors/{connector_id}/authorize", json={"path": path})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer: dict[str, Any] = response.json()
    return answer


async def events(client: httpx.AsyncClient, connector_id: str) -> list[tuple[str, list[str]]]:
    """Each audit event's outcome and field names, oldest first."""
    response = await client.get(f"/connectors/{connector_id}/history")
    assert response.status_code == 200, response.text
    return [(event["outcome"], event["changed_fields"]) for event in reversed(response.json()["items"])]


async def test_a_header_key_is_checked_on_create_and_handed_out_from_memory(
    client: httpx.AsyncClient, authorizer: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=204))
    body = api_key_body(
        scripted_server, name="Authorization", prefix="Bearer", validation_url=scripted_server.url("/v1/me")
    )
    key = body["auth"]["key"]

    response = await client.post("/connectors", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["auth"] == {
        "type": "api_key",
        "in": "header",
        "name": "Authorization",
        "prefix": "Bearer",
        "validation_url": scripted_server.url("/v1/me"),
        "has_key": True,
    }
    assert created["status"]["state"] == "authorized" and created["status"]["checked_at"] is not None
    [check] = scripted_server.requests
    assert (check.method, check.path) == ("GET", "/v1/me")
    assert check.headers["authorization"] == f"Bearer {key}"

    answer = await authorized(authorizer, created["id"], "/v1/items?id=7")
    assert answer == {
        "url": scripted_server.url("/v1/items?id=7"),
        "headers": {"Authorization": f"Bearer {key}"},
        "resource_origin": scripted_server.url(""),
        "expires_at": None,
    }
    # Reads show the key's place, never the key.
    assert (await client.get(f"/connectors/{created['id']}")).json() == created
    assert [item["id"] for item in (await client.get("/connectors")).json()["items"]] == [created["id"]]
    assert scripted_server.count == 1  # authorize sent nothing


async def test_a_query_key_is_checked_and_handed_out_in_the_url(
    client: httpx.AsyncClient, authorizer: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=200))
    # A key with characters a URL must encode.
    key = canary("query") + "+/=&%?#"
    body = api_key_body(
        scripted_server,
        key=key,
        name="api_key",
        validation_url=scripted_server.url("/v1/me?api_key=stale&x=1"),
        **{"in": "query"},
    )

    created = (await client.post("/connectors", json=body)).json()
    assert created["auth"]["in"] == "query" and created["auth"]["prefix"] is None
    assert created["status"]["state"] == "authorized"
    [check] = scripted_server.requests
    # The key replaced the validation URL's own parameter of that name, and went in no header.
    assert check.path == f"/v1/me?x=1&api_key={quote(key, safe='')}"
    assert key not in " ".join(check.headers.values())

    answer = await authorized(authorizer, created["id"], "/v1/items?api_key=caller&id=7")
    assert answer == {
        "url": scripted_server.url(f"/v1/items?id=7&api_key={quote(key, safe='')}"),
        "headers": {},
        "resource_origin": scripted_server.url(""),
        "expires_at": None,
    }
    assert (await authorized(authorizer, created["id"]))["url"] == scripted_server.url(
        f"?api_key={quote(key, safe='')}"
    )
    assert scripted_server.count == 1


async def test_without_a_validation_url_it_stays_unverified_and_validate_changes_nothing(
    client: httpx.AsyncClient, authorizer: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=200))
    body = api_key_body(scripted_server)
    response = await client.post("/connectors", json=body)  # validate=true
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["auth"]["validation_url"] is None
    assert created["status"] == {"state": "unverified", "checked_at": None, "detail": None}

    validated = await client.post(f"/connectors/{created['id']}/validate")
    assert validated.status_code == 200, validated.text
    assert validated.json() == created
    assert "retry-after" not in validated.headers
    assert await events(client, created["id"]) == [
        ("succeeded", ["name", "resource_domain_url", "auth.type", "auth.key", "auth.name"])
    ]
    answer = await authorized(authorizer, created["id"])
    assert answer["headers"] == {"X-API-Key": body["auth"]["key"]}
    assert CANARY in body["auth"]["key"]
    assert scripted_server.count == 0


async def test_a_refused_key_is_refused_on_save_as_basic_credentials_are(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply.json({"error": "invalid key"}, status=401))
    keyed = await client.post(
        "/connectors", json=api_key_body(scripted_server, validation_url=scripted_server.url("/v1/me"))
    )
    basic = await client.post(
        "/connectors", json=payloads.basic(validation_url=scripted_server.url("/v1/me"))
    )
    problem = assert_problem(keyed, 422, "credentials_rejected")
    assert {k: v for k, v in problem.items() if k != "request_id"} == {
        k: v for k, v in basic.json().items() if k != "request_id"
    }
    assert (await client.get("/connectors")).json()["items"] == []
    assert scripted_server.count == 2


async def test_a_patch_rotates_the_key_and_moves_it_at_once(
    client: httpx.AsyncClient, authorizer: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=204))
    body = api_key_body(scripted_server, validation_url=scripted_server.url("/v1/me"))
    created = (await client.post("/connectors", json=body)).json()
    url = f"/connectors/{created['id']}"
    assert (await authorized(authorizer, created["id"]))["headers"] == {"X-API-Key": body["auth"]["key"]}

    rotated = canary("rotated")
    response = await client.patch(url, json={"auth": {"key": rotated}})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2 and response.json()["auth"]["has_key"] is True
    assert scripted_server.requests[-1].headers["x-api-key"] == rotated  # checked with the new key
    assert (await authorized(authorizer, created["id"]))["headers"] == {"X-API-Key": rotated}

    moved = await client.patch(url, json={"auth": {"in": "query", "name": "apikey"}})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["auth"]["in"], moved.json()["auth"]["name"]) == ("query", "apikey")
    assert scripted_server.requests[-1].path == f"/v1/me?apikey={quote(rotated, safe='')}"
    answer = await authorized(authorizer, created["id"], "/v1/items")
    assert answer["url"] == scripted_server.url(f"/v1/items?apikey={quote(rotated, safe='')}")
    assert answer["headers"] == {}

    # A prefix has no place in a query: the field is named, nothing changes.
    refused = await client.patch(url, json={"auth": {"prefix": "Bearer"}})
    problem = assert_problem(refused, 422, "invalid_request")
    assert [error["field"] for error in problem["errors"]] == ["auth.prefix"]
    # A new validation URL sends the key somewhere new: it must come again.
    moving = {"auth": {"validation_url": scripted_server.url("/v2/me")}}
    problem = assert_problem(await client.patch(url, json=moving), 422, "secret_required")
    assert [error["field"] for error in problem["errors"]] == ["auth.key"]
    assert (await client.get(url)).json()["version"] == 3

    assert (await events(client, created["id"]))[1:] == [
        ("succeeded", ["auth.key"]),
        ("succeeded", ["auth.in", "auth.name"]),
        ("invalid_request", ["auth.prefix"]),
        ("secret_required", ["auth.validation_url"]),
    ]
    assert scripted_server.count == 3  # one check per saved version


async def test_a_basic_connector_becomes_an_api_key_only_with_the_whole_auth(
    client: httpx.AsyncClient, authorizer: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"

    partial = {"auth": {"type": "api_key", "name": "X-API-Key"}}
    problem = assert_problem(await client.patch(url, json=partial, params=NO_CHECK), 422, "invalid_request")
    assert [error["field"] for error in problem["errors"]] == ["auth.key"]
    assert (await client.get(url)).json() == created

    key = canary("switched")
    whole = {"auth": {"type": "api_key", "key": key, "name": "X-API-Key"}}
    response = await client.patch(url, json=whole)  # nothing to check: no request, no problem
    assert response.status_code == 200, response.text
    assert response.json()["auth"] == {
        "type": "api_key",
        "in": "header",
        "name": "X-API-Key",
        "prefix": None,
        "validation_url": None,
        "has_key": True,
    }
    assert response.json()["status"]["state"] == "unverified"
    assert (await authorized(authorizer, created["id"]))["headers"] == {"X-API-Key": key}
    assert (await events(client, created["id"]))[1:] == [
        ("invalid_request", ["auth.type", "auth.name"]),
        (
            "succeeded",
            [
                "auth.type",
                "auth.in",
                "auth.username",
                "auth.password",
                "auth.validation_url",
                "auth.key",
                "auth.name",
            ],
        ),
    ]
    assert scripted_server.count == 0


async def test_an_invalid_key_is_refused_without_being_echoed(client: httpx.AsyncClient) -> None:
    body = {
        "name": "Broken",
        "resource_domain_url": "https://api.example.com",
        "auth": {"type": "api_key", "key": f"{canary('bad')} with spaces", "name": "Host"},
    }
    problem = assert_problem(await client.post("/connectors", json=body), 422, "invalid_request")
    assert {error["field"] for error in problem["errors"]} == {"auth.key", "auth.name"}
