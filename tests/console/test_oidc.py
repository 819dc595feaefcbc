"""Signing in to the console with OpenID Connect, against a real provider on loopback (TLS) that
renders its own sign-in and consent pages and signs ID tokens (``tests.support.authserver``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from app.core.config import Settings
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.consent import ProviderBrowser
from tests.support.tls import LocalCA

BASE = "http://127.0.0.1:8000"
CALLBACK = f"{BASE}/console/oidc/callback"
USERS = {
    "writer@acme.example": {"org_id": "acme", "scope": "connectors:read connectors:write"},
    "reader@acme.example": {"org_id": "acme", "scope": "connectors:read"},
    "nobody@acme.example": {"org_id": "acme", "scope": "profile"},
}
PASSWORD = "CANARY-idp-pw"


@pytest.fixture
def idp(auth_server: AuthorizationServerThread) -> AuthorizationServerThread:
    auth_server.add_clients(
        [
            RegisteredClient(
                "console",
                "CANARY-console-secret",
                grant_types=("authorization_code",),
                scope="openid",
                redirect_uris=(CALLBACK,),
            )
        ]
    )
    for user, claims in USERS.items():
        auth_server.store.add_user(user, PASSWORD)
        auth_server.store.user_claims[user] = claims
    return auth_server


@pytest.fixture
async def console(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings, idp: AuthorizationServerThread
) -> Any:
    configured = settings.model_copy(
        update={
            "console_oidc_issuer": idp.issuer,
            "console_oidc_client_id": "console",
            "console_oidc_client_secret": SecretStr("CANARY-console-secret"),
        }
    )
    return await app_factory(configured)


class Browsers:
    """A browser of its own for each admin: one signed in at the provider is not another."""

    def __init__(self, local_ca: LocalCA) -> None:
        self.local_ca = local_ca
        self.opened: dict[str, ProviderBrowser] = {}

    async def consent(self, url: str, *, username: str, password: str) -> str:
        browser = self.opened.setdefault(username, ProviderBrowser(self.local_ca.ca_bundle))
        return await browser.consent(url, username=username, password=password)

    async def aclose(self) -> None:
        for browser in self.opened.values():
            await browser.aclose()


@pytest.fixture
async def provider_browser(local_ca: LocalCA) -> AsyncIterator[Browsers]:
    browsers = Browsers(local_ca)
    yield browsers
    await browsers.aclose()


async def sign_in(
    console: Any, provider_browser: Browsers, user: str
) -> tuple[httpx.AsyncClient, httpx.Response]:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=console), base_url=BASE)
    page = await client.get("/console/")
    assert "Sign in with your identity provider" in page.text
    started = await client.get("/console/sign-in/oidc")
    assert started.status_code == 303
    query = parse_qs(urlsplit(started.headers["location"]).query)
    assert query["scope"] == ["openid"] and query["code_challenge_method"] == ["S256"] and query["nonce"]
    location = await provider_browser.consent(started.headers["location"], username=user, password=PASSWORD)
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == CALLBACK
    return client, await client.get(f"{parts.path}?{parts.query}")


async def test_an_admin_signs_in_with_the_identity_provider(console: Any, provider_browser: Browsers) -> None:
    client, answer = await sign_in(console, provider_browser, "writer@acme.example")
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    page = await client.get("/console/")
    assert page.status_code == 200
    assert "acme · writer@acme.example" in page.text and "Set up" in page.text
    await client.aclose()


async def test_scopes_decide_what_an_admin_may_do(console: Any, provider_browser: Browsers) -> None:
    client, answer = await sign_in(console, provider_browser, "reader@acme.example")
    page = await client.get("/console/")
    assert "read only" in page.text and "Set up" not in page.text
    assert (await client.get("/console/connectors/new")).status_code == 403
    await client.aclose()
    client, answer = await sign_in(console, provider_browser, "nobody@acme.example")
    assert answer.status_code == 400 and "may not use the connectors console" in answer.text
    assert (await client.get("/console/")).status_code == 401
    await client.aclose()


async def test_a_callback_of_another_sign_in_or_replayed_signs_nobody_in(
    console: Any, provider_browser: Browsers
) -> None:
    client, answer = await sign_in(console, provider_browser, "writer@acme.example")
    assert answer.status_code == 303
    await client.aclose()
    # The same callback in another browser (without the sign-in's cookie) is refused.
    stranger = httpx.AsyncClient(transport=httpx.ASGITransport(app=console), base_url=BASE)
    async with stranger:
        started = await stranger.get("/console/sign-in/oidc")
        location = await provider_browser.consent(
            started.headers["location"], username="writer@acme.example", password=PASSWORD
        )
        parts = urlsplit(location)
        replay_path = f"{parts.path}?{parts.query}"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=console), base_url=BASE) as other:
            refused = await other.get(replay_path)
            assert refused.status_code == 400 and "not started here" in refused.text
        # A state that is not the sign-in's own is refused too.
        tampered = replay_path.replace("state=", "state=x")
        assert (await stranger.get(tampered)).status_code == 400
        assert (await stranger.get("/console/")).status_code == 401
