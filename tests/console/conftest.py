"""Fixtures of the console's tests: the app on an injected clock, and signed-in clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.console.sessions import SessionStore
from app.core.config import Settings
from app.main import Overrides
from tests.support.fakes import FakeTime

BASE = "http://127.0.0.1:8000"


@pytest.fixture
async def console_app(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings, fake_time: FakeTime
) -> Any:
    return await app_factory(settings, Overrides(clock=fake_time))


@pytest.fixture
async def browser_for(console_app: Any) -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    clients: list[httpx.AsyncClient] = []

    async def signed_in(org: str = "acme", *, read_only: bool = False) -> httpx.AsyncClient:
        store: SessionStore = console_app.state.console_sessions
        token = await store.create_link(org, "admin-1", read_only=read_only)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=console_app), base_url=BASE)
        clients.append(client)
        answer = await client.get("/console/sign-in", params={"token": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/console/"
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie  # http on loopback
        return client

    yield signed_in
    for client in clients:
        await client.aclose()
