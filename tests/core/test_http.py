"""Error answers of the real app: an unexpected exception is a 500 problem, and nothing more."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response


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
