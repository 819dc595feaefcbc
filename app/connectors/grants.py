"""The grants admins gave authorization code connectors, and the consents under way.

A grant's refresh token is the one durable credential of such a connector: the provider may
rotate it on every renewal, and a rotated token that is lost (or one sent twice, where a provider
revokes the whole grant on reuse) leaves the connector waiting for an admin. So:

* **One renewal at a time, across replicas.** A renewal first takes the grant's lease (a
  conditional UPDATE, free or expired only), sends the refresh token it then reads, writes what
  the answer brought and frees the lease, each a short transaction of its own: no transaction is
  held open across the provider's answer. A renewal that finds the lease taken waits for it, then
  renews with the token the holder wrote.
* **A rotated token is written before the access token is handed out;** if the database cannot
  take it, this process keeps it (``GrantKeeper``) and sends that one next, writing it again.
* **A refused refresh token ends the grant** (``invalid_grant``): it is dropped, and the connector
  is ``consent_required`` (the token cache reports it). A grant without a refresh token lasts as
  long as its access token, which is then kept (sealed) so that every replica can hand it out.

Secrets here are sealed as the connector's are (``SecretSealer``, fields ``refresh_token``,
``access_token`` and ``code_verifier``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import SecretStr
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.connectors.models import ConnectorGrant, ConsentRequest
from app.connectors.sealing import SecretSealer
from app.core.clock import Clock
from app.core.crypto import DecryptionError, KeyRing, secret_aad
from app.core.db import Database
from app.core.errors import ConsentRequired, DatabaseUnavailable, UpstreamUnreachable
from app.tokens.types import RefreshSender, RefreshTokenRejected, TokenGrant

__all__ = [
    "NO_GRANT",
    "ConsentRepository",
    "GrantFacts",
    "GrantKeeper",
    "GrantRepository",
    "GrantRotation",
    "rotate_grant_keys",
    "seal_grant",
]

log = logging.getLogger(__name__)

# A renewal holds the lease at most this long (far beyond the outbound deadline): a replica that
# died holding it delays the others by this much.
LEASE_SECONDS = 60.0
# How long a stopping process still tries to write rotated refresh tokens.
CLOSE_WRITES_SECONDS = 5.0
# How often a renewal waiting for another's lease looks again.
LEASE_POLL_SECONDS = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class GrantFacts:
    """What reads show of a grant; never a token."""

    has_refresh_token: bool
    connected_at: datetime | None
    granted_scope: str | None


NO_GRANT = GrantFacts(has_refresh_token=False, connected_at=None, granted_scope=None)


class GrantRepository:
    """SQL about grants; nothing here commits."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def facts(
        self, organization_id: str, connector_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, GrantFacts]:
        ids = list(connector_ids)
        if not ids:
            return {}
        result = await self.session.execute(
            select(
                ConnectorGrant.connector_id,
                ConnectorGrant.refresh_token,
                ConnectorGrant.connected_at,
                ConnectorGrant.granted_scope,
            ).where(ConnectorGrant.organization_id == organization_id, ConnectorGrant.connector_id.in_(ids))
        )
        return {
            row.connector_id: GrantFacts(row.refresh_token is not None, row.connected_at, row.granted_scope)
            for row in result
        }

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> ConnectorGrant | None:
        result = await self.session.execute(
            select(ConnectorGrant).where(
                ConnectorGrant.organization_id == organization_id, ConnectorGrant.connector_id == connector_id
            )
        )
        return result.scalar_one_or_none()

    async def replace(self, grant: ConnectorGrant) -> None:
        """Put ``grant`` in place of the connector's grant (a reconnect); its generation follows
        the old one's, so a renewal of the old grant cannot write over it."""
        old = await self.get(grant.organization_id, grant.connector_id)
        grant.generation = (old.generation + 1) if old is not None else 1
        if old is not None:
            await self.session.delete(old)
            await self.session.flush()
        self.session.add(grant)

    async def drop(self, organization_id: str, connector_id: uuid.UUID) -> bool:
        result = await self.session.execute(
            delete(ConnectorGrant)
            .where(
                ConnectorGrant.organization_id == organization_id, ConnectorGrant.connector_id == connector_id
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def take_lease(self, connector_id: uuid.UUID, owner: str, now: datetime, until: datetime) -> bool:
        result = await self.session.execute(
            update(ConnectorGrant)
            .where(
                ConnectorGrant.connector_id == connector_id,
                (ConnectorGrant.lease_until.is_(None)) | (ConnectorGrant.lease_until < now),
            )
            .values(lease_owner=owner, lease_until=until)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def finish_lease(self, connector_id: uuid.UUID, owner: str, **values: object) -> bool:
        """Write ``values`` (a rotation) and free the lease, if ``owner`` still holds it."""
        result = await self.session.execute(
            update(ConnectorGrant)
            .where(ConnectorGrant.connector_id == connector_id, ConnectorGrant.lease_owner == owner)
            .values(lease_owner=None, lease_until=None, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


class ConsentRepository:
    """SQL about consents under way; nothing here commits."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, request: ConsentRequest) -> None:
        self.session.add(request)

    async def take(self, state_hash: str) -> ConsentRequest | None:
        """The consent of ``state_hash``, removed: a state finishes at most one consent, however
        many callbacks race with it (only the one whose DELETE removed the row gets it)."""
        result = await self.session.execute(
            select(ConsentRequest).where(ConsentRequest.state_hash == state_hash)
        )
        request = result.scalar_one_or_none()
        if request is None:
            return None
        deleted = await self.session.execute(
            delete(ConsentRequest)
            .where(ConsentRequest.state_hash == state_hash)
            .execution_options(synchronize_session=False)
        )
        if not getattr(deleted, "rowcount", 0):
            return None
        self.session.expunge(request)
        return request

    async def count_open(self, organization_id: str, connector_id: uuid.UUID, now: datetime) -> int:
        result = await self.session.execute(
            select(ConsentRequest.state_hash).where(
                ConsentRequest.organization_id == organization_id,
                ConsentRequest.connector_id == connector_id,
                ConsentRequest.expires_at > now,
            )
        )
        return len(result.all())

    async def prune(self, now: datetime) -> int:
        result = await self.session.execute(
            delete(ConsentRequest)
            .where(ConsentRequest.expires_at <= now)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


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


def seal_grant(
    sealer: SecretSealer,
    organization_id: str,
    connector_id: uuid.UUID,
    answer: TokenGrant,
    *,
    scope: str | None,
    now: datetime,
) -> ConnectorGrant:
    """The row of a grant just given: its refresh token, or else its access token, sealed."""
    values: dict[str, SecretStr] = {}
    if answer.refresh_token is not None:
        values["refresh_token"] = SecretStr(answer.refresh_token)
    else:
        values["access_token"] = SecretStr(answer.access_token)
    sealed = sealer.seal(organization_id, connector_id, values)
    return ConnectorGrant(
        connector_id=connector_id,
        organization_id=organization_id,
        refresh_token=sealed.get("refresh_token"),
        access_token=sealed.get("access_token"),
        access_expires_at=None
        if answer.refresh_token is not None
        else now + timedelta(seconds=answer.expires_in),
        key_id=sealer.keyring.primary_key_id,
        granted_scope=scope,
        connected_at=now,
        generation=1,
    )


@dataclasses.dataclass(slots=True)
class GrantRotation:
    rotated: int = 0
    skipped: int = 0
    failed: int = 0


async def rotate_grant_keys(db: Database, keyring: KeyRing, *, batch_size: int = 100) -> GrantRotation:
    """Re-encrypt grants and open consents under the newest key (``connectors rotate-keys``).

    A grant is rewritten only if its generation and key id are still the ones read, so a renewal
    that rotated its refresh token meanwhile is never undone; a consent is used once and gone in
    minutes, and is rewritten only if it is still there.
    """
    report = GrantRotation()
    primary = keyring.primary_key_id
    tables: tuple[type[ConnectorGrant] | type[ConsentRequest], ...] = (ConnectorGrant, ConsentRequest)
    for table in tables:
        failed: set[object] = set()
        while True:
            async with db.write() as session:
                result = await session.execute(
                    select(table).where(table.key_id != primary).limit(batch_size + len(failed))
                )
                found = cast(list[ConnectorGrant | ConsentRequest], list(result.scalars().all()))
                rows = [row for row in found if _row_key(row) not in failed][:batch_size]
                if not rows:
                    break
                for row in rows:
                    try:
                        values = _resealed(keyring, row)
                    except DecryptionError:
                        log.error(
                            "cannot decrypt a connector's grant", extra={"connector": str(row.connector_id)}
                        )
                        failed.add(_row_key(row))
                        report.failed += 1
                        continue
                    if await _rewrite(session, row, {**values, "key_id": primary}):
                        report.rotated += 1
                    else:
                        report.skipped += 1
    return report


def _row_key(row: ConnectorGrant | ConsentRequest) -> object:
    return row.connector_id if isinstance(row, ConnectorGrant) else row.state_hash


_SEALED_FIELDS = {ConnectorGrant: ("refresh_token", "access_token"), ConsentRequest: ("code_verifier",)}


def _resealed(keyring: KeyRing, row: ConnectorGrant | ConsentRequest) -> dict[str, str]:
    values: dict[str, str] = {}
    for field in _SEALED_FIELDS[type(row)]:
        sealed = getattr(row, field)
        if sealed is not None:
            aad = secret_aad(row.organization_id, row.connector_id, field)
            values[field] = keyring.encrypt(keyring.decrypt(sealed, aad=aad), aad=aad)
    return values


async def _rewrite(
    session: AsyncSession, row: ConnectorGrant | ConsentRequest, values: dict[str, str]
) -> bool:
    if isinstance(row, ConnectorGrant):
        statement = update(ConnectorGrant).where(
            ConnectorGrant.connector_id == row.connector_id,
            ConnectorGrant.generation == row.generation,
            ConnectorGrant.key_id == row.key_id,
        )
    else:
        statement = update(ConsentRequest).where(
            ConsentRequest.state_hash == row.state_hash, ConsentRequest.key_id == row.key_id
        )
    result = await session.execute(statement.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(result, "rowcount", 0))
