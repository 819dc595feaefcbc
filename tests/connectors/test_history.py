"""The audit trail through the real app, on SQLite and PostgreSQL: what is recorded, and what never is."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.audit.repository import AuditRepository
from app.core.auth import mint_token
from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.main import Overrides
from app.rotation import rotate
from tests.conftest import ALL_SCOPES, CANARY, canary
from tests.connectors import payloads
from tests.connectors.test_crud import NO_CHECK, anonymized, assert_problem, create
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
ClientAs = Callable[..., httpx.AsyncClient]
MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def client_as(client_for: ClientFor, settings: Settings) -> ClientAs:
    """``client_as(subject, org)``: a client whose caller token names that subject (``sub``)."""

    def make(subject: str, org: str = "org-a", *, app: Any = None) -> httpx.AsyncClient:
        client = client_for(org) if app is None else client_for(org, app=app)
        token = mint_token(settings, organization_id=org, scopes=ALL_SCOPES, subject=subject)
        client.headers["Authorization"] = f"Bearer {token}"
        return client

    return make


async def history(client: httpx.AsyncClient, connector_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/connectors/{connector_id}/history", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def summary(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(item["action"], item["outcome"]) for item in items]


async def stored_events(database_url: str) -> list[AuditEvent]:
    db = Database(build_engine(database_url))
    try:
        async with db.read() as session:
            return list((await session.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars())
    finally:
        await db.dispose()


async def table_text(database_url: str) -> str:
    """Every column of every stored event, as text."""
    db = Database(build_engine(database_url))
    try:
        async with db.read() as session:
            rows = (await session.execute(select(AuditEvent.__table__))).all()
    finally:
        await db.dispose()
    return repr([tuple(row) for row in rows])


# What each action records -------------------------------------------------------------------------


async def test_create_records_the_fields_set_and_the_caller(client_as: ClientAs) -> None:
    alice = client_as("alice@example.com")
    created = await create(alice, payloads.basic())
    (event,) = await history(alice, created["id"])
    assert event == {
        "action": "create",
        "actor": "alice@example.com",
        "changed_fields": [
            "name",
            "resource_domain_url",
            "auth.type",
            "auth.username",
            "auth.password",
            "auth.validation_url",
        ],
        "outcome": "succeeded",
        "detail": None,
        "created_at": event["created_at"],
    }
    assert datetime.fromisoformat(event["created_at"]) == datetime.fromisoformat(created["created_at"])


async def test_update_lists_only_the_fields_that_changed(client_as: ClientAs) -> None:
    alice, bob = client_as("alice"), client_as("bob")
    created = await create(alice, payloads.client_credentials())
    url = f"/connectors/{created['id']}"
    body = {
        "name": "Renamed",
        "auth": {
            "token_url": "https://idp.example.com/oauth/token",
            "client_secret": canary("new"),
            "scope": "read write",  # the value it already has
        },
    }
    response = await bob.patch(url, json=body, params=NO_CHECK)
    assert response.status_code == 200, response.text
    update, first = await history(alice, created["id"])
    assert (update["action"], update["actor"], update["outcome"]) == ("update", "bob", "succeeded")
    assert update["changed_fields"] == ["name", "auth.token_url", "auth.client_secret"]
    assert first["action"] == "create"


async def test_a_new_secret_alone_is_listed(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.password_grant())
    response = await client.patch(
        f"/connectors/{created['id']}", json={"auth": {"password": canary("pw2")}}, params=NO_CHECK
    )
    assert response.status_code == 200, response.text
    assert (await history(client, created["id"]))[0]["changed_fields"] == ["auth.password"]


async def test_a_change_of_kind_lists_old_and_new_fields(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic())
    response = await client.patch(
        f"/connectors/{created['id']}", json={"auth": payloads.client_credentials()["auth"]}, params=NO_CHECK
    )
    assert response.status_code == 200, response.text
    changed = (await history(client, created["id"]))[0]["changed_fields"]
    assert {
        "auth.type",
        "auth.grant_type",
        "auth.username",
        "auth.password",
        "auth.validation_url",
        "auth.client_id",
        "auth.client_secret",
        "auth.token_url",
        "auth.scope",
    } <= set(changed)
    assert "auth.extra_token_params" not in changed  # still empty
    assert "name" not in changed and "resource_domain_url" not in changed


async def test_a_patch_that_changes_nothing_records_nothing(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic(name="Same"))
    response = await client.patch(f"/connectors/{created['id']}", json={"name": "Same"})
    assert response.json()["version"] == 1
    assert summary(await history(client, created["id"])) == [("create", "succeeded")]


async def test_delete_is_recorded_and_the_history_outlives_the_connector(client_as: ClientAs) -> None:
    alice = client_as("alice")
    created = await create(alice, payloads.basic())
    assert (await client_as("carol").delete(f"/connectors/{created['id']}")).status_code == 204
    assert_problem(await alice.get(f"/connectors/{created['id']}"), 404, "connector_not_found")
    deleted, first = await history(alice, created["id"])
    assert (deleted["action"], deleted["actor"], deleted["outcome"]) == ("delete", "carol", "succeeded")
    assert deleted["changed_fields"] == []
    assert first["action"] == "create"


async def test_validate_records_the_resulting_state(
    client_as: ClientAs,
    scripted_server: ScriptedServer,
    app_factory: Callable[..., Awaitable[Any]],
    settings: Settings,
    fake_time: FakeTime,
) -> None:
    app = await app_factory(
        settings.model_copy(update={"max_staleness_seconds": 86_400}), Overrides(clock=fake_time)
    )
    alice = client_as("alice", app=app)
    created = await create(alice, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    url = f"/connectors/{created['id']}/validate"
    scripted_server.set_default(Reply(status=204))
    assert (await alice.post(url)).json()["status"]["state"] == "authorized"
    # A validate answered from the last check, within the interval, records nothing.
    assert "retry-after" in (await alice.post(url)).headers
    fake_time.advance(settings.validate_interval_seconds)
    scripted_server.set_default(Reply(status=401))
    assert (await alice.post(url)).json()["status"]["state"] == "rejected"
    fake_time.advance(settings.validate_interval_seconds)
    scripted_server.set_default(Reply.html(503))
    assert (await alice.post(url)).json()["status"]["state"] == "unreachable"
    events = await history(alice, created["id"])
    assert [(e["action"], e["outcome"], e["detail"]) for e in events] == [
        ("validate", "unreachable", "upstream_unreachable"),
        ("validate", "rejected", "credentials_rejected"),
        ("validate", "authorized", None),
        ("create", "succeeded", None),
    ]
    assert all(e["actor"] == "alice" and e["changed_fields"] == [] for e in events[:3])


async def test_events_come_newest_first_and_limit_keeps_the_newest(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic(name="n0"))
    for i in range(1, 5):
        response = await client.patch(f"/connectors/{created['id']}", json={"name": f"n{i}"})
        assert response.status_code == 200, response.text
    events = await history(client, created["id"])
    assert [e["action"] for e in events] == ["update"] * 4 + ["create"]
    times = [datetime.fromisoformat(e["created_at"]) for e in events]
    assert times == sorted(times, reverse=True)
    assert await history(client, created["id"], limit=2) == events[:2]
    response = await client.get(f"/connectors/{created['id']}/history", params={"limit": 0})
    assert_problem(response, 422, "invalid_request")


# Refused attempts ---------------------------------------------------------------------------------


async def test_rejected_credentials_on_update_are_recorded_and_change_nothing(
    client_as: ClientAs, scripted_server: ScriptedServer
) -> None:
    alice = client_as("alice")
    created = await create(alice, payloads.basic(validation_url=scripted_server.url("/auth/check")))
    url = f"/connectors/{created['id']}"
    scripted_server.set_default(Reply(status=401))
    response = await client_as("mallory").patch(
        url, json={"name": "Hijacked", "auth": {"password": canary("wrong")}}
    )
    assert_problem(response, 422, "credentials_rejected")
    assert scripted_server.count == 1
    assert (await alice.get(url)).json() == created
    refused, first = await history(alice, created["id"])
    assert refused == {
        "action": "update",
        "actor": "mallory",
        "changed_fields": ["name", "auth.password"],
        "outcome": "credentials_rejected",
        "detail": None,
        "created_at": refused["created_at"],
    }
    assert first["action"] == "create"


async def test_refusals_record_their_code(client: httpx.AsyncClient) -> None:
    await create(client, payloads.client_credentials(name="Taken"))
    created = await create(client, payloads.client_credentials(name="Mine"))
    url = f"/connectors/{created['id']}"
    stale = {"If-Match": '"7"'}
    assert_problem(await client.patch(url, json={"name": "x"}, headers=stale), 412, "version_mismatch")
    assert_problem(await client.delete(url, headers=stale), 412, "version_mismatch")
    assert_problem(await client.patch(url, json={"name": "taken"}), 409, "name_taken")
    moved = {"auth": {"token_url": "https://elsewhere.example.com/token"}}
    assert_problem(await client.patch(url, json=moved, params=NO_CHECK), 422, "secret_required")
    assert (await client.get(url)).json() == created
    events = await history(client, created["id"])
    assert [(e["action"], e["outcome"], e["changed_fields"]) for e in events] == [
        ("update", "secret_required", ["auth.token_url"]),
        ("update", "name_taken", ["name"]),
        ("delete", "version_mismatch", []),
        ("update", "version_mismatch", ["name"]),
        ("create", "succeeded", events[-1]["changed_fields"]),
    ]


async def test_a_failed_attempt_on_a_missing_connector_records_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    assert_problem(
        await client.patch(f"/connectors/{MISSING}", json={"name": "x"}), 404, "connector_not_found"
    )
    assert_problem(await client.delete(f"/connectors/{MISSING}"), 404, "connector_not_found")
    assert await stored_events(database_url) == []


# One transaction --------------------------------------------------------------------------------


async def test_a_change_whose_event_cannot_be_written_is_rolled_back(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(client, payloads.basic(name="Before"))
    url = f"/connectors/{created['id']}"

    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the audit table is unavailable")

    with monkeypatch.context() as patched:
        patched.setattr(AuditRepository, "record", broken)
        assert_problem(await client.patch(url, json={"name": "After"}), 500, "internal_error")
        assert_problem(await client.delete(url), 500, "internal_error")
        # A refusal is still answered as such when its event cannot be written.
        assert_problem(await client.delete(url, headers={"If-Match": '"9"'}), 412, "version_mismatch")
    assert (await client.get(url)).json() == created
    assert summary(await history(client, created["id"])) == [("create", "succeeded")]


# Never a value ----------------------------------------------------------------------------------


async def test_no_value_is_ever_stored_or_answered(
    client: httpx.AsyncClient, database_url: str, scripted_server: ScriptedServer
) -> None:
    body = payloads.password_grant(
        name="Plain name", token_url=scripted_server.url("/token"), audience="plain-audience"
    )
    created = await create(client, body)
    url = f"/connectors/{created['id']}"
    patch = {
        "name": "Other plain name",
        "resource_domain_url": "https://moved.example.com",
        "auth": {"client_secret": canary("c2"), "password": canary("p2"), "username": "plain-user"},
    }
    assert (await client.patch(url, json=patch, params=NO_CHECK)).status_code == 200
    scripted_server.set_default(Reply.json({"error": "invalid_grant", "error_description": canary()}, 400))
    assert (await client.post(f"{url}/validate")).status_code == 200
    assert (await client.delete(url)).status_code == 204
    response = await client.get(f"{url}/history")
    assert len(response.json()["items"]) == 4
    dump = await table_text(database_url)
    assert "auth.client_secret" in dump  # the field's name is recorded
    for text in (response.text, dump):
        assert CANARY not in text
        for value in ("Plain name", "Other plain name", "moved.example.com", "plain-user", "plain-audience"):
            assert value not in text


# Tenancy ------------------------------------------------------------------------------------------


async def test_another_organizations_history_is_indistinguishable_from_missing(
    client_for: ClientFor,
) -> None:
    owner, stranger = client_for("org-a"), client_for("org-b")
    kept = await create(owner, payloads.basic(name="kept"))
    gone = await create(owner, payloads.basic(name="gone"))
    assert (await owner.delete(f"/connectors/{gone['id']}")).status_code == 204
    absent = await stranger.get(f"/connectors/{MISSING}/history")
    malformed = await stranger.get("/connectors/not-a-uuid/history")
    assert_problem(absent, 404, "connector_not_found")
    for connector in (kept, gone):
        theirs = await stranger.get(f"/connectors/{connector['id']}/history")
        assert theirs.status_code == absent.status_code == malformed.status_code == 404
        assert anonymized(theirs) == anonymized(absent) == anonymized(malformed)
        assert theirs.headers["content-type"] == absent.headers["content-type"]
        assert len(await history(owner, connector["id"])) >= 1


async def test_an_existing_connector_without_events_has_an_empty_history(
    client: httpx.AsyncClient, database_url: str
) -> None:
    # As a connector created before the audit trail existed.
    created = await create(client, payloads.basic())
    db = Database(build_engine(database_url))
    try:
        async with db.write() as session:
            for event in (await session.execute(select(AuditEvent))).scalars():
                await session.delete(event)
    finally:
        await db.dispose()
    assert await history(client, created["id"]) == []


async def test_reading_the_history_needs_only_the_read_scope(
    client: httpx.AsyncClient, client_for: ClientFor
) -> None:
    created = await create(client, payloads.basic())
    reader = client_for("org-a", ("connectors:read",))
    assert summary(await history(reader, created["id"])) == [("create", "succeeded")]


# Key rotation -------------------------------------------------------------------------------------


async def test_key_rotation_records_one_event_per_rotated_connector(
    client: httpx.AsyncClient, settings: Settings, database_url: str
) -> None:
    first = await create(client, payloads.password_grant(name="one"))
    second = await create(client, payloads.basic(name="two"))
    assert settings.encryption_keys is not None
    new_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    keys = SecretStr(f"k2:{new_key},{settings.encryption_keys.get_secret_value()}")
    ring = KeyRing.from_settings(settings.model_copy(update={"encryption_keys": keys}))
    db = Database(build_engine(database_url))
    try:
        assert (await rotate(db, ring, batch_size=1)).rotated == 2
        assert (await rotate(db, ring, batch_size=1)).rotated == 0  # nothing left: no new events
    finally:
        await db.dispose()
    for created in (first, second):
        rotated, _ = await history(client, created["id"])
        assert rotated == {
            "action": "rotate_keys",
            "actor": "rotate-keys",
            "changed_fields": [],
            "outcome": "succeeded",
            "detail": "re-encrypted under key k2",
            "created_at": rotated["created_at"],
        }
    assert {e.connector_id for e in await stored_events(database_url) if e.action == "rotate_keys"} == {
        uuid.UUID(first["id"]),
        uuid.UUID(second["id"]),
    }
