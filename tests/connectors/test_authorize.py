"""Live checks and /authorize through the real app, against real HTTPS servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.main import Overrides
from tests.conftest import CANARY, canary
from tests.connectors import payloads
from tests.connectors.test_crud import assert_problem
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]


def token_reply(token: str, expires_in: int = 3600, **extra: Any) -> Reply:
    return Reply.json({"access_token": token, "token_type": "Bearer", "expires_in": expires_in, **extra})


def counter_tokens(prefix: str = "tok", expires_in: int = 3600, delay: float = 0.0) -> Callable[..., Reply]:
    issued = iter(range(1, 10_000))

    def respond(_request: object) -> Reply:
        reply = token_reply(f"{prefix}-{next(issued)}", expires_in)
        return Reply(status=reply.status, headers=reply.headers, body=reply.body, delay=delay)

    return respond


async def create_checked(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/connectors", json=body)


async def recorded_status(client: httpx.AsyncClient, url: str, state: str) -> dict[str, Any]:
    """The connector's status once it shows ``state``: a token request's outcome is written in
    the background, after the callers got their answer."""
    for _ in range(500):
        status: dict[str, Any] = (await client.get(url)).json()["status"]
        if status["state"] == state:
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"the status never became {state}: {status}")


async def authorize(client: httpx.AsyncClient, connector_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"/connectors/{connector_id}/authorize", json=body)


# Basic ------------------------------------------------------------------------------------------


async def test_basic_is_checked_on_create_and_authorized_without_outbound_calls(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=204))
    body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    response = await create_checked(client, body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"]["state"] == "authorized"
    assert created["status"]["checked_at"] is not None
    (check,) = scripted_server.requests
    expected = "Basic " + base64.b64encode(f"svc-user:{body['auth']['password']}".encode()).decode()
    assert check.method == "GET"
    assert check.headers["authorization"] == expected

    answer = await authorize(client, created["id"], path="/v1/customers?id=7")
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json() == {
        "url": "https://api.example.com/v1/customers?id=7",
        "headers": {"Authorization": expected},
        "resource_origin": "https://api.example.com",
        "expires_at": None,
    }
    assert CANARY in base64.b64decode(answer.json()["headers"]["Authorization"][6:]).decode()
    assert scripted_server.count == 1


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(status=401), 422, "credentials_rejected"),
        (Reply(status=403), 422, "credentials_rejected"),
        (Reply.html(500), 502, "upstream_unreachable"),
        (
            Reply(status=302, headers={"Location": "https://127.0.0.1:1/elsewhere"}),
            502,
            "upstream_unreachable",
        ),
        (Reply(status=404), 502, "upstream_unreachable"),
    ],
)
async def test_basic_check_failures_save_nothing(
    client: httpx.AsyncClient, scripted_server: ScriptedServer, reply: Reply, status: int, code: str
) -> None:
    scripted_server.set_default(reply)
    body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    assert_problem(await create_checked(client, body), status, code)
    assert (await client.get("/connectors")).json()["items"] == []


async def test_basic_check_timeout_is_504_and_saves_nothing(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
) -> None:
    scripted_server.set_default(Reply(status=200, delay=3.0))
    body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    assert_problem(await create_checked(client_for(), body), 504, "upstream_timeout")
    assert (await client_for().get("/connectors")).json()["items"] == []


# The other paths: tests/unit/test_url_rules.py (and the encoded forms in test_urls.py).
@pytest.mark.parametrize("path", ["https://evil.example.com/x", "/a/../../x"])
async def test_paths_leaving_the_resource_domain_are_refused(client: httpx.AsyncClient, path: str) -> None:
    created = (await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})).json()
    assert_problem(await authorize(client, created["id"], path=path), 422, "path_outside_resource_domain")


async def test_authorize_without_body_gives_the_base_url(client: httpx.AsyncClient) -> None:
    created = (await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})).json()
    response = await client.post(f"/connectors/{created['id']}/authorize")
    assert response.status_code == 200, response.text
    assert response.json()["url"] == "https://api.example.com"


# OAuth 2.0 with an independent authorization server --------------------------------------------


@pytest.fixture
def idp(auth_server: AuthorizationServerThread) -> AuthorizationServerThread:
    auth_server.add_clients(
        [
            RegisteredClient("cc-basic", "CANARY-cc-secret", auth_method="client_secret_basic"),
            RegisteredClient("cc-post", "CANARY-post-secret", auth_method="client_secret_post"),
        ]
    )
    auth_server.store.add_user("svc-user", "CANARY-user-pw")
    return auth_server


@pytest.mark.parametrize(
    ("client_id", "method", "grant"),
    [
        ("cc-basic", "client_secret_basic", "client_credentials"),
        ("cc-post", "client_secret_post", "client_credentials"),
        ("cc-basic", "client_secret_basic", "password"),
        ("cc-post", "client_secret_post", "password"),
    ],
)
async def test_oauth_create_then_authorize_with_a_real_provider(
    client: httpx.AsyncClient, idp: AuthorizationServerThread, client_id: str, method: str, grant: str
) -> None:
    secret = idp.store.clients[client_id].client_secret
    body = payloads.client_credentials(
        token_url=idp.token_url, client_id=client_id, client_secret=secret, client_auth_method=method
    )
    if grant == "password":
        body["auth"].update(grant_type="password", username="svc-user", password="CANARY-user-pw")
    response = await create_checked(client, body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"]["state"] == "authorized"
    assert idp.request_count == 1

    answers = [await authorize(client, created["id"], path="/items") for _ in range(3)]
    assert {a.status_code for a in answers} == {200}
    tokens = {a.json()["headers"]["Authorization"] for a in answers}
    assert len(tokens) == 1
    access_token = tokens.pop().removeprefix("Bearer ")
    record = idp.store.find_access_token(access_token)
    assert record is not None
    assert record.client_id == client_id
    assert answers[0].json()["url"] == "https://api.example.com/base/items"
    assert answers[0].json()["expires_at"] is not None
    # The token from the live check served every authorize: no further token request.
    assert idp.request_count == 1


async def test_oauth_wrong_secret_is_rejected_and_saves_nothing(
    client: httpx.AsyncClient, idp: AuthorizationServerThread
) -> None:
    body = payloads.client_credentials(token_url=idp.token_url, client_id="cc-basic")
    assert_problem(await create_checked(client, body), 422, "credentials_rejected")
    assert (await client.get("/connectors")).json()["items"] == []


# OAuth 2.0 against a scripted server ------------------------------------------------------------


async def _oauth_connector(client: httpx.AsyncClient, server: ScriptedServer, **auth: Any) -> dict[str, Any]:
    body = payloads.client_credentials(token_url=server.url("/oauth/token"), **auth)
    response = await client.post("/connectors", json=body, params={"validate": "false"})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_one_token_request_for_a_cold_burst(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(counter_tokens(delay=0.2))
    created = await _oauth_connector(client, scripted_server)
    answers = await asyncio.gather(*(authorize(client, created["id"]) for _ in range(200)))
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["headers"]["Authorization"] for a in answers} == {"Bearer tok-1"}
    assert scripted_server.count == 1
    form = scripted_server.requests[0].form()
    assert form == {"grant_type": "client_credentials", "scope": "read write"}


async def test_extra_token_parameters_reach_the_provider(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(counter_tokens())
    extras = {"resource": "urn:contacts", "Tenant-Id": "t1", "x.region": "eu"}
    body = payloads.client_credentials(
        token_url=scripted_server.url("/oauth/token"),
        extra_token_params=extras,
        client_auth_method="client_secret_post",
    )
    created = await create_checked(client, body)
    assert created.status_code == 201, created.text
    answer = await authorize(client, created.json()["id"], path="/items")
    assert answer.json()["headers"]["Authorization"] == "Bearer tok-1"
    [request] = scripted_server.requests
    assert request.form() == {
        "grant_type": "client_credentials",
        "scope": "read write",
        **extras,
        "client_id": "client-1",
        "client_secret": body["auth"]["client_secret"],
    }


@pytest.fixture
async def timed(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings, client_for: ClientFor, fake_time: FakeTime
) -> httpx.AsyncClient:
    """A client on an app whose clock the test moves (``fake_time``)."""
    return client_for(app=await app_factory(unhurried(settings), Overrides(clock=fake_time)))


def unhurried(settings: Settings) -> Settings:
    """Settings for an app whose clock jumps ahead of its change follower's polls: what it holds
    is trusted for a day (the staleness limit is tested in test_follower)."""
    return settings.model_copy(update={"max_staleness_seconds": 86_400})


async def test_force_refresh_from_many_callers_makes_one_request(
    timed: httpx.AsyncClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.set_default(counter_tokens(delay=0.1))
    created = await _oauth_connector(timed, scripted_server)
    first = await authorize(timed, created["id"])
    assert first.json()["headers"]["Authorization"] == "Bearer tok-1"
    fake_time.advance(10)
    answers = await asyncio.gather(*(authorize(timed, created["id"], force_refresh=True) for _ in range(50)))
    assert {a.json()["headers"]["Authorization"] for a in answers} == {"Bearer tok-2"}
    assert scripted_server.count == 2
    # Reports arriving late, within seconds of the new token, do not throw it away.
    fake_time.advance(1)
    late = await authorize(timed, created["id"], force_refresh=True)
    assert late.json()["headers"]["Authorization"] == "Bearer tok-2"
    assert scripted_server.count == 2


async def test_a_change_makes_the_old_token_unreachable(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(counter_tokens())
    created = await _oauth_connector(client, scripted_server)
    assert (await authorize(client, created["id"])).json()["headers"]["Authorization"] == "Bearer tok-1"
    patched = await client.patch(
        f"/connectors/{created['id']}", json={"auth": {"scope": "read"}}, params={"validate": "false"}
    )
    assert patched.status_code == 200
    answer = await authorize(client, created["id"])
    assert answer.json()["headers"]["Authorization"] == "Bearer tok-2"
    assert scripted_server.requests[-1].form()["scope"] == "read"
    assert (await client.delete(f"/connectors/{created['id']}")).status_code == 204
    assert_problem(await authorize(client, created["id"]), 404, "connector_not_found")


async def test_rejection_is_sticky_and_recorded_until_validated(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(
        Reply.json({"error": "invalid_client", "error_description": canary("desc")}, status=401)
    )
    created = await _oauth_connector(client, scripted_server)
    url = f"/connectors/{created['id']}"
    problems = [await authorize(client, created["id"]) for _ in range(5)]
    for problem in problems:
        assert_problem(problem, 502, "credentials_rejected")
    assert scripted_server.count == 1
    status = await recorded_status(client, url, "rejected")
    assert CANARY not in str(status)

    scripted_server.set_default(counter_tokens())
    validated = await client.post(f"{url}/validate")
    assert validated.status_code == 200
    assert validated.json()["status"]["state"] == "authorized"
    answer = await authorize(client, created["id"])
    assert answer.json()["headers"]["Authorization"] == "Bearer tok-1"
    assert scripted_server.count == 2


async def test_validate_records_an_unreachable_provider(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply.html(503))
    created = await _oauth_connector(client, scripted_server)
    validated = await client.post(f"/connectors/{created['id']}/validate")
    assert validated.status_code == 200
    assert validated.json()["status"]["state"] == "unreachable"
    assert validated.json()["status"]["detail"] == "token_endpoint_error"
    assert validated.json()["version"] == created["version"]


async def test_provider_errors_pass_only_their_code(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(
        Reply.json({"error": "invalid_scope", "error_description": canary("scope")}, status=400)
    )
    created = await _oauth_connector(client, scripted_server)
    problem = assert_problem(await authorize(client, created["id"]), 502, "token_endpoint_error")
    assert problem["provider_error"] == "invalid_scope"


async def test_transient_failures_share_one_retry(
    client: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply.json({"error": "invalid_request"}, status=400))
    created = await _oauth_connector(client, scripted_server)
    answers = await asyncio.gather(*(authorize(client, created["id"]) for _ in range(20)))
    assert {a.status_code for a in answers} == {502}
    again = [await authorize(client, created["id"]) for _ in range(5)]
    assert {a.status_code for a in again} == {502}
    # One request for the burst; the following calls fall within the backoff.
    assert scripted_server.count == 1


async def test_token_endpoint_timeout_is_504(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
) -> None:
    app = await app_factory(settings.model_copy(update={"outbound_timeout_seconds": 0.3}))
    client = client_for(app=app)
    scripted_server.set_default(Reply(status=200, delay=2.0))
    created = await _oauth_connector(client, scripted_server)
    assert_problem(await authorize(client, created["id"]), 504, "token_endpoint_timeout")


async def test_tokens_expire_on_the_injected_clock_and_are_refreshed_ahead(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
    fake_time: FakeTime,
) -> None:
    app = await app_factory(unhurried(settings), Overrides(clock=fake_time))
    client = client_for(app=app)
    scripted_server.set_default(counter_tokens(expires_in=100))
    created = await _oauth_connector(client, scripted_server)

    async def current() -> str:
        response = await authorize(client, created["id"])
        assert response.status_code == 200, response.text
        value: str = response.json()["headers"]["Authorization"]
        return value

    assert await current() == "Bearer tok-1"
    fake_time.advance(50)
    assert await current() == "Bearer tok-1"
    assert scripted_server.count == 1
    # Past the refresh point (a 100 s token is handed out for 90 s, renewed from 70 s): the
    # caller still gets the valid token and one renewal runs in the background.
    fake_time.advance(25)
    assert await current() == "Bearer tok-1"
    # The renewal is a real HTTPS request to a server thread: wait for it, boundedly.
    for _ in range(500):
        if scripted_server.count == 2 and (await current()) == "Bearer tok-2":
            break
        await asyncio.sleep(0.01)
    assert await current() == "Bearer tok-2"
    assert scripted_server.count == 2
    # Long after every token expired, a call waits for a new one rather than get an old one.
    fake_time.advance(1000)
    assert await current() == "Bearer tok-3"


async def test_status_follows_token_requests_and_is_written_on_transitions_only(
    timed: httpx.AsyncClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.set_default(counter_tokens())
    created = await _oauth_connector(timed, scripted_server)
    assert created["status"]["state"] == "unverified"
    await authorize(timed, created["id"])
    first = await recorded_status(timed, f"/connectors/{created['id']}", "authorized")
    assert first["checked_at"] is not None
    fake_time.advance(10)
    await authorize(timed, created["id"], force_refresh=True)
    # A second success is no transition: the recorded check is not rewritten.
    assert (await timed.get(f"/connectors/{created['id']}")).json()["status"] == first
    assert scripted_server.count == 2


async def test_non_global_destinations_are_refused_at_save_and_at_connection_time(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    client: httpx.AsyncClient,
    scripted_server: ScriptedServer,
) -> None:
    scripted_server.set_default(counter_tokens())
    strict = await app_factory(settings.model_copy(update={"allow_private_destinations": False}))
    strict_client = client_for(app=strict)
    body = payloads.client_credentials(token_url=scripted_server.url("/oauth/token"))
    refused = await strict_client.post("/connectors", json=body, params={"validate": "false"})
    assert_problem(refused, 422, "destination_not_allowed")
    # Saved where loopback is allowed, the same connector is refused when this instance
    # connects: the address is checked at connection time, too.
    created = await _oauth_connector(client, scripted_server)
    assert_problem(await authorize(strict_client, created["id"]), 502, "destination_not_allowed")
    assert scripted_server.count == 0


async def test_password_grant_renews_with_the_refresh_token_of_a_real_provider(
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    client_for: ClientFor,
    idp: AuthorizationServerThread,
    fake_time: FakeTime,
) -> None:
    app = await app_factory(unhurried(settings), Overrides(clock=fake_time))
    client = client_for(app=app)
    body = payloads.password_grant(
        token_url=idp.token_url, client_id="cc-basic", client_secret="CANARY-cc-secret"
    )
    body["auth"]["password"] = "CANARY-user-pw"
    created = (await client.post("/connectors", json=body)).json()
    first = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    assert idp.request_count == 1
    # Far past the token's life on the service's clock: the next call needs a new token,
    # which the service gets with the refresh token, not with the password again.
    fake_time.advance(7200)
    second = (await authorize(client, created["id"])).json()["headers"]["Authorization"]
    assert second != first
    assert idp.request_count == 2
    records = idp.store.tokens
    assert len(records) == 2
    assert records[0].revoked, "the provider rotated the refresh token it was sent"
    assert records[1].user == "svc-user"
    assert idp.store.find_access_token(second.removeprefix("Bearer ")) is records[1]


# The other paths: tests/unit/test_url_rules.py.
@pytest.mark.parametrize(("path", "url"), [("items/7", "https://api.example.com/base/items/7"), ("//", None)])
async def test_paths_join_as_an_http_client_would(
    client: httpx.AsyncClient, path: str, url: str | None
) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = "https://api.example.com/base"
    created = (await client.post("/connectors", json=body, params={"validate": "false"})).json()
    response = await authorize(client, created["id"], path=path)
    if url is None:
        assert_problem(response, 422, "path_outside_resource_domain")
    else:
        assert response.json()["url"] == url
