"""Caller identity and scopes on every endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import jwt
import pytest
from pydantic import SecretStr

from app.core.auth import mint_token
from app.core.config import Settings
from tests.connectors.test_crud import assert_problem

ClientFor = Callable[..., httpx.AsyncClient]
ID = "00000000-0000-4000-8000-000000000000"
ENDPOINTS = [
    ("POST", "/connectors", "connectors:write"),
    ("GET", "/connectors", "connectors:read"),
    ("GET", f"/connectors/{ID}", "connectors:read"),
    ("PATCH", f"/connectors/{ID}", "connectors:write"),
    ("DELETE", f"/connectors/{ID}", "connectors:write"),
    ("POST", f"/connectors/{ID}/validate", "connectors:write"),
    ("GET", f"/connectors/{ID}/history", "connectors:read"),
    ("POST", f"/connectors/{ID}/authorize", "connectors:authorize"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_every_endpoint_needs_a_token(
    client: httpx.AsyncClient, method: str, path: str, scope: str
) -> None:
    response = await client.request(method, path, headers={"Authorization": ""}, json={})
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_every_endpoint_needs_its_scope(
    client_for: ClientFor, method: str, path: str, scope: str
) -> None:
    others = tuple(s for s in ("connectors:read", "connectors:write", "connectors:authorize") if s != scope)
    response = await client_for("org-a", others).request(method, path, json={})
    assert_problem(response, 403, "forbidden")


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwdw==", "Bearer CANARY.CANARY.CANARY"],
)
async def test_malformed_tokens(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/connectors", headers={"Authorization": header})
    assert_problem(response, 401, "unauthenticated")


async def test_expired_and_foreign_tokens(client: httpx.AsyncClient, settings: Settings) -> None:
    assert settings.jwt_secret is not None
    claims = {"iss": "connectors", "aud": "connectors", "org_id": "org-a", "scope": "connectors:read"}
    expired = jwt.encode({**claims, "exp": int(time.time()) - 120}, settings.jwt_secret.get_secret_value())
    response = await client.get("/connectors", headers={"Authorization": f"Bearer {expired}"})
    assert_problem(response, 401, "unauthenticated")
    other = settings.model_copy(update={"jwt_secret": SecretStr("x" * 40), "jwt_issuer": "else"})
    forged = mint_token(other, organization_id="org-a", scopes=["connectors:read"])
    response = await client.get("/connectors", headers={"Authorization": f"Bearer {forged}"})
    assert_problem(response, 401, "unauthenticated")


async def test_healthz_needs_no_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"Authorization": ""})
    assert response.status_code == 200


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_the_caller_is_checked_before_the_connector_id(
    client_for: ClientFor, method: str, path: str, scope: str
) -> None:
    malformed = path.replace(ID, "not-a-uuid")
    anonymous = await client_for().request(method, malformed, headers={"Authorization": ""}, json={})
    assert_problem(anonymous, 401, "unauthenticated")
    others = tuple(s for s in ("connectors:read", "connectors:write", "connectors:authorize") if s != scope)
    assert_problem(await client_for("org-a", others).request(method, malformed, json={}), 403, "forbidden")


@pytest.mark.parametrize(
    "body", [b"{bad", b'{"name": 1}', b"\xff\xfe"], ids=["malformed", "invalid", "not-utf8"]
)
async def test_a_bad_body_without_a_token_is_a_401(client: httpx.AsyncClient, body: bytes) -> None:
    for method, path in (("POST", "/connectors"), ("PATCH", f"/connectors/{ID}")):
        response = await client.request(
            method, path, content=body, headers={"Authorization": "", "content-type": "application/json"}
        )
        assert_problem(response, 401, "unauthenticated")
