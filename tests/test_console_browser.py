"""The admin console in Chromium, against ``python -m app serve`` on SQLite and PostgreSQL: a
sign-in link from ``console-link``, then an admin's path from an empty organization to its limit,
a refused save, an edit that keeps a secret, a delete, webhooks, Hungarian, a read-only admin, a
form without its CSRF token, signing out; the same path from the keyboard alone; axe-core on
every page."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.conftest import _truncate_postgres, run_sync
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.browser import assert_accessible, chromium
from tests.support.servers import Reply, ScriptedServer
from tests.support.service import ServiceProcess, caller_token, migrate, running_service, service_env
from tests.support.tls import LocalCA

LIMIT = 5


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request: pytest.FixtureRequest, tmp_path: Path, local_ca: LocalCA) -> Iterator[ServiceProcess]:
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}"
    else:
        database_url = request.getfixturevalue("postgres_server")
        run_sync(_truncate_postgres(database_url))
    env = service_env(
        database_url,
        tmp_path,
        ca_bundle=str(local_ca.ca_bundle),
        max_connectors_per_org=str(LIMIT),
        dev_keys="true",
    )
    migrate(env)
    with running_service(env, tmp_path / "service.log") as running:
        yield running


def sign_in_link(service: ServiceProcess, org: str, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app", "console-link", "--org", org, *extra],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    link = result.stdout.strip()
    assert link.startswith(f"{service.base_url}/console/sign-in?token="), link
    return link


async def fill_basic(page: Page, name: str, resource: str, validation_url: str, password: str) -> None:
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_label("Authentication type", exact=True).select_option("basic")
    await page.get_by_label("Resource domain URL", exact=True).fill(resource)
    await page.get_by_label("Username", exact=True).fill("svc-user")
    await page.get_by_label("Password", exact=True).fill(password)
    await page.get_by_label("Validation URL", exact=True).fill(validation_url)


async def test_an_admin_sets_up_connectors_in_the_console(
    service: ServiceProcess, scripted_server: ScriptedServer, auth_server: AuthorizationServerThread
) -> None:
    scripted_server.set_default(Reply(status=204))
    auth_server.add_clients([RegisteredClient("console-cc", "CANARY-cc-secret", scope="read")])
    check_url = scripted_server.url("/auth/check")
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(sign_in_link(service, "acme"))
        await expect(page.get_by_role("heading", name="Connectors", exact=True)).to_be_visible()
        await assert_accessible(page)
        assert "no-store" in (await page.request.get(page.url)).headers["cache-control"]

        # Set up: a refused save shows the message beside its field, keeps what was typed but
        # the secret, and saves nothing.
        await page.get_by_role("link", name="Set up").click()
        await assert_accessible(page)
        await fill_basic(page, "CRM", "http://crm.example.com", check_url, "CANARY-first-pw")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("alert")).to_contain_text("Nothing was saved")
        url_field = page.get_by_label("Resource domain URL", exact=True)
        assert await url_field.get_attribute("aria-invalid") == "true"
        await expect(page.locator("#resource_domain_url-error")).to_be_visible()
        await assert_accessible(page)
        assert await page.get_by_label("Name", exact=True).input_value() == "CRM"
        assert await page.get_by_label("Password", exact=True).input_value() == ""
        assert scripted_server.count == 0

        # Fixed: saved with the live check against the validation server.
        await url_field.fill("https://crm.example.com")
        await page.get_by_label("Password", exact=True).fill("CANARY-first-pw")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("heading", name="CRM")).to_be_visible()
        await expect(page.get_by_text("Working")).to_be_visible()
        await assert_accessible(page)
        assert scripted_server.count == 1
        expected = "Basic " + base64.b64encode(b"svc-user:CANARY-first-pw").decode()
        assert scripted_server.requests[0].headers["authorization"] == expected

        # Add more, up to the limit: then Add more is disabled, with the reason.
        await page.get_by_role("link", name="Back to the connectors").click()
        await page.get_by_role("link", name="Add more").click()
        await fill_basic(page, "Tickets", "https://tickets.example.com", check_url, "CANARY-second-pw")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("heading", name="Tickets")).to_be_visible()
        # OAuth 2.0 client credentials, checked against a real token server.
        await page.get_by_role("link", name="Back to the connectors").click()
        await page.get_by_role("link", name="Add more").click()
        await page.get_by_label("Name", exact=True).fill("Orders")
        await page.get_by_label("Authentication type", exact=True).select_option("oauth2")
        await page.get_by_label("Resource domain URL", exact=True).fill("https://orders.example.com")
        await page.get_by_label("Grant type", exact=True).select_option("client_credentials")
        await page.get_by_label("Client ID", exact=True).fill("console-cc")
        await page.get_by_label("Client secret", exact=True).fill("CANARY-cc-secret")
        await page.get_by_label("Token URL", exact=True).fill(auth_server.token_url)
        await page.get_by_label("Scope", exact=True).fill("read")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("heading", name="Orders")).to_be_visible()
        await expect(page.get_by_text("Working")).to_be_visible()
        assert auth_server.request_count == 1
        for name in ("Billing", "Survey"):
            await page.get_by_role("link", name="Back to the connectors").click()
            await page.get_by_role("link", name="Add more").click()
            await fill_basic(page, name, f"https://{name.lower()}.example.com", check_url, "CANARY-more-pw")
            await page.get_by_role("button", name="Done").click()
            await expect(page.get_by_role("heading", name=name)).to_be_visible()
        await page.goto(f"{service.base_url}/console/")
        await expect(page.get_by_role("button", name="Add more")).to_be_disabled()
        await expect(page.get_by_text(f"Your organization has {LIMIT} connectors")).to_be_visible()
        await assert_accessible(page)

        # An edit that leaves the password blank keeps it.
        await page.get_by_role("link", name="CRM").click()
        await page.get_by_role("link", name="Edit").click()
        await assert_accessible(page)
        await page.get_by_label("Name", exact=True).fill("CRM (EU)")
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_role("heading", name="CRM (EU)")).to_be_visible()
        with httpx.Client(base_url=service.base_url, timeout=10) as api:
            token = caller_token(service.env, "acme")
            listed = api.get("/connectors", headers={"Authorization": f"Bearer {token}"}).json()["items"]
            crm = next(item for item in listed if item["name"] == "CRM (EU)")
            given = api.post(
                f"/connectors/{crm['id']}/authorize", json={}, headers={"Authorization": f"Bearer {token}"}
            ).json()
        assert given["headers"]["Authorization"] == expected

        # A form posted without its CSRF token changes nothing.
        refused = await page.request.post(
            f"{service.base_url}/console/connectors/{crm['id']}/delete", form={"version": str(crm["version"])}
        )
        assert refused.status == 403

        # Delete, after a confirmation that names it.
        await page.get_by_role("link", name="Delete").click()
        await assert_accessible(page)
        await page.get_by_role("button", name="Delete “CRM (EU)”").click()
        await expect(page.get_by_text("The connector was deleted.")).to_be_visible()
        await expect(page.get_by_role("link", name="Add more")).to_be_visible()

        # Webhooks: added (the signing secret shown once), then its page.
        await page.get_by_role("link", name="Webhooks").click()
        await assert_accessible(page)
        await page.get_by_role("link", name="Add a webhook").click()
        await assert_accessible(page)
        await page.get_by_label("URL", exact=True).fill(scripted_server.url("/hooks"))
        await page.get_by_label("connector.deleted").check()
        await page.get_by_role("button", name="Done").click()
        await expect(page.get_by_text("it is not shown again")).to_be_visible()
        await assert_accessible(page)
        await page.get_by_role("link", name="Continue to the webhook").click()
        await assert_accessible(page)

        # In Hungarian, with the switch on the page.
        await page.get_by_role("link", name="Magyar").click()
        await expect(page.get_by_role("heading", name="Webhook", exact=True)).to_be_visible()
        await page.get_by_role("link", name="Csatlakozók").first.click()
        await expect(page.get_by_role("heading", name="Csatlakozók", exact=True)).to_be_visible()
        await assert_accessible(page)
        await page.get_by_role("link", name="English").click()

        # Signing out ends the session: its cookie no longer opens a page.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Signed out")).to_be_visible()
        await assert_accessible(page)
        await page.goto(f"{service.base_url}/console/")
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await assert_accessible(page)

        # A read-only admin sees the connectors and cannot change them, even by posting.
        reader = await browser.new_page()
        await reader.goto(sign_in_link(service, "acme", "--read-only"))
        await expect(reader.get_by_role("link", name="Tickets")).to_be_visible()
        assert await reader.get_by_role("link", name="Add more").count() == 0
        assert (await reader.request.get(f"{service.base_url}/console/connectors/new")).status == 403
        posted = await reader.request.post(f"{service.base_url}/console/connectors", form={"name": "x"})
        assert posted.status == 403
        # The pages that refuse are accessible too.
        await reader.goto(f"{service.base_url}/console/connectors/new")
        await expect(reader.get_by_role("heading", name="Not allowed")).to_be_visible()
        await assert_accessible(reader)
        await reader.goto(f"{service.base_url}/console/connectors/00000000-0000-0000-0000-000000000000")
        await expect(reader.get_by_role("heading", name="Not found")).to_be_visible()
        await assert_accessible(reader)
        # A used link opens nothing.
        used = sign_in_link(service, "acme")
        await reader.goto(used)
        again = await reader.request.get(used)
        assert again.status == 400
    log = service.stderr()
    assert "CANARY" not in log and "token=" not in log


async def tab_to(page: Page, selector: str, limit: int = 60) -> None:
    """Press Tab until the element ``selector`` has the focus (and shows it)."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate("(s) => document.activeElement === document.querySelector(s)", selector):
            outline = await page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none", f"{selector} has the focus but shows none"
            return
    raise AssertionError(f"Tab never reached {selector}")


async def test_the_whole_path_works_from_the_keyboard(
    service: ServiceProcess, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=204))
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(sign_in_link(service, "keys"))
        await tab_to(page, "a.button[href='/console/connectors/new']")
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="New connector")).to_be_visible()
        for selector, text in (
            ("#name", "Keyboard CRM"),
            ("#resource_domain_url", "https://crm.example.com"),
            ("#username", "svc-user"),
            ("#password", "CANARY-keyboard-pw"),
            ("#validation_url", scripted_server.url("/auth/check")),
        ):
            await tab_to(page, selector)
            await page.keyboard.type(text)
        await tab_to(page, "button[type=submit]:not(header button)")
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Keyboard CRM")).to_be_visible()
        assert scripted_server.count == 1
        # Delete, from the keyboard too.
        await tab_to(page, "a.danger")
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Delete “Keyboard CRM”?")).to_be_visible()
        await tab_to(page, "main button.danger")
        await page.keyboard.press("Enter")
        await expect(page.get_by_text("The connector was deleted.")).to_be_visible()
