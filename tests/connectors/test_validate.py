"""``POST /connectors/{id}/validate`` protects the provider: one live check per connector version
and interval, shared by concurrent callers and by replicas over one database.

Providers are real HTTPS servers on 127.0.0.1 (Authlib for OAuth 2.0, a scripted server as a Basic
validation URL); the apps run on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.connectors.repository import ConnectorRepository
from app.core.config import ConfigError, Settings, parse_settings
from app.core.db import Database, build_engine
from app.main import Overrides
from tests.conftest import canary
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize
from tests.connectors.test_crud import NO_CHECK, create
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
AppFactory = Callable[..., Awaitable[Any]]

CLIENT_SECRET = "CANARY-validate-client"
USER_PASSWORD = "CANARY-validate-user"


def on_fake_time(settings: Settings, **update: Any) -> Settings:
    """Settings for an app whose clock the test moves: what it holds is trusted for a day (the
    staleness limit is tested in test_follower)."""
    return settings.model_copy(update={"max_staleness_seconds": 86_400, **update})


@pytest.fixture
async def timed(
    app_factory: AppFactory, settings: Settings, client_for: ClientFor, fake_time: FakeTime
) -> httpx.AsyncClient:
    """A client on an app whose clock is ``fake_time``, with the default interval (10 s)."""
    return client_for(app=await app_factory(on_fake_time(settings), Overrides(clock=fake_time)))


@pytest.fixture
def idp(auth_server: AuthorizationServerThread) -> AuthorizationServerThread:
    auth_server.add_clients([RegisteredClient("validate-client", CLIENT_SECRET)])
    auth_server.store.add_user("svc-user", USER_PASSWORD)
    return auth_server


def oauth_body(
    idp: AuthorizationServerThread, grant: str, *, password: str = USER_PASSWORD
) -> dict[str, Any]:
    body = payloads.client_credentials(
        token_url=idp.token_url, client_id="validate-client", client_secret=CLIENT_SECRET
    )
    if grant == "password":
        body["auth"].update(grant_type="password", username="svc-user", password=password)
    return body


async def validate(client: httpx.AsyncClient, connector_id: str) -> httpx.Response:
    response = await client.post(f"/connectors/{connector_id}/validate")
    assert response.status_code == 200, response.text
    return response


async def validate_all(client: httpx.AsyncClient, connector_id: str, times: int) -> list[httpx.Response]:
    return list(await asyncio.gather(*(validate(client, connector_id) for _ in range(times))))


async def validate_events(client: httpx.AsyncClient, connector_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/connectors/{connector_id}/history")
    assert response.status_code == 200, response.text
    return [event for event in response.json()["items"] if event["action"] == "validate"]


def state_of(response: httpx.Response) -> str:
    state: str = response.json()["status"]["state"]
    return state


# Concurrent callers share one check ---------------------------------------------------------------


async def test_concurrent_validates_of_a_rejected_password_grant_make_one_request(
    timed: httpx.AsyncClient, idp: AuthorizationServerThread
) -> None:
    created = await create(timed, oauth_body(idp, "password", password="CANARY-wrong-password"))
    answers = await validate_all(timed, created["id"], 15)
    assert [state_of(answer) for answer in answers] == ["rejected"] * 15
    assert {answer.json()["status"]["detail"] for answer in answers} == {
        "credentials_rejected: invalid_grant"
    }
    assert idp.request_count == 1, "one password-grant attempt for all fifteen"
    # One check, one event; the calls that shared it or were answered from it record nothing.
    assert [event["outcome"] for event in await validate_events(timed, created["id"])] == ["rejected"]


@pytest.mark.parametrize("grant", ["client_credentials", "password"])
async def test_concurrent_validates_against_a_working_provider_make_one_request(
    timed: httpx.AsyncClient, idp: AuthorizationServerThread, grant: str
) -> None:
    created = await create(timed, oauth_body(idp, grant))
    answers = await validate_all(timed, created["id"], 20)
    assert [state_of(answer) for answer in answers] == ["authorized"] * 20
    assert idp.request_count == 1
    # The token that check obtained serves authorize: still one request.
    granted = await authorize(timed, created["id"])
    assert granted.status_code == 200, granted.text
    assert idp.request_count == 1


async def test_concurrent_basic_validates_make_one_request(
    timed: httpx.AsyncClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply(status=401))
    created = await create(timed, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    answers = await validate_all(timed, created["id"], 15)
    assert [state_of(answer) for answer in answers] == ["rejected"] * 15
    assert scripted_server.count == 1
    (check,) = scripted_server.requests
    assert (check.method, check.path) == ("GET", "/auth/check")


async def test_a_call_that_read_the_row_during_a_check_answers_that_check(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    fake_time: FakeTime,
    scripted_server: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call reads the row while a check is under way and looks for that check once it ended:
    it answers the check's outcome, not the status it read before the outcome was recorded."""
    app = await app_factory(on_fake_time(settings), Overrides(clock=fake_time))
    client = client_for(app=app)
    asked, release = threading.Event(), threading.Event()

    def held_rejection(_request: object) -> Reply:
        asked.set()
        release.wait(10)
        return Reply(status=401)

    scripted_server.set_default(held_rejection)
    created = await create(client, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    service = app.state.connectors
    read = service._read_for_validation
    late_read, go_on = asyncio.Event(), asyncio.Event()

    async def read_then_wait(organization_id: str, connector_id: uuid.UUID) -> Any:
        row = await read(organization_id, connector_id)
        if asked.is_set():  # the late call, after the check was claimed
            late_read.set()
            await go_on.wait()
        return row

    monkeypatch.setattr(service, "_read_for_validation", read_then_wait)
    try:
        first = asyncio.create_task(validate(client, created["id"]))
        assert await asyncio.to_thread(asked.wait, 10)
        late = asyncio.create_task(validate(client, created["id"]))
        await late_read.wait()
    finally:
        release.set()
    assert state_of(await first) == "rejected"
    go_on.set()
    answer = await late
    assert state_of(answer) == "rejected"
    assert answer.headers["retry-after"] == "10"
    assert scripted_server.count == 1


# One check per version and interval ---------------------------------------------------------------


async def test_oauth_repeats_within_the_interval_answer_the_last_outcome(
    timed: httpx.AsyncClient, idp: AuthorizationServerThread, fake_time: FakeTime
) -> None:
    created = await create(timed, oauth_body(idp, "password", password="CANARY-wrong-password"))
    first = await validate(timed, created["id"])
    assert state_of(first) == "rejected"
    assert "retry-after" not in first.headers, "a call that ran the check has nothing to wait for"
    assert idp.request_count == 1

    # The provider would accept now, but nothing is asked within the interval.
    idp.store.add_user("svc-user", "CANARY-wrong-password")
    fake_time.advance(4)
    repeated = await validate(timed, created["id"])
    assert idp.request_count == 1
    assert repeated.headers["retry-after"] == "6"
    assert repeated.headers["etag"] == first.headers["etag"]
    assert repeated.json() == first.json()
    fake_time.advance(5.5)
    assert (await validate(timed, created["id"])).headers["retry-after"] == "1"
    assert idp.request_count == 1

    fake_time.advance(0.5)
    again = await validate(timed, created["id"])
    assert idp.request_count == 2
    assert state_of(again) == "authorized"
    assert "retry-after" not in again.headers
    assert [event["outcome"] for event in await validate_events(timed, created["id"])] == [
        "authorized",
        "rejected",
    ]


async def test_basic_repeats_within_the_interval_make_no_request(
    timed: httpx.AsyncClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.set_default(Reply(status=204))
    created = await create(timed, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    assert state_of(await validate(timed, created["id"])) == "authorized"
    scripted_server.set_default(Reply(status=403))
    fake_time.advance(3)
    repeated = await validate_all(timed, created["id"], 5)
    assert {answer.headers["retry-after"] for answer in repeated} == {"7"}
    assert {state_of(answer) for answer in repeated} == {"authorized"}
    assert scripted_server.count == 1
    fake_time.advance(7)
    assert state_of(await validate(timed, created["id"])) == "rejected"
    assert scripted_server.count == 2


@pytest.mark.parametrize("kind", ["oauth2", "basic"])
async def test_new_credentials_allow_a_check_at_once_and_a_rename_does_not(
    timed: httpx.AsyncClient,
    idp: AuthorizationServerThread,
    scripted_server: ScriptedServer,
    kind: str,
) -> None:
    scripted_server.set_default(Reply(status=204))
    if kind == "basic":
        body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    else:
        body = oauth_body(idp, "client_credentials")

    def provider_requests() -> int:
        return scripted_server.count if kind == "basic" else idp.request_count

    created = await create(timed, body)
    url = f"/connectors/{created['id']}"
    await validate(timed, created["id"])
    assert "retry-after" in (await validate(timed, created["id"])).headers
    assert provider_requests() == 1

    # A rename is a new version with the same credentials: the last check still counts, or a
    # rename between validates would lift the limit.
    renamed = await timed.patch(url, json={"name": "Renamed"}, params=NO_CHECK)
    assert renamed.status_code == 200, renamed.text
    assert "retry-after" in (await validate(timed, created["id"])).headers
    assert provider_requests() == 1

    secret = {"password": canary("new")} if kind == "basic" else {"client_secret": canary("new")}
    patched = await timed.patch(url, json={"auth": secret}, params=NO_CHECK)
    assert patched.status_code == 200, patched.text
    checked = await validate(timed, created["id"])
    assert "retry-after" not in checked.headers
    assert checked.json()["version"] == created["version"] + 2
    assert provider_requests() == 2
    assert "retry-after" in (await validate(timed, created["id"])).headers
    assert provider_requests() == 2


async def test_the_interval_is_a_setting(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    fake_time: FakeTime,
    scripted_server: ScriptedServer,
) -> None:
    app = await app_factory(on_fake_time(settings, validate_interval_seconds=30), Overrides(clock=fake_time))
    client = client_for(app=app)
    scripted_server.set_default(Reply(status=204))
    created = await create(client, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    await validate(client, created["id"])
    fake_time.advance(12)
    assert (await validate(client, created["id"])).headers["retry-after"] == "18"
    fake_time.advance(18)
    assert "retry-after" not in (await validate(client, created["id"])).headers
    assert scripted_server.count == 2


@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_interval_must_be_positive(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^CONNECTORS_VALIDATE_INTERVAL_SECONDS: "):
        parse_settings(validate_interval_seconds=value)


# Replicas over one database -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["oauth2", "basic"])
async def test_replicas_make_one_request_between_them_within_the_interval(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    fake_time: FakeTime,
    idp: AuthorizationServerThread,
    scripted_server: ScriptedServer,
    kind: str,
) -> None:
    replicas = [
        client_for(app=await app_factory(on_fake_time(settings), Overrides(clock=fake_time)))
        for _ in range(2)
    ]
    one, two = replicas
    scripted_server.set_default(Reply(status=204))
    if kind == "basic":
        body = payloads.basic(validation_url=scripted_server.url("/auth/check"))
    else:
        body = oauth_body(idp, "password")

    def provider_requests() -> int:
        return scripted_server.count if kind == "basic" else idp.request_count

    created = await create(one, body)
    checked = await validate(one, created["id"])
    assert state_of(checked) == "authorized"
    fake_time.advance(2)
    elsewhere = await validate(two, created["id"])
    assert elsewhere.headers["retry-after"] == "8"
    assert elsewhere.json()["status"] == checked.json()["status"]
    assert provider_requests() == 1

    # Past the interval, both replicas at once: one claims the check, the other answers without.
    fake_time.advance(8)
    answers = await asyncio.gather(
        *(validate(client, created["id"]) for _ in range(10) for client in replicas)
    )
    assert provider_requests() == 2
    assert sum("retry-after" not in answer.headers for answer in answers) >= 1
    assert len(await validate_events(one, created["id"])) == 2


# The claim itself ---------------------------------------------------------------------------------


async def test_a_claim_is_granted_once_per_interval_and_version(
    client: httpx.AsyncClient, database_url: str
) -> None:
    created = await create(client, payloads.basic())
    connector_id, version = uuid.UUID(created["id"]), created["version"]
    at = datetime.now(UTC)
    db = Database(build_engine(database_url))

    async def claim(when: datetime, of_version: int = version) -> bool:
        async with db.write() as session:
            repo = ConnectorRepository(session)
            return await repo.claim_check("org-a", connector_id, of_version, at=when, interval=10)

    try:
        assert await claim(at)
        assert not await claim(at)
        assert not await claim(at + timedelta(seconds=9.9))
        assert await claim(at + timedelta(seconds=10))
        # A version the connector is not at is never claimed.
        assert not await claim(at + timedelta(seconds=60), version + 1)
    finally:
        await db.dispose()
