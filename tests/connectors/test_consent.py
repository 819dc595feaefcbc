"""Authorization code connectors through the real app, against a real authorization server on
127.0.0.1 (TLS) that renders its own sign-in and consent pages.

The admin's browser is ``ProviderBrowser`` (forms and cookies); the provider's redirect back to
the service is delivered to the app's ``GET /oauth/callback`` as the browser would deliver it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from app.connectors.models import ConnectorGrant, ConsentRequest
from app.core.config import Settings
from app.core.crypto import KeyRing, secret_aad
from app.core.db import Database, build_engine
from app.main import Overrides
from app.rotation import rotate_grant_keys
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize, recorded_status, unhurried
from tests.connectors.test_crud import assert_problem
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.consent import ProviderBrowser
from tests.support.fakes import FakeTime
from tests.support.metrics import scrape
from tests.support.tls import LocalCA

ClientFor = Callable[..., httpx.AsyncClient]
CALLBACK = "http://127.0.0.1:8000/oauth/callback"
CLIENT_SECRET = "CANARY-ac-secret"
USER, PASSWORD = "admin@example.com", "CANARY-admin-pw"


@pytest.fixture
def provider(auth_server: AuthorizationServerThread) -> AuthorizationServerThread:
    auth_server.add_clients(
        [
            RegisteredClient(
                "ac-client",
                CLIENT_SECRET,
                grant_types=("authorization_code", "refresh_token"),
                scope="read write offline_access",
                redirect_uris=(CALLBACK,),
            )
        ]
    )
    auth_server.store.add_user(USER, PASSWORD)
    return auth_server


@pytest.fixture
async def browser(local_ca: LocalCA) -> AsyncIterator[ProviderBrowser]:
    browser = ProviderBrowser(local_ca.ca_bundle)
    yield browser
    await browser.aclose()


def body_for(provider: AuthorizationServerThread, **auth: Any) -> dict[str, Any]:
    return payloads.authorization_code(
        token_url=provider.token_url,
        authorization_url=provider.authorization_url,
        client_id="ac-client",
        client_secret=CLIENT_SECRET,
        scope="read offline_access",
        **auth,
    )


async def callback(app: Any, location: str) -> httpx.Response:
    """Deliver the provider's redirect to the service as the browser would: no caller token."""
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == CALLBACK, location
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000"
    ) as anon:
        return await anon.get(f"{parts.path}?{parts.query}")


