"""Renewing authorization code connectors' tokens from the grants admins gave them.

A grant's refresh token is the one durable credential of such a connector: the provider may
rotate it on every renewal, and a rotated token that is lost (or one sent twice, where a provider
revokes the whole grant on reuse) leaves the connector waiting for an admin. So:

* **One renewal at a time, across replicas.** A renewal first takes the grant's lease (a
  conditional UPDATE, free or expired only), sends the refresh token it then reads, writes what
  the answer brought and frees the lease, each a short transaction of its own: no transaction is
  held open across the provider's answer. A renewal that finds the lease taken waits for it, then
  renews with the token the holder wrote.
* **A rotated token is written before the access token is handed out;** if the database cannot
  take it, this process keeps it, holds the lease, and keeps trying to write it within the lease
  (and sends it at its next renewal).
* **A refused refresh token ends the grant** (``invalid_grant``): it is dropped, and the connector
  is ``consent_required`` (the token cache reports it). A grant without a refresh token lasts as
  long as its access token, which is then kept (sealed) so that every replica can hand it out.

What is stored of a grant is ``app.connectors.grants``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from pydantic import SecretStr

from app.connectors.grants import GrantRepository
from app.connectors.models import ConnectorGrant
from app.connectors.sealing import SecretSealer
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import ConsentRequired, DatabaseUnavailable, UpstreamUnreachable
from app.tokens.types import RefreshSender, RefreshTokenRejected, TokenGrant

__all__ = ["GrantKeeper"]

log = logging.getLogger(__name__)

# A renewal holds the lease at most this long (far beyond the outbound deadline): a replica that
# died holding it delays the others by this much.
LEASE_SECONDS = 60.0
# How long a stopping process still tries to write rotated refresh tokens.
CLOSE_WRITES_SECONDS = 5.0
# How often a renewal waiting for another's lease looks again.
LEASE_POLL_SECONDS = 0.1


class GrantKeeper:
    """Renews authorization code connectors' tokens from their stored grants (one per process).

    ``stored(organization_id, connector_id)`` is the ``StoredGrant`` a token configuration
    carries; see the module docstring for the rules.
    """

    def __init__(
        self,
        db: Database,
        sealer: SecretSealer,
        clock: Clock,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = LEASE_POLL_SECONDS,
    ) -> None:
        self._db = db
        self._sealer = sealer
        self._clock = clock
        self._sleep = sleep
        self._lease = lease_seconds
        self._poll = poll_seconds
        self._owner = secrets.token_hex(8)
        # Rotated refresh tokens the database could not take: (generation, token), sent next.
        self._unsaved: dict[uuid.UUID, tuple[int, str]] = {}
        # Renewals under way, and rotated refresh tokens still being written.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.Task[None]] = set()

    def stored(self, organization_id: str, connector_id: uuid.UUID) -> _StoredGrant:
        return _StoredGrant(self, organization_id, connector_id)

    def forget(self, connector_id: uuid.UUID) -> None:
        """The grant was replaced or dropped: a token kept for it is worthless."""
        self._unsaved.pop(connector_id, None)

    async def renew(self, organization_id: str, connector_id: uuid.UUID, send: RefreshSender) -> TokenGrant:
        owner = f"{self._owner}:{secrets.token_hex(4)}"
        grant = await self._lease_grant(organization_id, connector_id, owner)
        # From the lease on, the renewal finishes even if its caller stops waiting (a shutdown, a
        # change of the connector): a refresh token the provider rotated is written, not dropped.
        task = asyncio.create_task(
            self._renew_under_lease(grant, owner, send), name=f"grant renewal {connector_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Wait for renewals under way (each bounded by the outbound deadline), then for rotated
        refresh tokens still being written, at most ``CLOSE_WRITES_SECONDS``; a token still
        unwritten then is logged as lost."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._writers:
            await asyncio.wait(list(self._writers), timeout=CLOSE_WRITES_SECONDS)
        for task in list(self._writers):
            task.cancel()
        await asyncio.gather(*list(self._writers), return_exceptions=True)

    async def _renew_under_lease(self, grant: ConnectorGrant, owner: str, send: RefreshSender) -> TokenGrant:
        held = False
        try:
            answer, held = await self._renew_leased(grant, owner, send)
            return answer
        finally:
            if not held:
                # Freed by the write of the outcome; freed here when no outcome was written.
                with contextlib.suppress(DatabaseUnavailable):  # else it expires by itself
                    async with self._db.write() as session:
                        await GrantRepository(session).finish_lease(grant.connector_id, owner)

    async def _lease_grant(self, organization_id: str, connector_id: uuid.UUID, owner: str) -> ConnectorGrant:
        deadline = self._clock.monotonic() + self._lease
        while True:
            now = self._clock.now()
            async with self._db.write() as session:
                repo = GrantRepository(session)
                # The lease first, then the row: read after the UPDATE that took the lease, it is
                # the one the last holder wrote (read before, it could be older than the lease).
                if await repo.take_lease(connector_id, owner, now, now + timedelta(seconds=self._lease)):
                    grant = await repo.get(organization_id, connector_id)
                    if grant is None:
                        raise ConsentRequired()
                    session.expunge(grant)
                    return grant
                if await repo.get(organization_id, connector_id) is None:
                    raise ConsentRequired()
            if self._clock.monotonic() >= deadline:
                raise UpstreamUnreachable("another renewal of the connector's grant did not finish")
            await self._sleep(self._poll)

    async def _renew_leased(
        self, grant: ConnectorGrant, owner: str, send: RefreshSender
    ) -> tuple[TokenGrant, bool]:
        """The renewal's answer, and whether the lease stays held (a rotated refresh token is
        still being written: nobody else may send the stored one meanwhile)."""
        org, connector_id = grant.organization_id, grant.connector_id
        unsaved = self._unsaved.get(connector_id)
        if unsaved is not None and unsaved[0] == grant.generation:
            refresh_token: str | None = unsaved[1]
        else:
            self._unsaved.pop(connector_id, None)
            unsaved = None
            refresh_token = self._open(org, connector_id, "refresh_token", grant.refresh_token)
        if refresh_token is None:
            return self._kept_access_token(grant), False
        try:
            answer = await send(refresh_token)
        except RefreshTokenRejected:
            log.info("the provider refused the grant's refresh token", extra={"connector": str(connector_id)})
            if await self._end(grant, owner):
                raise ConsentRequired() from None
            # The grant was replaced meanwhile (an admin reconnected): the refusal was of the old.
            raise UpstreamUnreachable("the connector's grant changed during its renewal") from None
        rotated = answer.refresh_token
        held = False
        if rotated is not None and rotated != refresh_token:
            held = not await self._write_rotation(grant, owner, rotated)
        elif unsaved is not None:
            held = not await self._write_rotation(grant, owner, refresh_token)
        return dataclasses.replace(answer, refresh_token=None), held

    def _kept_access_token(self, grant: ConnectorGrant) -> TokenGrant:
        """A grant without a refresh token: its access token, while it lasts."""
        access = self._open(grant.organization_id, grant.connector_id, "access_token", grant.access_token)
        if access is None or grant.access_expires_at is None:
            raise ConsentRequired()
        left = (grant.access_expires_at - self._clock.now()).total_seconds()
        if left <= 0:
            raise ConsentRequired()
        return TokenGrant(access_token=access, expires_in=left)

    async def _write_rotation(self, grant: ConnectorGrant, owner: str, refresh_token: str) -> bool:
        """Write a rotated refresh token and free the lease; False when the database did not
        answer: then this process keeps the token, sends it next, and keeps trying to write it
        (holding the lease, so no replica sends the stored one) until written or the lease ends."""
        try:
            await self._store_rotation(grant, owner, refresh_token)
        except DatabaseUnavailable:
            self._unsaved[grant.connector_id] = (grant.generation, refresh_token)
            log.warning(
                "a rotated refresh token could not be written yet",
                extra={"connector": str(grant.connector_id)},
            )
            task = asyncio.create_task(self._keep_writing(grant, owner, refresh_token))
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)
            return False
        return True

    async def _store_rotation(self, grant: ConnectorGrant, owner: str, refresh_token: str) -> None:
        sealed = self._sealer.seal(
            grant.organization_id, grant.connector_id, {"refresh_token": SecretStr(refresh_token)}
        )["refresh_token"]
        async with self._db.write() as session:
            written = await GrantRepository(session).finish_lease(
                grant.connector_id,
                owner,
                refresh_token=sealed,
                key_id=self._sealer.keyring.primary_key_id,
                generation=grant.generation + 1,
            )
        if self._unsaved.get(grant.connector_id) == (grant.generation, refresh_token):
            del self._unsaved[grant.connector_id]
        if not written:
            log.warning(
                "a rotated refresh token was not written: the grant changed meanwhile",
                extra={"connector": str(grant.connector_id)},
            )

    async def _keep_writing(self, grant: ConnectorGrant, owner: str, refresh_token: str) -> None:
        until = self._clock.monotonic() + self._lease
        try:
            await self._write_until(grant, owner, refresh_token, until)
        except asyncio.CancelledError:
            log.error(
                "a rotated refresh token was not written before the process stopped",
                extra={"connector": str(grant.connector_id)},
            )
            raise

    async def _write_until(self, grant: ConnectorGrant, owner: str, refresh_token: str, until: float) -> None:
        # Once a second, and at most as many times as the lease has seconds.
        for _ in range(max(1, int(self._lease))):
            if self._clock.monotonic() >= until:
                break
            await self._sleep(1.0)
            if self._unsaved.get(grant.connector_id) != (grant.generation, refresh_token):
                return  # sent (and written) by a later renewal here, or the grant was replaced
            try:
                await self._store_rotation(grant, owner, refresh_token)
            except DatabaseUnavailable:
                continue
            log.info("a rotated refresh token was written", extra={"connector": str(grant.connector_id)})
            return
        log.error(
            "a rotated refresh token could not be written within its lease: another replica may"
            " send the one stored, and the provider may then end the grant",
            extra={"connector": str(grant.connector_id)},
        )

    async def _end(self, grant: ConnectorGrant, owner: str) -> bool:
        """The provider refused the grant: drop its tokens (not the facts reads show). False when
        the grant is no longer the one leased (replaced by a reconnect)."""
        self._unsaved.pop(grant.connector_id, None)
        try:
            async with self._db.write() as session:
                return await GrantRepository(session).finish_lease(
                    grant.connector_id,
                    owner,
                    refresh_token=None,
                    access_token=None,
                    access_expires_at=None,
                    generation=grant.generation + 1,
                )
        except DatabaseUnavailable:
            log.warning("an ended grant could not be written", extra={"connector": str(grant.connector_id)})
            return True

    def _open(
        self, organization_id: str, connector_id: uuid.UUID, field: str, sealed: str | None
    ) -> str | None:
        if sealed is None:
            return None
        return self._sealer.open(organization_id, connector_id, {field: sealed})[field].get_secret_value()


@dataclasses.dataclass(frozen=True, slots=True)
class _StoredGrant:
    keeper: GrantKeeper
    organization_id: str
    connector_id: uuid.UUID

    async def renew(self, send: RefreshSender) -> TokenGrant:
        return await self.keeper.renew(self.organization_id, self.connector_id, send)
