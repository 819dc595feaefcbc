"""Delivering webhook events: signed, verified by a real receiver, retried on schedule, given up
on, resumed once fixed, and only to destinations the address policy allows.

The application runs on ``FakeTime``, with its delivery worker; a test moves the clock along the
retry schedule and then runs a round itself (``deliver_due``, which waits for any round under way
in the background), so what was due has been attempted when it returns. The receiver is a real
HTTPS server on 127.0.0.1 that verifies every request with the ``standardwebhooks`` library, as a
customer's would. Everything runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.main import Overrides
from app.webhooks.delivery import JITTER, MAX_ATTEMPTS, RETRY_DELAYS, DeliveryWorker, retry_delay
from app.webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription
from app.webhooks.outbox import record_event
from app.webhooks.queue import DeliveryQueue
from app.webhooks.secrets import seal_secret
from tests.conftest import CANARY
from tests.connectors import payloads
from tests.connectors.test_crud import NO_CHECK, create
from tests.support.fakes import FakeTime
from tests.support.metrics import scrape
from tests.support.servers import Reply, ScriptedServer
from tests.support.webhook_receiver import WebhookReceiver

ATTEMPTS = "connectors_webhook_delivery_attempts_total"
GAVE_UP = "connectors_webhook_deliveries_failed_total"
OLDEST = "connectors_webhook_oldest_pending_event_age_seconds"


def canary_secret() -> str:
    """A signing secret in the Standard Webhooks form that the canary guard looks for."""
    return f"whsec_{CANARY}xx" + base64.b64encode(secrets.token_bytes(30)).decode()


@pytest.fixture
def allow_private() -> bool:
    # Test servers live on 127.0.0.1; a test parametrizes this to see the refusal.
    return True


@pytest.fixture
async def app(app_factory: Any, settings: Settings, fake_time: FakeTime, allow_private: bool) -> Any:
    """The application on fake time (the only one: a second would deliver too)."""
    configured = settings.model_copy(update={"allow_private_destinations": allow_private})
    return await app_factory(configured, Overrides(clock=fake_time))


@pytest.fixture
def worker(app: Any) -> DeliveryWorker:
    deliveries: DeliveryWorker = app.state.webhook_deliveries
    return deliveries


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(build_engine(settings.effective_database_url))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def receiver(server_tls: Any, fake_time: FakeTime) -> Iterator[WebhookReceiver]:
    # The service signs with the fake time: the receiver measures the timestamp against it.
    with WebhookReceiver(server_tls, now=fake_time.now) as server:
        yield server


async def subscribe(
    db: Database,
    settings: Settings,
    url: str,
    *,
    org: str = "org-a",
    types: list[str] | None = None,
    secret: str | None = None,
    previous: str | None = None,
    previous_until: datetime | None = None,
    now: datetime,
    keyring: KeyRing | None = None,
) -> tuple[uuid.UUID, str]:
    """A subscription written as the API writes one; its id and signing secret."""
    subscription_id = uuid.uuid4()
    keyring = keyring or KeyRing.from_settings(settings)
    secret = secret or canary_secret()

    def seal(value: str) -> str:
        return seal_secret(keyring, org, subscription_id, SecretStr(value))

    async with db.write() as session:
        session.add(
            WebhookSubscription(
                id=subscription_id,
                organization_id=org,
                url=url,
                event_types=types or [],
                enabled=True,
                secret=seal(secret),
                previous_secret=seal(previous) if previous is not None else None,
                previous_secret_expires_at=previous_until,
                key_id=keyring.primary_key_id,
                state="active",
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
    return subscription_id, secret


async def deliveries(db: Database, subscription_id: uuid.UUID | None = None) -> list[WebhookDelivery]:
    async with db.read() as session:
        query = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        if subscription_id is not None:
            query = query.where(WebhookDelivery.subscription_id == subscription_id)
        return list((await session.execute(query)).scalars())


async def subscription(db: Database, subscription_id: uuid.UUID) -> WebhookSubscription:
    async with db.read() as session:
        row = await session.get(WebhookSubscription, subscription_id)
    assert row is not None
    return row


async def fix(db: Database, subscription_id: uuid.UUID, now: datetime) -> None:
    """What the API does when a failing subscription is fixed: active, and its pending due now."""
    async with db.write() as session:
        await session.execute(
            update(WebhookSubscription)
            .where(WebhookSubscription.id == subscription_id)
            .values(state="active", failing_since=None, updated_at=now)
        )
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.subscription_id == subscription_id, WebhookDelivery.state == "pending")
            .values(next_attempt_at=now)
        )


def no_canary(receiver: WebhookReceiver) -> None:
    for request in receiver.requests:
        assert CANARY not in request.body.decode() + json.dumps(request.headers)


# Signed deliveries ----------------------------------------------------------------------------


async def test_every_event_type_arrives_signed_and_verified(
    client: httpx.AsyncClient,
    app: Any,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
    scripted_server: ScriptedServer,
) -> None:
    subscription_id, secret = await subscribe(db, settings, receiver.url("/hooks"), now=fake_time.now())
    receiver.trust("/hooks", secret)
    scripted_server.set_default(Reply(status=401))

    created = await create(client, payloads.basic(validation_url=scripted_server.url("/check")))
    await worker.deliver_due()
    renamed = await client.patch(f"/connectors/{created['id']}", json={"name": "Renamed"}, params=NO_CHECK)
    assert renamed.status_code == 200, renamed.text
    await worker.deliver_due()
    checked = await client.post(f"/connectors/{created['id']}/validate")
    assert checked.json()["status"]["state"] == "rejected"
    await worker.deliver_due()
    assert (await client.delete(f"/connectors/{created['id']}")).status_code == 204
    await worker.deliver_due()

    accepted = receiver.accepted("/hooks")
    assert [r.event["type"] for r in accepted] == [
        "connector.created",
        "connector.updated",
        "connector.status_changed",
        "connector.deleted",
    ]
    assert len(receiver.requests) == 4, "each event was sent once"
    for request in accepted:
        data = request.event["data"]
        assert (data["connector_id"], data["organization_id"]) == (created["id"], "org-a")
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-timestamp"] == str(int(fake_time.now().timestamp()))
        assert request.verified_with == (secret,) and len(request.signatures) == 1
    status = accepted[2].event["data"]
    assert (status["previous_state"], status["state"], status["error_code"]) == (
        "unverified",
        "rejected",
        "credentials_rejected",
    )
    no_canary(receiver)

    # The body went out exactly as stored, under the event's id.
    async with db.read() as session:
        stored = {e.id: e.payload for e in (await session.execute(select(WebhookEvent))).scalars()}
    assert {r.webhook_id: r.body.decode() for r in accepted} == stored
    rows = await deliveries(db, subscription_id)
    assert [(d.state, d.attempts, d.last_status_code, d.last_error) for d in rows] == [
        ("succeeded", 1, 200, None)
    ] * 4
    assert all(d.claimed_until is None and d.next_attempt_at is None for d in rows)

    exposition = await scrape(app)
    assert exposition.value(ATTEMPTS, result="succeeded") == 4
    assert exposition.value(ATTEMPTS, result="failed") == 0
    assert exposition.value(OLDEST) == 0


async def test_a_receiver_that_fails_for_a_while_gets_every_event_once_it_is_back(
    client: httpx.AsyncClient,
    app: Any,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
) -> None:
    _, secret = await subscribe(db, settings, receiver.url("/hooks"), now=fake_time.now())
    receiver.trust("/hooks", secret)
    receiver.answer(500)

    made = [await create(client, payloads.basic(name=f"Connector {i}")) for i in range(3)]
    await worker.deliver_due()
    assert [r.status for r in receiver.requests] == [500] * 3
    fake_time.advance(RETRY_DELAYS[0] * (1 + JITTER))
    await worker.deliver_due()
    assert len(receiver.requests) == 6 and not receiver.accepted()

    # Then down altogether: connections are refused.
    receiver.down()
    fake_time.advance(RETRY_DELAYS[1] * (1 + JITTER))
    await worker.deliver_due()
    rows = await deliveries(db)
    assert [(d.state, d.attempts, d.last_status_code) for d in rows] == [("pending", 3, None)] * 3
    assert all((d.last_error or "").startswith("upstream_unreachable: ") for d in rows)
    exposition = await scrape(app)
    assert exposition.value(ATTEMPTS, result="failed") == 6
    assert exposition.value(ATTEMPTS, result="upstream_unreachable") == 3
    assert exposition.value(OLDEST) == pytest.approx(RETRY_DELAYS[0] * 1.2 + RETRY_DELAYS[1] * 1.2)

    # Back, and answering: the next attempt of each delivers it, once.
    receiver.up()
    receiver.answer(200)
    fake_time.advance(RETRY_DELAYS[2] * (1 + JITTER))
    await worker.deliver_due()
    fake_time.advance(86_400)
    await worker.deliver_due()

    events = receiver.events()
    assert sorted(e["data"]["connector_id"] for e in events) == sorted(m["id"] for m in made)
    assert len({r.webhook_id for r in receiver.accepted()}) == len(receiver.accepted()) == 3
    assert [(d.state, d.attempts, d.last_status_code) for d in await deliveries(db)] == [
        ("succeeded", 4, 200)
    ] * 3
    exposition = await scrape(app)
    assert exposition.value(ATTEMPTS, result="succeeded") == 3
    assert exposition.value(OLDEST) == 0
    no_canary(receiver)


async def test_retries_follow_the_schedule_then_the_subscription_fails_until_fixed(
    client: httpx.AsyncClient,
    app: Any,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    subscription_id, secret = await subscribe(db, settings, receiver.url("/hooks"), now=fake_time.now())
    receiver.trust("/hooks", secret)
    receiver.answer(503)
    await create(client, payloads.basic())
    first = fake_time.now()
    await worker.deliver_due()

    for attempt in range(1, MAX_ATTEMPTS):
        [row] = await deliveries(db, subscription_id)
        assert (row.state, row.attempts, row.last_status_code) == ("pending", attempt, 503)
        assert row.last_attempt_at is not None and row.next_attempt_at is not None
        delay = (row.next_attempt_at - row.last_attempt_at).total_seconds()
        nominal = RETRY_DELAYS[attempt - 1]
        assert nominal * (1 - JITTER) <= delay <= nominal * (1 + JITTER), (attempt, delay)
        # Not a moment before it is due.
        fake_time.advance((row.next_attempt_at - fake_time.now()).total_seconds() - 1)
        assert await worker.deliver_due() == 0
        fake_time.advance(1)
        assert await worker.deliver_due() == 1
    assert len(receiver.requests) == MAX_ATTEMPTS
    spent = fake_time.now() - first
    low = sum(RETRY_DELAYS) * (1 - JITTER)
    high = sum(RETRY_DELAYS) * (1 + JITTER)
    assert timedelta(seconds=low) <= spent <= timedelta(seconds=high)

    # The schedule is exhausted: the delivery failed, the subscription is failing.
    [row] = await deliveries(db, subscription_id)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", MAX_ATTEMPTS, None)
    failing = await subscription(db, subscription_id)
    assert (failing.state, failing.failing_since) == ("failing", fake_time.now())
    assert [r.levelname for r in caplog.records if "whole retry schedule" in r.getMessage()] == ["WARNING"]
    exposition = await scrape(app)
    assert exposition.value(ATTEMPTS, result="failed") == MAX_ATTEMPTS
    assert exposition.value(GAVE_UP) == 1

    # While failing, new events queue up but nothing is tried.
    receiver.answer(200)
    await create(client, payloads.basic(name="While failing"))
    fake_time.advance(86_400)
    assert await worker.deliver_due() == 0
    assert len(receiver.requests) == MAX_ATTEMPTS
    assert (await scrape(app)).value(OLDEST) == 0, "a failing subscription's events are not counted"

    # Fixed: its pending delivery goes out; the failed one stays failed (it can be resent).
    await fix(db, subscription_id, fake_time.now())
    assert await worker.deliver_due() == 1
    assert [e["data"]["name"] for e in receiver.events()] == ["While failing"]
    assert [d.state for d in await deliveries(db, subscription_id)] == ["failed", "succeeded"]
    assert (await subscription(db, subscription_id)).state == "active"


async def test_rotation_signs_with_both_secrets_until_the_overlap_ends(
    client: httpx.AsyncClient,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
) -> None:
    old, new = canary_secret(), canary_secret()
    overlap_ends = fake_time.now() + timedelta(hours=1)
    await subscribe(
        db,
        settings,
        receiver.url("/hooks"),
        secret=new,
        previous=old,
        previous_until=overlap_ends,
        now=fake_time.now(),
    )
    receiver.trust("/hooks", old, new)

    await create(client, payloads.basic(name="During"))
    await worker.deliver_due()
    fake_time.advance(3600)
    await create(client, payloads.basic(name="After"))
    await worker.deliver_due()

    during, after = receiver.accepted()
    assert during.event["data"]["name"] == "During"
    assert len(during.signatures) == 2
    assert set(during.verified_with) == {old, new}, "each secret alone verifies the request"
    assert after.event["data"]["name"] == "After"
    assert len(after.signatures) == 1 and after.verified_with == (new,)


async def test_an_unreadable_secret_fails_the_attempt_naming_the_key_never_the_secret(
    client: httpx.AsyncClient,
    app: Any,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Sealed under a key this service does not have (a ring configured without it).
    stranger = KeyRing([("gone", secrets.token_bytes(32))])
    subscription_id, secret = await subscribe(
        db, settings, receiver.url("/hooks"), now=fake_time.now(), keyring=stranger
    )
    receiver.trust("/hooks", secret)

    await create(client, payloads.basic())
    await worker.deliver_due()

    assert receiver.requests == []
    [row] = await deliveries(db, subscription_id)
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error == "secret_unreadable: the signing secret cannot be opened (key gone)"
    [line] = [r for r in caplog.records if r.name == "app.webhooks.delivery" and "opened" in r.getMessage()]
    assert (getattr(line, "subscription", None), getattr(line, "key_id", None)) == (
        str(subscription_id),
        "gone",
    )
    assert (await scrape(app)).value(ATTEMPTS, result="secret_unreadable") == 1


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_destination_resolving_to_a_non_global_address_is_refused_at_send_time(
    client: httpx.AsyncClient,
    app: Any,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
    allow_private: bool,
) -> None:
    # Saved while its name resolved elsewhere; "localhost" resolves to loopback now.
    subscription_id, secret = await subscribe(
        db, settings, f"https://localhost:{receiver.port}/hooks", now=fake_time.now()
    )
    receiver.trust("/hooks", secret)

    await create(client, payloads.basic(validation_url="https://api.example.com/check"))
    await worker.deliver_due()

    [row] = await deliveries(db, subscription_id)
    exposition = await scrape(app)
    if allow_private:
        assert [r.event["type"] for r in receiver.accepted()] == ["connector.created"]
        assert row.state == "succeeded"
        return
    assert receiver.requests == [], "nothing was sent"
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error == "destination_not_allowed: localhost resolves to a loopback address"
    assert exposition.value(ATTEMPTS, result="destination_not_allowed") == 1


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    client: httpx.AsyncClient,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
    scripted_server: ScriptedServer,
) -> None:
    subscription_id, _ = await subscribe(db, settings, scripted_server.url("/moved"), now=fake_time.now())
    scripted_server.set_default(Reply(status=307, headers={"Location": receiver.url("/hooks")}))

    await create(client, payloads.basic())
    await worker.deliver_due()

    [row] = await deliveries(db, subscription_id)
    assert (row.state, row.attempts, row.last_status_code, row.last_error) == (
        "pending",
        1,
        307,
        "answered 307",
    )
    assert scripted_server.count == 1 and receiver.requests == []


# The queue ------------------------------------------------------------------------------------


async def test_a_claimed_delivery_is_held_by_one_claimer_until_its_lease_expires(
    db: Database, settings: Settings, fake_time: FakeTime
) -> None:
    # No application here: nothing but these claims takes the deliveries.
    await subscribe(db, settings, "https://127.0.0.1:9/hooks", now=fake_time.now())
    for i in range(5):
        async with db.write() as session:
            await record_event(session, "org-a", "connector.created", {"n": i}, at=fake_time.now())

    now = fake_time.now()
    async with db.write() as session:
        first = await DeliveryQueue(session).claim(now=now, lease_seconds=30, limit=3)
    async with db.write() as session:
        second = await DeliveryQueue(session).claim(now=now, lease_seconds=30, limit=3)
    async with db.write() as session:
        third = await DeliveryQueue(session).claim(now=now, lease_seconds=30, limit=3)
    assert (len(first), len(second), third) == (3, 2, [])
    assert not {d.id for d in first} & {d.id for d in second}

    # Recording needs the lease: a claim that outlived it records nothing.
    later = now + timedelta(seconds=31)
    async with db.write() as session:
        retaken = await DeliveryQueue(session).claim(now=later, lease_seconds=30, limit=10)
    assert {d.id for d in retaken} == {d.id for d in first + second}
    async with db.write() as session:
        stale = await DeliveryQueue(session).record(
            first[0],
            attempted_at=now,
            now=later,
            status_code=200,
            duration_ms=5,
            error=None,
            succeeded=True,
            next_attempt_at=None,
        )
    assert stale is False
    assert {d.state for d in await deliveries(db)} == {"pending"}


async def test_old_events_are_pruned_once_every_delivery_is_finished(
    client: httpx.AsyncClient,
    worker: DeliveryWorker,
    db: Database,
    settings: Settings,
    fake_time: FakeTime,
    receiver: WebhookReceiver,
) -> None:
    delivered, secret = await subscribe(db, settings, receiver.url("/ok"), now=fake_time.now())
    receiver.trust("/ok", secret)
    stuck, _ = await subscribe(db, settings, receiver.url("/unknown"), now=fake_time.now())
    await create(client, payloads.basic(name="Old"))
    await worker.deliver_due()
    fake_time.advance(settings.webhook_retention_seconds + 1)
    await create(client, payloads.basic(name="New"))
    await worker.deliver_due()

    # The old event is still pending for the second subscription (answered 400: retried).
    assert await worker.prune() == 0
    async with db.write() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.subscription_id == stuck)
            .values(state="failed", next_attempt_at=None)
        )
    assert await worker.prune() == 1

    async with db.read() as session:
        names = [
            json.loads(e.payload)["data"]["name"]
            for e in (await session.execute(select(WebhookEvent))).scalars()
        ]
    assert names == ["New"]
    assert {d.subscription_id for d in await deliveries(db)} == {delivered, stuck}
    assert len(await deliveries(db)) == 2


def test_the_schedule_spans_about_sixteen_hours_in_ten_attempts() -> None:
    assert MAX_ATTEMPTS == 10
    assert [retry_delay(n, 0.5) for n in range(1, MAX_ATTEMPTS)] == list(RETRY_DELAYS)
    assert retry_delay(1, 0.0) == pytest.approx(4.0) and retry_delay(1, 0.9999) == pytest.approx(
        6.0, rel=1e-3
    )
    assert retry_delay(MAX_ATTEMPTS, 0.5) is None and retry_delay(0, 0.5) is None
    assert 15 * 3600 < sum(RETRY_DELAYS) < 16 * 3600