async def start(client: httpx.AsyncClient, connector_id: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/connectors/{connector_id}/consent", json=body or None)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    started: dict[str, Any] = response.json()
    return started


async def connect(
    app: Any, client: httpx.AsyncClient, browser: ProviderBrowser, connector_id: str, **body: Any
) -> httpx.Response:
    started = await start(client, connector_id, **body)
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    return await callback(app, location)


@pytest.fixture
async def timed_app(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings, fake_time: FakeTime
) -> Any:
    return await app_factory(unhurried(settings), Overrides(clock=fake_time))


async def test_an_admin_connects_the_account_and_flows_get_renewed_tokens(
    timed_app: Any,
    client_for: ClientFor,
    provider: AuthorizationServerThread,
    browser: ProviderBrowser,
    fake_time: FakeTime,
) -> None:
    client = client_for(app=timed_app)
    created = (await client.post("/connectors", json=body_for(provider))).json()
    url = f"/connectors/{created['id']}"
    # A create calls nothing out: there is no grant to check yet.
    assert provider.request_count == 0
    assert created["status"]["state"] == "consent_required"
    assert created["auth"]["redirect_uri"] == CALLBACK
    assert created["auth"]["has_refresh_token"] is False
    assert created["auth"]["connected_at"] is None
    refused = await authorize(client, created["id"])
    assert_problem(refused, 409, "consent_required")
    assert "connect" in refused.json()["detail"]
    assert provider.request_count == 0

    started = await start(client, created["id"])
    query = parse_qs(urlsplit(started["authorization_url"]).query)
    assert started["authorization_url"].startswith(provider.authorization_url + "?")
    assert {name: values[0] for name, values in query.items() if name not in ("state", "code_challenge")} == {
        "response_type": "code",
        "client_id": "ac-client",
        "redirect_uri": CALLBACK,
        "scope": "read offline_access",
        "code_challenge_method": "S256",
    }
    assert len(query["state"][0]) >= 43 and len(query["code_challenge"][0]) == 43
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    assert parse_qs(urlsplit(location).query)["iss"] == [provider.issuer]
    page = await callback(timed_app, location)
    assert page.status_code == 200, page.text
    assert "connected" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # The code was exchanged with the PKCE verifier of the challenge and the redirect URI.
    (exchange,) = provider.store.code_exchanges
    verifier = exchange["code_verifier"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert digest == query["code_challenge"][0]
    assert exchange["redirect_uri"] == CALLBACK

    read = (await client.get(url)).json()
    assert read["status"]["state"] == "authorized"
    assert read["auth"]["has_refresh_token"] is True
    assert read["auth"]["connected_at"] is not None
    assert read["auth"]["granted_scope"] == "read offline_access"
    assert "refresh_token" not in read["auth"] and "access_token" not in read["auth"]
    answer = await authorize(client, created["id"])
    assert answer.status_code == 200, answer.text
    first = answer.json()["headers"]["Authorization"]
    assert provider.store.find_access_token(first.removeprefix("Bearer ")) is provider.store.tokens[0]
    exchanged = provider.request_count

    # Renewed with the refresh token (rotated by the provider), then again with the rotated one.
    for step in (1, 2):
        fake_time.advance(7200)
        renewed = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
        assert renewed != first
        assert provider.request_count == exchanged + step
        assert provider.store.tokens[step - 1].revoked, "the provider rotated the refresh token it was sent"
        assert (
            provider.store.find_access_token(renewed.removeprefix("Bearer ")) is provider.store.tokens[step]
        )
        first = renewed

    # The admin removes the app at the provider: the next renewal is refused, and the connector
    # asks for consent, with no further request until an admin reconnects.
    assert provider.store.end_grants(USER) > 0
    fake_time.advance(7200)
    assert_problem(await authorize(client, created["id"]), 409, "consent_required")
    status = await recorded_status(client, url, "consent_required")
    assert status["checked_at"] is not None
    assert (await client.get(url)).json()["auth"]["has_refresh_token"] is False
    count = provider.request_count
    assert_problem(await authorize(client, created["id"]), 409, "consent_required")
    assert provider.request_count == count
    history = (await client.get(f"{url}/history")).json()["items"]
    assert [event["action"] for event in history][:2] == ["status", "connect"]
    assert history[0]["outcome"] == "consent_required"

    # Reconnecting mends it.
    page = await connect(timed_app, client, browser, created["id"])
    assert page.status_code == 200, page.text
    again = await authorize(client, created["id"])
    assert again.status_code == 200, again.text
    assert (await client.get(url)).json()["status"]["state"] == "authorized"


async def test_a_return_url_gets_the_outcome_in_its_query(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    back = "http://127.0.0.1:8000/console/connectors?tab=1"
    answer = await connect(app, client, browser, created["id"], return_url=back)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{back}&connector_id={created['id']}&result=connected"
    assert answer.headers["referrer-policy"] == "no-referrer"


async def test_a_return_url_of_another_origin_is_refused(
    client: httpx.AsyncClient, provider: AuthorizationServerThread
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    refused = await client.post(
        f"/connectors/{created['id']}/consent", json={"return_url": "https://evil.example/steal"}
    )
    assert_problem(refused, 422, "invalid_request")
    assert refused.json()["errors"][0]["field"] == "return_url"


async def test_consent_is_only_for_authorization_code_connectors(
    client: httpx.AsyncClient,
) -> None:
    created = (
        await client.post("/connectors", json=payloads.client_credentials(), params={"validate": "false"})
    ).json()
    assert_problem(await client.post(f"/connectors/{created['id']}/consent"), 409, "wrong_grant_type")


async def test_denied_replayed_foreign_and_tampered_callbacks_change_nothing(
    app: Any,
    client: httpx.AsyncClient,
    client_for: ClientFor,
    provider: AuthorizationServerThread,
    browser: ProviderBrowser,
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    url = f"/connectors/{created['id']}"

    async def unchanged() -> None:
        read = (await client.get(url)).json()
        assert read["status"]["state"] == "consent_required"
        assert read["auth"]["has_refresh_token"] is False

    # Denied at the provider.
    started = await start(client, created["id"])
    denied = await callback(
        app,
        await browser.consent(
            started["authorization_url"], username=USER, password=PASSWORD, decision="deny"
        ),
    )
    assert denied.status_code == 400 and "not granted" in denied.text
    await unchanged()

    # A tampered code: the provider refuses the exchange.
    started = await start(client, created["id"])
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    tampered = await callback(app, location.replace("code=", "code=x"))
    assert tampered.status_code == 400 and "refused" in tampered.text
    await unchanged()
    # That state was used: the genuine code cannot finish it any more.
    replayed = await callback(app, location)
    assert replayed.status_code == 400 and "already used" in replayed.text
    await unchanged()

    # Another organization's connector: its state finishes its own connector only, and a state
    # unknown to the service (made up) finishes nothing.
    other = client_for("org-b")
    theirs = (await other.post("/connectors", json=body_for(provider, name="Theirs"))).json()
    started = await start(other, theirs["id"])
    state = parse_qs(urlsplit(started["authorization_url"]).query)["state"][0]
    made_up = await callback(app, f"{CALLBACK}?state={state[:-2]}xx&code=abc")
    assert made_up.status_code == 400
    await unchanged()
    # Org A's admin consents with org B's consent link (sent to them, or stolen): the grant goes
    # to B's connector, the one the state was made for, and A's connector is untouched.
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    assert (await callback(app, location)).status_code == 200
    await unchanged()
    assert (await other.get(f"/connectors/{theirs['id']}")).json()["status"]["state"] == "authorized"
    assert (await client.get(f"/connectors/{theirs['id']}")).status_code == 404

    # A wrong issuer in the response (RFC 9207).
    provider.store.response_issuer = "https://other-idp.example"
    started = await start(client, created["id"])
    wrong = await callback(
        app, await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    )
    assert wrong.status_code == 400 and "another authorization server" in wrong.text
    await unchanged()
    provider.store.response_issuer = None

    # The connector changed between the start and the callback.
    started = await start(client, created["id"])
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    renamed = await client.patch(url, json={"name": "Renamed"})
    assert renamed.status_code == 200
    changed = await callback(app, location)
    assert changed.status_code == 400 and "changed" in changed.text
    await unchanged()
    history = [event["outcome"] for event in (await client.get(f"{url}/history")).json()["items"]]
    assert {"access_denied", "code_rejected", "wrong_issuer", "connector_changed"} <= set(history)
    scraped = await scrape(app)
    for result in ("access_denied", "code_rejected", "wrong_issuer", "connector_changed"):
        assert scraped.value("connectors_consents_total", result=result) == 1, result
    assert scraped.value("connectors_consents_total", result="unknown_state") == 2


async def test_an_expired_consent_changes_nothing(
    timed_app: Any,
    client_for: ClientFor,
    provider: AuthorizationServerThread,
    browser: ProviderBrowser,
    fake_time: FakeTime,
) -> None:
    client = client_for(app=timed_app)
    created = (await client.post("/connectors", json=body_for(provider))).json()
    started = await start(client, created["id"])
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    fake_time.advance(601)
    expired = await callback(timed_app, location)
    assert expired.status_code == 400 and "10 minutes" in expired.text
    assert provider.store.code_exchanges == []
    assert (await client.get(f"/connectors/{created['id']}")).json()["status"]["state"] == "consent_required"


async def test_changing_what_the_grant_was_given_to_asks_for_consent_again(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    url = f"/connectors/{created['id']}"
    assert (await connect(app, client, browser, created["id"])).status_code == 200
    # A rename or new extra parameters keep the grant.
    kept = await client.patch(
        url, json={"name": "Renamed", "auth": {"extra_authorization_params": {"prompt": "consent"}}}
    )
    assert kept.status_code == 200, kept.text
    assert kept.json()["status"]["state"] == "authorized"
    assert kept.json()["auth"]["has_refresh_token"] is True
    assert (await authorize(client, created["id"])).status_code == 200
    # A new scope does not.
    moved = await client.patch(url, json={"auth": {"scope": "read write"}})
    assert moved.status_code == 200, moved.text
    assert moved.json()["status"]["state"] == "consent_required"
    assert moved.json()["auth"]["has_refresh_token"] is False
    assert_problem(await authorize(client, created["id"]), 409, "consent_required")


async def test_reserved_authorization_parameters_are_refused(client: httpx.AsyncClient) -> None:
    for name in ("state", "Redirect.URI", "CODE_CHALLENGE", "response-type"):
        body = payloads.authorization_code(extra_authorization_params={name: "x"})
        assert_problem(await client.post("/connectors", json=body), 422, "invalid_request")
    body = payloads.authorization_code(authorization_url="https://127.0.0.1:9/authorize?client_id=x")
    assert_problem(await client.post("/connectors", json=body), 422, "invalid_request")


async def test_concurrent_callbacks_with_one_state_connect_once(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    started = await start(client, created["id"])
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    answers = await asyncio.gather(*(callback(app, location) for _ in range(5)))
    assert sorted(answer.status_code for answer in answers) == [200, 400, 400, 400, 400]
    assert len(provider.store.code_exchanges) == 1


async def test_rotate_keys_reseals_grants_and_open_consents(
    app: Any,
    settings: Settings,
    client: httpx.AsyncClient,
    provider: AuthorizationServerThread,
    browser: ProviderBrowser,
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    assert (await connect(app, client, browser, created["id"])).status_code == 200
    await start(client, created["id"])  # left open
    old = KeyRing.from_settings(settings)
    ring = KeyRing([("k2", secrets.token_bytes(32)), *settings.key_ring()])
    db = Database(build_engine(settings.database_url))
    try:
        async with db.read() as session:
            before = (await session.execute(select(ConnectorGrant))).scalar_one()
        report = await rotate_grant_keys(db, ring)
        assert (report.rotated, report.failed) == (2, 0)
        async with db.read() as session:
            grant = (await session.execute(select(ConnectorGrant))).scalar_one()
            consent = (await session.execute(select(ConsentRequest))).scalar_one()
    finally:
        await db.dispose()
    assert (grant.key_id, consent.key_id) == ("k2", "k2")
    assert grant.generation == before.generation
    aad = secret_aad(grant.organization_id, grant.connector_id, "refresh_token")
    assert ring.decrypt(grant.refresh_token or "", aad=aad) == old.decrypt(
        before.refresh_token or "", aad=aad
    )


async def test_without_a_refresh_token_the_grant_ends_with_its_access_token(
    timed_app: Any,
    client_for: ClientFor,
    provider: AuthorizationServerThread,
    browser: ProviderBrowser,
    fake_time: FakeTime,
) -> None:
    provider.store.issue_refresh_tokens = False
    client = client_for(app=timed_app)
    created = (await client.post("/connectors", json=body_for(provider))).json()
    url = f"/connectors/{created['id']}"
    assert (await connect(timed_app, client, browser, created["id"])).status_code == 200
    read = (await client.get(url)).json()
    assert read["status"]["state"] == "authorized"
    assert read["auth"]["has_refresh_token"] is False
    token = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    fake_time.advance(1800)
    assert (await authorize(client, created["id"])).json()["headers"]["Authorization"] == token
    exchanged = provider.request_count
    # Past its access token's life there is nothing to renew with: consent again.
    fake_time.advance(3600)
    assert_problem(await authorize(client, created["id"]), 409, "consent_required")
    await recorded_status(client, url, "consent_required")
    assert provider.request_count == exchanged


async def test_a_reconnect_that_fails_keeps_the_grant_in_use(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    url = f"/connectors/{created['id']}"
    assert (await connect(app, client, browser, created["id"])).status_code == 200
    before = (await client.get(url)).json()
    token = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    started = await start(client, created["id"])
    location = await browser.consent(
        started["authorization_url"], username=USER, password=PASSWORD, decision="deny"
    )
    assert (await callback(app, location)).status_code == 400
    after = (await client.get(url)).json()
    assert after["status"] == before["status"]
    assert after["auth"]["connected_at"] == before["auth"]["connected_at"]
    assert (await authorize(client, created["id"])).json()["headers"]["Authorization"] == token


async def test_return_urls_are_judged_by_origin_as_browsers_compare_them(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    provider: AuthorizationServerThread,
) -> None:
    allowed = settings.model_copy(
        update={"consent_return_origins": ("https://console.example.com", "http://localhost:3000")}
    )
    client = client_for(app=await app_factory(allowed))
    created = (await client.post("/connectors", json=body_for(provider))).json()
    consent = f"/connectors/{created['id']}/consent"
    for url in (
        "https://console.example.com/done",
        "https://CONSOLE.example.com:443/done?x=1",
        "http://localhost:3000/cb",
        "http://127.0.0.1:8000/after",  # the service's own origin
    ):
        assert (await client.post(consent, json={"return_url": url})).status_code == 201, url
    for url in (
        "http://console.example.com/done",  # another scheme is another origin
        "https://console.example.com:8443/done",
        "https://localhost:3000/cb",
        "https://console.example.com.evil.example/done",
        "https://console.example.com/caf\u00e9",
        "https://console.example.com/a\x00b",
        "https://console.example.com/a b",
        "javascript:alert(1)",
    ):
        refused = await client.post(consent, json={"return_url": url})
        assert_problem(refused, 422, "invalid_request")
        assert refused.json()["errors"][0]["field"] == "return_url", url


async def test_a_configured_issuer_must_be_named_in_the_answer(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider, issuer=provider.issuer))).json()
    started = await start(client, created["id"])
    location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
    without_iss = "&".join(part for part in location.split("&") if not part.startswith("iss="))
    refused = await callback(app, without_iss)
    assert refused.status_code == 400 and "another authorization server" in refused.text


async def test_connecting_makes_a_new_version(
    app: Any, client: httpx.AsyncClient, provider: AuthorizationServerThread, browser: ProviderBrowser
) -> None:
    created = (await client.post("/connectors", json=body_for(provider))).json()
    assert (await connect(app, client, browser, created["id"])).status_code == 200
    read = await client.get(f"/connectors/{created['id']}")
    assert read.json()["version"] == created["version"] + 1
    assert read.headers["etag"] == f'"{created["version"] + 1}"'
    stale = await client.patch(
        f"/connectors/{created['id']}", json={"name": "Late"}, headers={"If-Match": f'"{created["version"]}"'}
    )
    assert_problem(stale, 412, "version_mismatch")
