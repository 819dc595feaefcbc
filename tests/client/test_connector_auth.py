"""``ConnectorAuth`` end to end: the service's answers on requests to a real resource server.

The client's clock is the service's (``fake_time``), so expiry is reached by moving it.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from connectors_client import (
    AsyncConnectorsClient,
    ConnectorAuth,
    ConnectorsClient,
    DestinationRefused,
    PathOutsideResourceDomain,
)

from tests.client.conftest import (
    BASIC_USER,
    Flavour,
    LiveService,
    ResourceServer,
    basic_connector,
    oauth_connector,
    run,
)
from tests.support.authserver import AuthorizationServerThread
from tests.support.fakes import FakeTime
from tests.support.servers import ScriptedServer

# The service hands out the Authlib provider's tokens (3600 s) until 60 s before they expire
# (its answer's expires_at), and renews them in the background from 300 s before that.
TOKEN_LIFETIME = 3600
HANDED_OUT_FOR = TOKEN_LIFETIME - 60
NO_PATH = b"{}"
FORCED = b'{"force_refresh":true}'


async def oauth_auth(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
    **options: timedelta,
) -> ConnectorAuth:
    created = await run(
        flavour.connectors.create(oauth_connector("Orders", idp, client_secret, resource.base_url))
    )
    return ConnectorAuth(flavour.connectors, created.id, clock=fake_time.now, **options)


async def get(flavour: Flavour, url: str, auth: ConnectorAuth) -> httpx.Response:
    return await run(flavour.resource.get(url, auth=auth))


async def test_attaches_the_bearer_and_reuses_it(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
) -> None:
    auth = await oauth_auth(flavour, idp, resource, client_secret, fake_time)
    paths = ["/api/v1/customers?id=7", "/api/v1/customers/7/orders", "/api", "/api/", "/api?page=2&q=a%20b"]
    for path in paths:
        response = await get(flavour, resource.url(path), auth)
        assert response.status_code == 200
        assert response.json() == {"path": path}
    [bearer] = set(resource.credentials())
    assert bearer.startswith("Bearer ")
    assert idp.store.find_access_token(bearer.removeprefix("Bearer ")) is not None
    # One authorize for the five requests, and the token the service fetched when it checked the
    # connector: no other token request.
    assert flavour.authorize_bodies() == [NO_PATH]
    assert idp.request_count == 1


async def test_renews_shortly_before_expiry(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
) -> None:
    # A leeway that ends the reuse before the service starts renewing (so no renewal runs while
    # the test moves the clock), and no bound on an answer's age, which would end it first.
    leeway = timedelta(minutes=10)
    auth = await oauth_auth(
        flavour, idp, resource, client_secret, fake_time, leeway=leeway, max_age=timedelta(days=1)
    )
    url = resource.url("/api/v1/items")
    assert (await get(flavour, url, auth)).status_code == 200
    fake_time.advance(HANDED_OUT_FOR - leeway.total_seconds() - 1)
    assert (await get(flavour, url, auth)).status_code == 200
    assert len(flavour.authorize_bodies()) == 1
    fake_time.advance(2)  # now within the leeway of the answer's expires_at
    assert (await get(flavour, url, auth)).status_code == 200
    assert len(flavour.authorize_bodies()) == 2

    # Past the token's lifetime the service hands out a new token, and the client sends it.
    fake_time.advance(TOKEN_LIFETIME)
    assert (await get(flavour, url, auth)).status_code == 200
    assert len(flavour.authorize_bodies()) == 3
    first, *_, last = resource.credentials()
    assert first != last
    assert idp.request_count >= 2


async def test_a_revoked_token_is_refreshed_once(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
) -> None:
    auth = await oauth_auth(flavour, idp, resource, client_secret, fake_time)
    url = resource.url("/api/v1/items")
    assert (await get(flavour, url, auth)).status_code == 200
    [first] = resource.credentials()
    idp.store.revoke(first.removeprefix("Bearer "))
    # The service keeps a token reported refused within 5 s of its arrival.
    fake_time.advance(10)

    response = await get(flavour, url, auth)
    assert response.status_code == 200
    refused, renewed = resource.credentials()[1:]
    assert refused == first
    assert renewed != first
    assert flavour.authorize_bodies() == [NO_PATH, FORCED]

    # The new token is reused.
    assert (await get(flavour, url, auth)).status_code == 200
    assert resource.credentials()[-1] == renewed
    assert len(flavour.authorize_bodies()) == 2

    # Refused again at once: the service keeps the token that just arrived, the retry is refused
    # as well, and that 401 is the answer. One retry, no loop.
    idp.store.revoke(renewed.removeprefix("Bearer "))
    before = resource.server.count
    response = await get(flavour, url, auth)
    assert response.status_code == 401
    assert resource.server.count == before + 2
    assert flavour.authorize_bodies() == [NO_PATH, FORCED, FORCED]


async def test_refuses_every_other_destination(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
    other_origin: ScriptedServer,
) -> None:
    auth = await oauth_auth(flavour, idp, resource, client_secret, fake_time)
    port = resource.server.port
    elsewhere = [
        other_origin.url("/api/v1/items"),  # another server
        resource.url("/api/v1/items", host="localhost"),  # the same server under another name
        f"http://127.0.0.1:{port}/api/v1/items",  # another scheme
        resource.url("/v1/items"),  # outside the base path
        resource.url("/apiv1"),
    ]
    for url in elsewhere:
        with pytest.raises(DestinationRefused):
            await get(flavour, url, auth)
    assert other_origin.count == 0
    assert resource.server.count == 0
    # Refusing used the one answer it fetched to learn the resource domain.
    assert flavour.authorize_bodies() == [NO_PATH]


async def test_paths_it_cannot_judge_go_to_the_service(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
) -> None:
    auth = await oauth_auth(flavour, idp, resource, client_secret, fake_time)
    # An escape in the path: the service answers for that path, and the request goes.
    response = await get(flavour, resource.url("/api/v1/items%20list"), auth)
    assert response.status_code == 200
    assert response.json() == {"path": "/api/v1/items%20list"}
    assert flavour.authorize_bodies() == [NO_PATH, b'{"path":"/v1/items%20list"}']
    # Encoded dots, which a resource server may decode into "..": refused, nothing sent.
    with pytest.raises(PathOutsideResourceDomain):
        await get(flavour, resource.url("/api/%2e%2e/admin"), auth)
    assert resource.server.count == 1
    # Control characters hidden in the query.
    with pytest.raises(PathOutsideResourceDomain):
        await get(flavour, resource.url("/api/v1?q=%0d%0aX-Injected:%201"), auth)
    assert resource.server.count == 1


async def test_a_basic_connector(
    flavour: Flavour, resource: ResourceServer, basic_password: str, fake_time: FakeTime
) -> None:
    created = await run(flavour.connectors.create(basic_connector("Billing", resource, basic_password)))
    assert created.status.state == "authorized"  # checked live at the validation URL
    auth = ConnectorAuth(flavour.connectors, created.id, clock=fake_time.now, max_age=timedelta(minutes=5))
    for path in ("/api/v1/invoices", "/api/v1/invoices/3", "/api/v1/invoices?due=soon"):
        assert (await get(flavour, resource.url(path), auth)).status_code == 200
    expected = "Basic " + base64.b64encode(f"{BASIC_USER}:{basic_password}".encode()).decode()
    assert resource.credentials()[1:] == [expected] * 3  # after the validation request
    assert flavour.authorize_bodies() == [NO_PATH]
    # A Basic header has no expiry: it is asked for again after max_age.
    fake_time.advance(5 * 60)
    assert (await get(flavour, resource.url("/api/v1/invoices"), auth)).status_code == 200
    assert flavour.authorize_bodies() == [NO_PATH, NO_PATH]


async def test_concurrent_requests_share_one_authorize(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    fake_time: FakeTime,
) -> None:
    auth = await oauth_auth(flavour, idp, resource, client_secret, fake_time)
    urls = [resource.url(f"/api/v1/items/{i}") for i in range(8)]
    assert await at_once(flavour, urls, auth) == [200] * len(urls)
    assert flavour.authorize_bodies() == [NO_PATH]

    # All refused with the revoked token at once: one of them asks for a new one, for all.
    [bearer] = set(resource.credentials())
    idp.store.revoke(bearer.removeprefix("Bearer "))
    fake_time.advance(10)
    assert await at_once(flavour, urls, auth) == [200] * len(urls)
    assert flavour.authorize_bodies() == [NO_PATH, FORCED]


async def at_once(flavour: Flavour, urls: list[str], auth: ConnectorAuth) -> list[int]:
    """Status codes of concurrent GETs: tasks with the async flavour, threads with the sync one."""
    if isinstance(flavour.resource, httpx.AsyncClient):
        responses = await asyncio.gather(*(flavour.resource.get(url, auth=auth) for url in urls))
    else:
        sync_client = flavour.resource
        with ThreadPoolExecutor(len(urls)) as pool:
            responses = list(pool.map(lambda url: sync_client.get(url, auth=auth), urls))
    return [response.status_code for response in responses]


async def test_each_flavour_serves_its_own_httpx_client(live: LiveService) -> None:
    with ConnectorsClient(live.base_url, live.token()) as sync_api:
        async with httpx.AsyncClient() as async_http:
            with pytest.raises(TypeError):
                await async_http.get("https://127.0.0.1:1/", auth=ConnectorAuth(sync_api, "x"))
    async with AsyncConnectorsClient(live.base_url, live.token()) as async_api:
        with httpx.Client() as sync_http, pytest.raises(TypeError):
            sync_http.get("https://127.0.0.1:1/", auth=ConnectorAuth(async_api, "x"))
