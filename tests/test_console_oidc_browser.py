"""The console in Chromium with an identity provider, against ``python -m app serve``: an admin
signs in through OpenID Connect at the provider's own pages (TLS, on loopback), sets up an
authorization code connector, copies the redirect URI, connects the account at the same provider
and comes back to the connector's page; then an edit made meanwhile in another tab is reported,
not overwritten, and a session left idle for 30 minutes opens nothing."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from sqlalchemy import create_engine, select, update

from app.console.models import ConsoleSession
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.browser import assert_accessible, chromium
from tests.support.service import ServiceProcess, free_port, migrate, running_service, service_env
from tests.support.tls import LocalCA

ADMIN, PASSWORD = "admin@acme.example", "CANARY-idp-pw"


@pytest.fixture
def provider(server_tls: ssl.SSLContext) -> Iterator[AuthorizationServerThread]:
    with AuthorizationServerThread(server_tls) as server:
        server.store.add_user(ADMIN, PASSWORD)
        server.store.user_claims[ADMIN] = {"org_id": "acme", "scope": "connectors:read connectors:write"}
        yield server


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "connectors.db"


@pytest.fixture
def service(
    tmp_path: Path, database: Path, local_ca: LocalCA, provider: AuthorizationServerThread
) -> Iterator[ServiceProcess]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    provider.add_clients(
        [
            RegisteredClient(
                "console",
                "CANARY-console-secret",
                grant_types=("authorization_code",),
                scope="openid",
                redirect_uris=(f"{base_url}/console/oidc/callback",),
            ),
            RegisteredClient(
                "crm-app",
                "CANARY-crm-secret",
                grant_types=("authorization_code", "refresh_token"),
                scope="profile offline_access",
                redirect_uris=(f"{base_url}/oauth/callback",),
            ),
        ]
    )
    env = service_env(
        f"sqlite+aiosqlite:///{database}",
        tmp_path,
        port=str(port),
        ca_bundle=str(local_ca.ca_bundle),
        console_oidc_issuer=provider.issuer,
        console_oidc_client_id="console",
        console_oidc_client_secret="CANARY-console-secret",
    )
    migrate(env)
    with running_service(env, tmp_path / "service.log") as running:
        assert running.base_url == base_url
        yield running


async def at_the_provider(page: Page, *, signed_in: bool) -> None:
    """The provider's own pages: its sign-in form (unless signed in already), then its consent."""
    if not signed_in:
        await expect(page.get_by_role("heading", name="Sign in to Example IdP")).to_be_visible()
        await page.get_by_label("Username").fill(ADMIN)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    await page.get_by_role("button", name="Allow").click()


async def test_an_admin_signs_in_at_the_provider_connects_an_account_and_meets_an_edit_and_expiry(
    service: ServiceProcess, provider: AuthorizationServerThread, database: Path
) -> None:
    async with chromium() as browser:
        # The provider's certificate is of the tests' own authority, which Chromium does not know.
        context = await browser.new_context(ignore_https_errors=True)
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.base_url)
        page = await context.new_page()

        # Signing in: the console sends the admin to the provider and back.
        await page.goto(f"{service.base_url}/console/")
        await expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        await assert_accessible(page)
        await page.get_by_role("link", name="Sign in with your identity provider").click()
        await at_the_provider(page, signed_in=False)
        await expect(page.get_by_role("heading", name="Connectors", exact=True)).to_be_visible()
        await expect(page.get_by_text(f"acme · {ADMIN}")).to_be_visible()
        await assert_accessible(page)

        # An authorization code connector; the redirect URI to register is there to copy.
        await page.get_by_role("link", name="Set up").click()
        await page.get_by_label("Name", exact=True).fill("CRM")
        await page.get_by_label("Authentication type", exact=True).select_option("oauth2")
        await page.get_by_label("Resource domain URL", exact=True).fill(provider.issuer + "/api")
        await page.get_by_label("Grant type", exact=True).select_option("authorization_code")
        await page.get_by_label("Client ID", exact=True).fill("crm-app")
        await page.get_by_label("Client secret", exact=True).fill("CANARY-crm-secret")
        await page.get_by_label("Token URL", exact=True).fill(provider.token_url)
        await page.get_by_label("Scope", exact=True).fill("profile offline_access")
        await page.get_by_label("Authorization URL (authorization code)").fill(provider.authorization_url)
        await page.get_by_role("button", name="Copy").click()
        await expect(page.get_by_role("button", name="Copied")).to_be_visible()
        copied = await page.evaluate("() => navigator.clipboard.readText()")
        assert copied == f"{service.base_url}/oauth/callback"
        issued = len(provider.store.tokens)
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("heading", name="CRM")).to_be_visible()
        await expect(page.get_by_text("Needs an admin")).to_be_visible()
        assert len(provider.store.tokens) == issued, "no token is asked for before the account is connected"

        # Connect: the provider's consent (signed in there already), then back to this page.
        await page.get_by_role("button", name="Connect").click()
        await at_the_provider(page, signed_in=True)
        await expect(page.get_by_text("The account is connected.")).to_be_visible()
        await expect(page.get_by_text("Working")).to_be_visible()
        await expect(page.get_by_role("button", name="Reconnect")).to_be_visible()
        await assert_accessible(page)

        # Two tabs edit at once: the later save is reported, and the earlier one stands.
        edit_url = page.url.split("?")[0] + "/edit"
        other = await context.new_page()
        await page.goto(edit_url)
        await other.goto(edit_url)
        await other.get_by_label("Name", exact=True).fill("CRM (other tab)")
        await other.get_by_role("button", name="Done").click()
        await expect(other.get_by_role("heading", name="CRM (other tab)")).to_be_visible()
        await page.get_by_label("Name", exact=True).fill("CRM (this tab)")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("alert")).to_contain_text("Someone else changed this connector")
        await assert_accessible(page)
        await page.goto(f"{service.base_url}/console/")
        await expect(page.get_by_role("link", name="CRM (other tab)")).to_be_visible()
        assert await page.get_by_role("link", name="CRM (this tab)").count() == 0

        # Left idle for 30 minutes (its last activity moved back in the database the service
        # reads): the session opens nothing, and is gone.
        engine = create_engine(f"sqlite:///{database}")
        with engine.begin() as db:
            db.execute(update(ConsoleSession).values(last_seen_at=datetime.now(UTC) - timedelta(minutes=31)))
        await page.reload()
        await expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
        with engine.connect() as db:
            assert db.execute(select(ConsoleSession)).first() is None
        engine.dispose()
        await context.close()
    log = service.stderr()
    assert "CANARY" not in log and "code=" not in log and "state=" not in log
