"""Connecting an account in a real browser: Chromium at the provider's own sign-in and consent
pages (TLS, on loopback), back to the service's callback served by ``python -m app serve``.

Then the flow's calls authorize and reach a resource of the provider's with the token; the
provider revokes the grant and the connector asks for consent again; the admin reconnects.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.browser import chromium
from tests.support.service import ServiceProcess, caller_token, migrate, running_service, service_env
from tests.support.tls import LocalCA

USER, PASSWORD = "admin@example.com", "CANARY-admin-pw"
# Short-lived tokens, so that a revoked grant shows at the next renewal, seconds later.
TOKEN_LIFETIME = 3


@pytest.fixture
def provider(server_tls: ssl.SSLContext) -> Iterator[AuthorizationServerThread]:
    with AuthorizationServerThread(server_tls, access_token_lifetime=TOKEN_LIFETIME) as server:
        server.store.add_user(USER, PASSWORD)
        yield server


@pytest.fixture
def service(tmp_path: Path, local_ca: LocalCA) -> Iterator[ServiceProcess]:
    env = service_env(
        f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}", tmp_path, ca_bundle=str(local_ca.ca_bundle)
    )
    migrate(env)
    with running_service(env, tmp_path / "service.log") as running:
        yield running


def api(service: ServiceProcess) -> httpx.Client:
    token = caller_token(service.env, "acme")
    return httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


async def consent_in_browser(page: Page, authorization_url: str, *, allow: bool) -> None:
    await page.goto(authorization_url)
    if await page.get_by_role("heading", name="Sign in to Example IdP").count():
        await page.get_by_label("Username").fill(USER)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Allow access?").wait_for()
    await page.get_by_role("button", name="Allow" if allow else "Deny").click()
    await page.wait_for_url("**/oauth/callback?**")


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll a real process until ``condition()`` is truthy (bounded): renewals run on its clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_admin_connects_in_chromium_then_the_provider_revokes_and_they_reconnect(
    provider: AuthorizationServerThread, service: ServiceProcess, local_ca: LocalCA
) -> None:
    callback = f"{service.base_url}/oauth/callback"
    provider.add_clients(
        [
            RegisteredClient(
                "console-app",
                "CANARY-client-secret",
                grant_types=("authorization_code", "refresh_token"),
                scope="profile offline_access",
                redirect_uris=(callback,),
            )
        ]
    )
    resource = httpx.Client(verify=ssl.create_default_context(cafile=str(local_ca.ca_bundle)), timeout=10)
    with api(service) as client, resource:
        created = client.post(
            "/connectors",
            json={
                "name": "Provider API",
                "resource_domain_url": provider.issuer + "/api",
                "auth": {
                    "type": "oauth2",
                    "grant_type": "authorization_code",
                    "client_id": "console-app",
                    "client_secret": "CANARY-client-secret",
                    "authorization_url": provider.authorization_url,
                    "token_url": provider.token_url,
                    "scope": "profile offline_access",
                },
            },
        )
        assert created.status_code == 201, created.text
        connector = created.json()
        assert connector["auth"]["redirect_uri"] == callback
        url = f"/connectors/{connector['id']}"

        def call_resource() -> httpx.Response:
            answer = client.post(f"{url}/authorize", json={"path": "/me"})
            assert answer.status_code == 200, answer.text
            given = answer.json()
            return resource.get(given["url"], headers=given["headers"])

        async with chromium() as browser:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()

            # Denied first: nothing changes, and the page says so in words.
            started = client.post(f"{url}/consent").json()
            await consent_in_browser(page, started["authorization_url"], allow=False)
            assert await page.get_by_role("heading").inner_text() == "The account was not connected"
            assert "not granted" in await page.locator("p").inner_text()
            assert client.get(url).json()["status"]["state"] == "consent_required"

            # Allowed: connected, and a flow's call reaches the resource with a token of the grant.
            started = client.post(f"{url}/consent").json()
            await consent_in_browser(page, started["authorization_url"], allow=True)
            assert await page.get_by_role("heading").inner_text() == "Account connected"
            read = client.get(url).json()
            assert read["status"]["state"] == "authorized"
            assert read["auth"]["has_refresh_token"] is True
            reached = call_resource()
            assert reached.status_code == 200 and reached.json()["user"] == USER

            # Renewed by refresh token as the short tokens expire (a renewal runs when a call
            # needs one), the provider rotating it each time.
            issued = len(provider.store.tokens)

            def renewed() -> bool:
                return call_resource().status_code == 200 and len(provider.store.tokens) > issued

            wait_for(renewed, "a renewal")
            assert provider.store.tokens[issued - 1].revoked, "the refresh token was rotated"

            # The provider revokes the grant: the next renewal is refused, and the connector
            # asks for an admin, without further requests.
            provider.store.end_grants(USER)

            def refused() -> bool:
                answer = client.post(f"{url}/authorize")
                return answer.status_code == 409 and answer.json()["code"] == "consent_required"

            wait_for(refused, "consent_required at authorize")
            wait_for(lambda: client.get(url).json()["status"]["state"] == "consent_required", "the status")

            # Reconnected (still signed in at the provider: straight to its consent page).
            started = client.post(f"{url}/consent").json()
            await consent_in_browser(page, started["authorization_url"], allow=True)
            assert await page.get_by_role("heading").inner_text() == "Account connected"
            assert client.get(url).json()["status"]["state"] == "authorized"
            assert call_resource().status_code == 200
            await context.close()
    # The callback's query (code, state) never reached the service's log.
    log = service.stderr()
    assert "code=" not in log and "state=" not in log
    assert "CANARY" not in log
