"""The admin console through the real app (ASGI), on SQLite and PostgreSQL: sessions and their
expiry, CSRF, a read-only admin, a concurrent edit, errors beside their fields, connecting an
authorization code connector. ``tests/test_console_browser.py`` walks an admin's path in Chromium."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from app.console.sessions import SessionStore
from tests.connectors import payloads
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.consent import ProviderBrowser
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer
from tests.support.tls import LocalCA

BASE = "http://127.0.0.1:8000"


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


def basic_form(csrf: str, **values: str) -> dict[str, str]:
    return {
        "csrf": csrf,
        "name": "CRM",
        "type": "basic",
        "resource_domain_url": "https://crm.example.com",
        "username": "svc-user",
        "password": "CANARY-console-pw",
        "validation_url": "https://127.0.0.1:9/check",
        **values,
    }


async def created(client: httpx.AsyncClient, **values: str) -> str:
    page = await client.get("/console/connectors/new")
    # Saved without the live check would need the API; here the validation URL answers nothing,
    # so save through the API's rules with a connector that has nothing to check: an API key.
    form = {
        "csrf": csrf_of(page),
        "name": values.get("name", "Keyed"),
        "type": "api_key",
        "resource_domain_url": "https://api.example.com",
        "key": "CANARY-console-key",
        "key_in": "header",
        "key_name": "X-API-Key",
    }
    answer = await client.post("/console/connectors", data=form)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"].split("?")[0].rsplit("/", 1)[1]


async def test_pages_need_a_session_and_answer_with_strict_headers(
    console_app: Any, browser_for: Callable[..., Awaitable[httpx.AsyncClient]]
) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=console_app), base_url=BASE) as anonymous:
        page = await anonymous.get("/console/")
        assert page.status_code == 401 and "Sign in" in page.text
        bad = await anonymous.get("/console/sign-in", params={"token": "made-up"})
        assert bad.status_code == 400
    client = await browser_for()
    page = await client.get("/console/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and "style=" not in page.text
    stylesheet = re.search(r'href="(/console/static/console\.[0-9a-f]{16}\.css)"', page.text)
    assert stylesheet is not None
    asset = await client.get(stylesheet.group(1))
    assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]


async def test_sessions_end_after_30_idle_minutes_or_8_hours(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]], fake_time: FakeTime
) -> None:
    client = await browser_for()
    fake_time.advance(29 * 60)
    assert (await client.get("/console/")).status_code == 200
    fake_time.advance(30 * 60 + 1)
    assert (await client.get("/console/")).status_code == 401
    active = await browser_for()
    for _ in range(16):  # active every 29 minutes: still ends at 8 hours
        fake_time.advance(29 * 60)
        assert (await active.get("/console/")).status_code == 200
    fake_time.advance(60 * 60)
    assert (await active.get("/console/")).status_code == 401


async def test_a_sign_in_link_is_used_once_and_lasts_five_minutes(
    console_app: Any, fake_time: FakeTime
) -> None:
    store: SessionStore = console_app.state.console_sessions
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=console_app), base_url=BASE) as client:
        token = await store.create_link("acme", "a", read_only=False)
        assert (await client.get("/console/sign-in", params={"token": token})).status_code == 303
        assert (await client.get("/console/sign-in", params={"token": token})).status_code == 400
        late = await store.create_link("acme", "a", read_only=False)
        fake_time.advance(5 * 60 + 1)
        assert (await client.get("/console/sign-in", params={"token": late})).status_code == 400


async def test_forms_without_their_csrf_token_change_nothing(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    client = await browser_for()
    refused = await client.post("/console/connectors", data=basic_form("wrong"))
    assert refused.status_code == 403
    other = await browser_for()
    token_of_another_session = csrf_of(await other.get("/console/"))
    refused = await client.post("/console/connectors", data=basic_form(token_of_another_session))
    assert refused.status_code == 403
    assert "No connectors yet" in (await client.get("/console/")).text


async def test_a_read_only_admin_sees_and_changes_nothing(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    writer = await browser_for()
    connector_id = await created(writer)
    reader = await browser_for(read_only=True)
    listed = await reader.get("/console/")
    assert "Keyed" in listed.text and "Set up" not in listed.text and "Add more" not in listed.text
    page = await reader.get(f"/console/connectors/{connector_id}")
    assert page.status_code == 200 and "Edit" not in page.text and "Delete" not in page.text
    csrf = csrf_of(page)  # the sign-out form's
    for path in (f"/console/connectors/{connector_id}/delete", f"/console/connectors/{connector_id}/edit"):
        assert (await reader.post(path, data={"csrf": csrf, "name": "x"})).status_code == 403
    assert (await reader.get("/console/connectors/new")).status_code == 403
    assert "Keyed" in (await writer.get("/console/")).text


async def test_errors_are_shown_beside_their_fields_and_secrets_are_not_sent_back(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    client = await browser_for()
    csrf = csrf_of(await client.get("/console/connectors/new"))
    form = basic_form(
        csrf, resource_domain_url="http://crm.example.com", validation_url="ftp://x", username=""
    )
    answer = await client.post("/console/connectors", data=form)
    assert answer.status_code == 422
    for field in ("resource_domain_url", "validation_url", "username"):
        assert f'id="{field}-error"' in answer.text, field
        assert re.search(rf'id="{field}"[^>]*aria-invalid="true"', answer.text, re.S), field
    assert 'value="CRM"' in answer.text
    assert "CANARY" not in answer.text
    assert "No connectors yet" in (await client.get("/console/")).text


async def test_an_edit_made_meanwhile_by_someone_else_is_reported_not_overwritten(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    alice, bob = await browser_for(), await browser_for()
    connector_id = await created(alice)
    alice_form = await alice.get(f"/console/connectors/{connector_id}/edit")
    bob_form = await bob.get(f"/console/connectors/{connector_id}/edit")

    def edited(page: httpx.Response, name: str) -> dict[str, str]:
        version = re.search(r'name="version" value="(\d+)"', page.text)
        assert version is not None
        return {
            "csrf": csrf_of(page),
            "version": version.group(1),
            "name": name,
            "type": "api_key",
            "resource_domain_url": "https://api.example.com",
            "key_in": "header",
            "key_name": "X-API-Key",
        }

    assert (
        await bob.post(f"/console/connectors/{connector_id}/edit", data=edited(bob_form, "Bob's"))
    ).status_code == 303
    late = await alice.post(f"/console/connectors/{connector_id}/edit", data=edited(alice_form, "Alice's"))
    assert late.status_code == 409 and "Someone else changed this connector" in late.text
    assert "Bob&#39;s" in (await alice.get("/console/")).text


async def test_connect_sends_the_admin_to_the_providers_consent_page(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]], client: httpx.AsyncClient
) -> None:
    console = await browser_for("org-a")
    made = await client.post("/connectors", json=payloads.authorization_code())
    assert made.status_code == 201, made.text
    page = await console.get(f"/console/connectors/{made.json()['id']}")
    assert "Connect" in page.text
    # The page may send its form on to the provider (and nowhere else).
    assert "form-action 'self' https://127.0.0.1:9;" in page.headers["content-security-policy"]
    answer = await console.post(
        f"/console/connectors/{made.json()['id']}/connect", data={"csrf": csrf_of(page)}
    )
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("https://127.0.0.1:9/oauth/authorize?")
    query = parse_qs(urlsplit(location).query)
    assert query["redirect_uri"] == [f"{BASE}/oauth/callback"]


async def test_a_consent_started_in_the_console_finishes_only_in_that_browser(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
    client: httpx.AsyncClient,
    auth_server: AuthorizationServerThread,
    local_ca: LocalCA,
) -> None:
    auth_server.add_clients(
        [
            RegisteredClient(
                "ac-client",
                "CANARY-ac-secret",
                grant_types=("authorization_code", "refresh_token"),
                scope="read offline_access",
                redirect_uris=(f"{BASE}/oauth/callback",),
            )
        ]
    )
    auth_server.store.add_user("admin", "CANARY-admin-pw")
    body = payloads.authorization_code(
        token_url=auth_server.token_url,
        authorization_url=auth_server.authorization_url,
        client_id="ac-client",
        client_secret="CANARY-ac-secret",
    )
    connector_id = (await client.post("/connectors", json=body)).json()["id"]
    console = await browser_for("org-a")
    provider = ProviderBrowser(local_ca.ca_bundle)

    async def consent_location() -> str:
        page = await console.get(f"/console/connectors/{connector_id}")
        started = await console.post(
            f"/console/connectors/{connector_id}/connect", data={"csrf": csrf_of(page)}
        )
        assert "Path=/oauth/callback" in started.headers["set-cookie"]
        return await provider.consent(
            started.headers["location"], username="admin", password="CANARY-admin-pw"
        )

    try:
        # Another browser (no binding cookie) cannot finish it: nothing is connected.
        location = await consent_location()
        async with httpx.AsyncClient(transport=console._transport, base_url=BASE) as stranger:
            refused = await stranger.get(location.removeprefix(BASE))
        assert refused.status_code == 303 and "error=other_browser" in refused.headers["location"]
        assert "Needs an admin" in (await console.get(f"/console/connectors/{connector_id}")).text
        # The admin's own browser can.
        location = await consent_location()
        back = await console.get(location.removeprefix(BASE))
        assert back.status_code == 303
        assert back.headers["location"].startswith(f"{BASE}/console/connectors/{connector_id}?")
        assert "result=connected" in back.headers["location"]
        page = await console.get(back.headers["location"].removeprefix(BASE))
        assert "The account is connected." in page.text and "Working" in page.text
    finally:
        await provider.aclose()


async def test_webhooks_are_added_edited_rotated_resent_and_deleted(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]], client: httpx.AsyncClient
) -> None:
    console = await browser_for("org-a")
    form = await console.get("/console/webhooks/new")
    assert form.status_code == 200
    refused = await console.post(
        "/console/webhooks/",
        data={"csrf": csrf_of(form), "url": "http://hooks.example.com/in", "enabled": "on"},
    )
    assert refused.status_code == 422 and 'id="url-error"' in refused.text
    added = await console.post(
        "/console/webhooks/",
        data={
            "csrf": csrf_of(form),
            "url": "https://127.0.0.1:9/in",
            "event_type": "connector.created",
            "enabled": "on",
        },
    )
    assert added.status_code == 200 and "not shown again" in added.text
    secret = re.search(r'<code id="secret">(whsec_[^<]+)</code>', added.text)
    assert secret is not None
    webhook_id = re.search(r'href="/console/webhooks/([0-9a-f-]{36})"', added.text)
    assert webhook_id is not None
    page_url = f"/console/webhooks/{webhook_id.group(1)}"
    page = await console.get(page_url)
    assert secret.group(1) not in page.text and "connector.created" in page.text

    # An event: a delivery to resend.
    await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})
    page = await console.get(page_url)
    delivery = re.search(r'name="delivery" value="([0-9a-f-]{36})"', page.text)
    assert delivery is not None, page.text
    resent = await console.post(
        f"{page_url}/resend", data={"csrf": csrf_of(page), "delivery": delivery.group(1)}
    )
    assert resent.status_code == 303 and resent.headers["location"].endswith("?done=resent")

    edit = await console.get(f"{page_url}/edit")
    version = re.search(r'name="version" value="(\d+)"', edit.text)
    assert version is not None
    saved = await console.post(
        f"{page_url}/edit",
        data={"csrf": csrf_of(edit), "version": version.group(1), "url": "https://127.0.0.1:9/other"},
    )
    assert saved.status_code == 303
    page = await console.get(page_url)
    assert (
        "https://127.0.0.1:9/other" in page.text and "All events" in page.text and "Turned off" in page.text
    )

    rotated = await console.post(f"{page_url}/rotate-secret", data={"csrf": csrf_of(page)})
    new_secret = re.search(r'<code id="secret">(whsec_[^<]+)</code>', rotated.text)
    assert new_secret is not None and new_secret.group(1) != secret.group(1)
    assert "previous secret also signs" in rotated.text

    page = await console.get(page_url)
    version = re.search(r'name="version" value="(\d+)"', page.text)
    assert version is not None
    gone = await console.post(f"{page_url}/delete", data={"csrf": csrf_of(page), "version": version.group(1)})
    assert gone.status_code == 303
    assert "No webhooks yet" in (await console.get("/console/webhooks/")).text


async def test_the_form_takes_private_key_jwt_and_judges_the_key_beside_its_field(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    console = await browser_for()
    form = await console.get("/console/connectors/new")
    assert 'id="private_key"' in form.text and 'id="tls_certificate"' in form.text
    answer = await console.post(
        "/console/connectors",
        data={
            "csrf": csrf_of(form),
            "name": "Signed",
            "type": "oauth2",
            "resource_domain_url": "https://api.example.com",
            "grant_type": "client_credentials",
            "client_auth_method": "private_key_jwt",
            "client_id": "signed-client",
            "token_url": "https://127.0.0.1:9/oauth/token",
            "private_key": "-----BEGIN PRIVATE KEY-----\nCANARYnotakey\n-----END PRIVATE KEY-----\n",
            "signing_alg": "RS256",
        },
    )
    assert answer.status_code == 422
    assert 'id="private_key-error"' in answer.text
    assert "CANARY" not in answer.text
    assert re.search(r'<option value="private_key_jwt" selected>', answer.text)


async def test_a_status_error_reads_in_words(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
    client: httpx.AsyncClient,
    scripted_server: ScriptedServer,
) -> None:
    scripted_server.set_default(Reply(status=401))
    body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    made = await client.post("/connectors", json=body, params={"validate": "false"})
    checked = await client.post(f"/connectors/{made.json()['id']}/validate")
    assert checked.json()["status"]["state"] == "rejected"
    console = await browser_for("org-a")
    listed = await console.get("/console/")
    assert "Credentials refused: The provider refused the credentials" in listed.text
    hungarian = await console.get("/console/", params={"lang": "hu"})
    assert "A szolgáltató elutasította a hitelesítő adatokat" in hungarian.text
