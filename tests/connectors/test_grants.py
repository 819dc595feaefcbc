"""Renewals of authorization code grants (``GrantKeeper``) over the real database, driven
directly: two keepers stand for two replicas, and ``send`` for the provider, which rotates the
refresh token on every renewal and refuses a used one."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from app.connectors.grants import GrantRepository, seal_grant
from app.connectors.renewals import GrantKeeper
from app.connectors.sealing import SecretSealer
from app.connectors.service import ConnectorService
from app.core.db import Database
from app.core.errors import ConsentRequired, DatabaseUnavailable, UpstreamUnreachable
from app.tokens.types import RefreshTokenRejected, TokenGrant
from tests.connectors import payloads


class Provider:
    """Rotates refresh tokens; a used or unknown one is refused (``invalid_grant``)."""

    def __init__(self, first: str) -> None:
        self.valid = {first}
        self.sent: list[str] = []

    async def send(self, refresh_token: str) -> TokenGrant:
        self.sent.append(refresh_token)
        await asyncio.sleep(0.01)  # the provider's answer takes a moment: renewals overlap
        if refresh_token not in self.valid:
            raise RefreshTokenRejected("invalid_grant")
        self.valid.discard(refresh_token)
        rotated = secrets.token_urlsafe(16)
        self.valid.add(rotated)
        return TokenGrant(access_token=secrets.token_urlsafe(16), expires_in=60, refresh_token=rotated)


class SwitchableDatabase:
    """The real database, or, while ``away``, one whose writes fail as an unreachable one's do."""

    def __init__(self, real: Database) -> None:
        self.real = real
        self.away = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        if self.away:
            raise DatabaseUnavailable()
        async with self.real.write() as session:
            yield session


async def connected(
    client: httpx.AsyncClient, app: Any, refresh_token: str
) -> tuple[uuid.UUID, ConnectorService]:
    """An authorization code connector with a grant holding ``refresh_token``."""
    created = await client.post("/connectors", json=payloads.authorization_code())
    assert created.status_code == 201, created.text
    connector_id = uuid.UUID(created.json()["id"])
    service: ConnectorService = app.state.connectors
    answer = TokenGrant(access_token="a", expires_in=60, refresh_token=refresh_token)
    grant = seal_grant(service.sealer, "org-a", connector_id, answer, scope=None, now=service.clock.now())
    async with service.db.write() as session:
        await GrantRepository(session).replace(grant)
    return connector_id, service


def keeper(service: ConnectorService, db: Any = None, **options: Any) -> GrantKeeper:
    return GrantKeeper(
        db or service.db, SecretSealer(service.keyring), service.clock, poll_seconds=0.005, **options
    )


async def test_two_replicas_renewing_at_once_never_send_one_refresh_token_twice(
    client: httpx.AsyncClient, app: Any
) -> None:
    provider = Provider("r0")
    connector_id, service = await connected(client, app, "r0")
    replicas = [keeper(service), keeper(service)]
    for _ in range(5):
        answers = await asyncio.gather(
            *(replica.renew("org-a", connector_id, provider.send) for replica in replicas for _ in range(3))
        )
        assert all(answer.refresh_token is None for answer in answers)  # the cache never holds one
    assert len(provider.sent) == len(set(provider.sent)) == 30
    assert "r0" in provider.sent


async def test_a_refused_renewal_of_a_grant_replaced_meanwhile_does_not_end_the_new_one(
    client: httpx.AsyncClient, app: Any
) -> None:
    connector_id, service = await connected(client, app, "old")
    replaced = TokenGrant(access_token="b", expires_in=60, refresh_token="new")

    async def reconnect_then_refuse(refresh_token: str) -> TokenGrant:
        # An admin reconnects while the old grant's renewal waits on the provider.
        grant = seal_grant(
            service.sealer, "org-a", connector_id, replaced, scope=None, now=service.clock.now()
        )
        async with service.db.write() as session:
            await GrantRepository(session).replace(grant)
        raise RefreshTokenRejected("invalid_grant")

    with pytest.raises(UpstreamUnreachable):
        await keeper(service).renew("org-a", connector_id, reconnect_then_refuse)
    provider = Provider("new")
    assert (await keeper(service).renew("org-a", connector_id, provider.send)).access_token
    assert provider.sent == ["new"]
    # The old grant, refused on its own, ends: consent is needed.
    with pytest.raises(ConsentRequired):
        await keeper(service).renew("org-a", connector_id, Provider("other").send)


async def test_a_rotated_token_the_database_would_not_take_is_written_when_it_answers(
    client: httpx.AsyncClient, app: Any
) -> None:
    provider = Provider("r0")
    connector_id, service = await connected(client, app, "r0")
    db = SwitchableDatabase(service.db)
    resume = asyncio.Event()

    async def wait(_seconds: float) -> None:
        await resume.wait()

    renewing = keeper(service, db, sleep=wait)

    async def answer_then_go_away(refresh_token: str) -> TokenGrant:
        answer = await provider.send(refresh_token)
        db.away = True  # gone between the provider's answer and the write
        return answer

    assert (await renewing.renew("org-a", connector_id, answer_then_go_away)).access_token
    rotated = next(iter(provider.valid))
    db.away = False
    resume.set()
    await renewing.aclose()
    async with service.db.read() as session:
        grant = await GrantRepository(session).get("org-a", connector_id)
    assert grant is not None and grant.generation == 2 and grant.lease_owner is None
    opened = service.sealer.open("org-a", connector_id, {"refresh_token": grant.refresh_token or ""})
    assert opened["refresh_token"].get_secret_value() == rotated
    # And the next renewal, anywhere, sends that one.
    await keeper(service).renew("org-a", connector_id, provider.send)
    assert provider.sent == ["r0", rotated]
