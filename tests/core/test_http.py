"""Error answers of the real app: an unexpected exception is a 500 problem, and nothing more; an
unknown path (a trailing slash included) is a 404 problem, never a redirect."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from app.core.http import _leaf_routes
from tests.connectors import payloads
from tests.core.test_requestid import raw_request


async def test_an_unexpected_error_is_a_logged_500_that_does_not_reach_the_server(
    app: Any, caplog: Any
) -> None:
    async def boom(_request: Request) -> Response:
        raise RuntimeError("CANARY-like text that must not be answered")

    app.router.add_route("/boom", boom)
    # raise_app_exceptions: an exception that left the app would fail the request here, as it
    # makes a real server log a second traceback and close the keep-alive connection.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/boom")
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "internal_error"
        assert "must not" not in response.text
        assert (await client.get("/healthz")).status_code == 200
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage() for record in errors] == ["unexpected error"]


HOSTILE_HOSTS = [{}, {"Host": "attacker.example"}, {"Host": "attacker.example", "X-Forwarded-Proto": "https"}]


def _paths(app: Any, connector_id: str) -> list[str]:
    """Every path the app serves, with a real connector id filled in."""
    paths = {getattr(route, "path", "") for route in _leaf_routes(app.routes)}
    return sorted(path.replace("{connector_id}", connector_id) for path in paths if path.startswith("/"))


def _assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.request.method, response.request.url, response.text)
    assert "location" not in response.headers
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


async def test_a_trailing_slash_is_an_unknown_path_never_a_redirect(
    app: Any, client_for: Callable[..., httpx.AsyncClient]
) -> None:
    client = client_for()
    created = await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})
    assert created.status_code == 201, created.text
    paths = _paths(app, created.json()["id"])
    assert {"/connectors", "/healthz", f"/connectors/{created.json()['id']}/authorize"} <= set(paths)
    for path in paths:
        for headers in HOSTILE_HOSTS:
            for method in ("GET", "POST", "PATCH", "DELETE"):
                body = payloads.basic() if method == "POST" else None
                _assert_not_found(await client.request(method, path + "/", json=body, headers=headers))
    anonymous = client_for()
    anonymous.headers.pop("Authorization")
    _assert_not_found(await anonymous.post("/connectors/", json=payloads.basic()))
    # The connector is untouched, and the organization still has exactly one.
    assert (await client.get("/connectors")).json()["items"] == [
        (await client.get(f"/connectors/{created.json()['id']}")).json()
    ]


@pytest.mark.parametrize(
    "path", ["/nowhere", "/connectors/a/b/c", "//connectors", "/connectors//", "/healthz//", "/docs/"]
)
async def test_an_unknown_path_is_a_404_problem(
    client_for: Callable[..., httpx.AsyncClient], path: str
) -> None:
    client = client_for()
    for method in ("GET", "POST"):
        for headers in HOSTILE_HOSTS:
            _assert_not_found(await client.request(method, path, json={}, headers=headers))


async def test_no_path_answers_a_redirect(app: Any, client_for: Callable[..., httpx.AsyncClient]) -> None:
    client = client_for()
    for path in _paths(app, str(uuid.uuid4())):
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            response = await client.request(method, path, json={}, headers={"Host": "attacker.example"})
            assert not 300 <= response.status_code < 400, (method, path, response.status_code)
            assert "location" not in response.headers, (method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/connectors"),
        ("PATCH", f"/connectors/{uuid.UUID(int=7)}"),
        ("POST", f"/connectors/{uuid.UUID(int=7)}/authorize"),
        ("POST", "/webhooks"),
    ],
)
async def test_a_client_gone_while_sending_its_body_is_no_error(
    app: Any, make_token: Callable[..., str], caplog: Any, method: str, path: str
) -> None:
    """The body's first bytes, then the connection closes: recorded as 499, logged at info, never
    an error line nor an internal_error."""
    headers = [
        (b"authorization", f"Bearer {make_token()}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"1000"),
    ]
    status, _, _ = await raw_request(app, method, path, headers, b'{"name": "half', more_body=True)
    assert status == 499
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    rendered = app.state.metrics.render().decode()
    samples = [line for line in rendered.splitlines() if not line.startswith("#")]
    assert [line for line in samples if "internal_error" in line or 'status="500"' in line] == []
    assert any('status="499"' in line for line in samples)
