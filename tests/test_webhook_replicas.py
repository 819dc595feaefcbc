"""Webhook delivery by two real ``serve`` processes over one PostgreSQL database.

Each delivery is attempted by one replica at a time: two replicas deliver every event once, and a
replica killed with SIGKILL while a receiver holds its request open loses nothing, since the
other replica claims the delivery once its lease has expired and sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.db import Database, build_engine
from app.webhooks.models import WebhookDelivery, WebhookEvent
from tests.conftest import _truncate_postgres, run_sync
from tests.support.service import (
    ServiceProcess,
    caller_token,
    free_port,
    migrate,
    running_service,
    service_env,
)
from tests.support.tls import LocalCA
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.postgres

# Short, so that a lease runs out quickly; long enough for a loaded machine to kill the replica
# holding a request before that replica's own attempt times out.
WEBHOOK_TIMEOUT = 3.0
LEASE = 2 * WEBHOOK_TIMEOUT + 2.0  # as app.webhooks.delivery derives it
ORG = "org-w"


@pytest.fixture
def replicas(postgres_server: str, local_ca: LocalCA, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    run_sync(_truncate_postgres(postgres_server))
    env = service_env(
        postgres_server,
        tmp_path,
        ca_bundle=str(local_ca.ca_bundle),
        max_connectors_per_org="500",
        webhook_timeout_seconds=str(WEBHOOK_TIMEOUT),
        webhook_poll_interval_seconds="0.2",
    )
    migrate(env)
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                running_service({**env, "CONNECTORS_PORT": str(free_port())}, tmp_path / f"replica-{i}.log")
            )
            for i in range(2)
        ]


@pytest.fixture
def receiver(server_tls: Any) -> Iterator[WebhookReceiver]:
    # The replicas sign with the system clock: the library's own timestamp check applies.
    with WebhookReceiver(server_tls) as server:
        yield server


def subscribe(replica: ServiceProcess, url: str) -> str:
    """A subscription of ``ORG`` to every event, made through the API; its signing secret."""
    response = httpx.post(
        f"{replica.base_url}/webhooks",
        json={"url": url},
        headers={"Authorization": f"Bearer {caller_token(replica.env, ORG)}"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["secret"])


def stored(database_url: str) -> tuple[list[str], list[WebhookDelivery]]:
    """The event ids and the deliveries in the database."""

    async def read() -> tuple[list[str], list[WebhookDelivery]]:
        db = Database(build_engine(database_url))
        try:
            async with db.read() as session:
                events = list((await session.execute(select(WebhookEvent.id))).scalars())
                deliveries = list((await session.execute(select(WebhookDelivery))).scalars())
        finally:
            await db.dispose()
        return events, deliveries

    return run_sync(read())


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


async def create_connectors(replicas: list[ServiceProcess], count: int) -> list[str]:
    """Create ``count`` connectors at once, spread over the replicas; their ids."""

    async def one(client: httpx.AsyncClient, index: int) -> str:
        service = replicas[index % len(replicas)]
        response = await client.post(
            f"{service.base_url}/connectors",
            json={
                "name": f"Connector {index}",
                "resource_domain_url": "https://api.example.com",
                "auth": {
                    "type": "basic",
                    "username": "u",
                    "password": "CANARY-webhook-replicas",
                    "validation_url": "https://api.example.com/check",
                },
            },
            params={"validate": "false"},
            headers={"Authorization": f"Bearer {caller_token(service.env, ORG)}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def connected_to(replicas: list[ServiceProcess], port: int) -> ServiceProcess | None:
    """The replica with an established TCP connection to 127.0.0.1:``port``, read from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(f"socket:[{fields[9]}]")
    for replica in replicas:
        directory = Path(f"/proc/{replica.process.pid}/fd")
        for fd in directory.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return replica
    return None


def succeeded_metric(replica: ServiceProcess) -> float:
    lines = httpx.get(f"{replica.base_url}/metrics").text.splitlines()
    prefix = 'connectors_webhook_delivery_attempts_total{result="succeeded"} '
    return sum(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))


def test_two_replicas_deliver_each_event_once(
    replicas: list[ServiceProcess], receiver: WebhookReceiver, postgres_server: str
) -> None:
    secret = subscribe(replicas[0], receiver.url("/hooks"))
    receiver.trust("/hooks", secret)

    count = 24
    created = asyncio.run(create_connectors(replicas, count))

    def all_delivered() -> bool:
        _, deliveries = stored(postgres_server)
        return len(deliveries) == count and all(d.state == "succeeded" for d in deliveries)

    wait_for(all_delivered, 30, "the delivery of every event")
    events, deliveries = stored(postgres_server)
    assert [d.attempts for d in deliveries] == [1] * count
    requests = receiver.requests
    assert len(requests) == count, "no event was sent twice"
    assert sorted(r.webhook_id for r in requests) == sorted(events)
    assert all(r.accepted for r in requests), "every request carried a valid signature"
    assert sorted(r.event["data"]["connector_id"] for r in requests) == sorted(created)
    # Counted just after the record is committed.
    wait_for(lambda: sum(succeeded_metric(r) for r in replicas) == count, 5, "the count of every delivery")
    print(f"deliveries by replica: {[succeeded_metric(replica) for replica in replicas]}")


def test_a_replica_killed_while_delivering_loses_nothing(
    replicas: list[ServiceProcess], receiver: WebhookReceiver, postgres_server: str
) -> None:
    secret = subscribe(replicas[0], receiver.url("/hooks"))
    receiver.trust("/hooks", secret)
    receiver.hold()

    [connector_id] = asyncio.run(create_connectors(replicas[:1], 1))
    wait_for(lambda: receiver.held == 1, 15, "a request held by the receiver")
    held_at = time.monotonic()
    holder = connected_to(replicas, receiver.port)
    assert holder is not None, "a replica holds the request open"
    holder.kill()
    # The held request is answered to nobody; from now on requests are answered 200.
    receiver.release()
    [survivor] = [replica for replica in replicas if replica is not holder]

    wait_for(lambda: bool(receiver.accepted()), LEASE + 15, "the delivery by the other replica")
    waited = time.monotonic() - held_at
    print(f"delivered by the surviving replica {waited:.2f} s after the other was killed")
    # Claimed by the dead replica at most WEBHOOK_TIMEOUT before it was seen holding the request.
    assert waited >= LEASE - WEBHOOK_TIMEOUT, "not before the dead replica's lease expired"
    [delivered] = receiver.accepted()
    assert delivered.event["data"]["connector_id"] == connector_id
    assert [r.held for r in receiver.requests] == [True, False]
    assert receiver.requests[0].webhook_id == delivered.webhook_id

    # Recorded once the answer is read; the dead replica's attempt never was.
    wait_for(lambda: stored(postgres_server)[1][0].state != "pending", 15, "the record of the delivery")
    [row] = stored(postgres_server)[1]
    assert (row.state, row.attempts, row.last_status_code, row.claimed_until) == ("succeeded", 1, 200, None)
    wait_for(lambda: succeeded_metric(survivor) == 1, 5, "the count of the delivery")
