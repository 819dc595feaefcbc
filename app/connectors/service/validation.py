"""``POST /validate``: a live check of the stored credentials, at most once per version and
interval, shared by every caller asking meanwhile and claimed in the database across replicas.

A part of ``ConnectorService`` (``Validating``): what it needs of the rest of the service is
``_Service``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.schemas import AuditAction
from app.connectors import schemas
from app.connectors.events import EventRecorder
from app.connectors.kinds import Kind, kind_of
from app.connectors.models import Connector
from app.connectors.repository import ConnectorRepository
from app.connectors.sealing import SecretSealer
from app.connectors.service.audit_fields import detail_of
from app.connectors.service.background import Background
from app.connectors.service.payloads import status_data
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import AppError, CredentialsRejected, VersionMismatch
from app.tokens.types import CheckState, TokenGrant

if TYPE_CHECKING:
    from app.connectors.service.core import Tokens

__all__ = ["Validating", "Validation"]


@dataclasses.dataclass(frozen=True, slots=True)
class Validation:
    """The answer to ``POST /validate``: the connector, and, when no check ran for this call
    (one of this version ran less than the interval ago), the whole seconds until the next may."""

    connector: schemas.Connector
    retry_after: int | None = None


class _Service(Protocol):
    """What validation uses of the service it is part of."""

    db: Database
    clock: Clock
    sealer: SecretSealer
    tokens: Tokens
    background: Background
    record_event: EventRecorder
    validate_interval: float
    _validations: dict[tuple[str, uuid.UUID, int], asyncio.Future[Validation | None]]
    _validations_ended: int

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> schemas.Connector: ...

    def to_out(self, row: Connector) -> schemas.Connector: ...

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector: ...

    async def _live_check(
        self,
        kind: Kind,
        public: Mapping[str, Any],
        secrets: Mapping[str, SecretStr],
        *,
        connector_id: uuid.UUID | None = None,
    ) -> TokenGrant | None: ...

    async def _audit(
        self,
        session: AsyncSession,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        changed_fields: Sequence[str],
        outcome: str,
        *,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None: ...

    def _changed_here(self, row: Connector) -> None: ...

    async def validate(
        self, organization_id: str, connector_id: uuid.UUID, *, actor: str | None = None
    ) -> Validation: ...

    async def _read_for_validation(self, organization_id: str, connector_id: uuid.UUID) -> Connector: ...

    def _next_check_in(self, row: Connector) -> int | None: ...

    def _start_validation(
        self, key: tuple[str, uuid.UUID, int], row: Connector, actor: str | None
    ) -> asyncio.Future[Validation | None]: ...

    async def _run_validation(
        self,
        flight: asyncio.Future[Validation | None],
        key: tuple[str, uuid.UUID, int],
        row: Connector,
        actor: str | None,
    ) -> None: ...

    async def _claim_and_check(self, row: Connector, actor: str | None) -> Validation | None: ...


class Validating:
    """The validation methods of ``ConnectorService``."""

    async def validate(
        self: _Service, organization_id: str, connector_id: uuid.UUID, *, actor: str | None = None
    ) -> Validation:
        """Check the stored credentials live, at most once per version and ``validate_interval``.

        Concurrent calls in this process share one check of the version they read (one flight
        per connector and version). The check is claimed in the database first
        (``ConnectorRepository.claim_check``), so replicas make one between them. A call within
        the interval of the last claimed check of the same version answers the connector as
        stored, writes nothing (no audit event either) and says when the next check may run.
        """
        for _ in range(3):
            ended = self._validations_ended
            row = await self._read_for_validation(organization_id, connector_id)
            if not kind_of(row.auth_type, row.grant_type).checkable(row.auth_config):
                # Nothing to check against: stays as it is.
                return Validation(await self.get(organization_id, connector_id))
            key = (organization_id, connector_id, row.version)
            flight = self._validations.get(key)
            if flight is None:
                wait = self._next_check_in(row)
                if wait is not None and ended != self._validations_ended:
                    # A check here may have recorded its outcome after that read: answer it.
                    row = await self._read_for_validation(organization_id, connector_id)
                    wait = self._next_check_in(row)
                if wait is not None:
                    return Validation(self.to_out(row), retry_after=wait)
                if row.version != key[2]:
                    continue
                flight = self._start_validation(key, row, actor)
            # Shielded: a caller giving up must not cancel the check the others wait for.
            outcome = await asyncio.shield(flight)
            if outcome is not None:
                return outcome
            # The connector changed before the check could be claimed: the new version is due.
        raise VersionMismatch("the connector kept changing while a check was being started")

    async def _read_for_validation(
        self: _Service, organization_id: str, connector_id: uuid.UUID
    ) -> Connector:
        async with self.db.read() as session:
            return await self._require(ConnectorRepository(session), organization_id, connector_id)

    def _next_check_in(self: _Service, row: Connector) -> int | None:
        """Whole seconds until a check of the row's version may run again; None if it may now."""
        claimed = row.validate_claimed_at
        if claimed is None or row.validate_claimed_version != row.version:
            return None
        remaining = (claimed - self.clock.now()).total_seconds() + self.validate_interval
        if remaining <= 0:
            return None
        # A claim stamped by a replica whose clock runs ahead waits no longer than the interval.
        return math.ceil(min(remaining, self.validate_interval))

    def _start_validation(
        self: _Service, key: tuple[str, uuid.UUID, int], row: Connector, actor: str | None
    ) -> asyncio.Future[Validation | None]:
        flight: asyncio.Future[Validation | None] = asyncio.get_running_loop().create_future()
        # Retrieved here too: a failed check whose callers all gave up is not an unhandled error.
        flight.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._validations[key] = flight
        self.background.run(self._run_validation(flight, key, row, actor))
        return flight

    async def _run_validation(
        self: _Service,
        flight: asyncio.Future[Validation | None],
        key: tuple[str, uuid.UUID, int],
        row: Connector,
        actor: str | None,
    ) -> None:
        try:
            outcome = await self._claim_and_check(row, actor)
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except Exception as error:
            flight.set_exception(error)
        else:
            flight.set_result(outcome)
        finally:
            # Only now, with the outcome committed: a caller that read the row before it and
            # finds no flight reads again (see ``validate``).
            self._validations_ended += 1
            if self._validations.get(key) is flight:
                del self._validations[key]

    async def _claim_and_check(self: _Service, row: Connector, actor: str | None) -> Validation | None:
        """Claim the check of the row's version, run it and record it.

        None if the connector changed before the claim; a throttled answer if another replica
        claimed it within the interval.
        """
        organization_id, connector_id = row.organization_id, row.id
        # Before the claim: secrets that cannot be opened must not hold back the next attempt.
        secrets = self.sealer.open_row(row)
        claimed_at = self.clock.now()
        async with self.db.write() as session:
            repo = ConnectorRepository(session)
            claimed = await repo.claim_check(
                organization_id, connector_id, row.version, at=claimed_at, interval=self.validate_interval
            )
            current = None if claimed else await self._require(repo, organization_id, connector_id)
        if current is not None:
            # The UPDATE matched nothing: nothing was written.
            wait = self._next_check_in(current)
            if current.version != row.version or wait is None:
                return None
            return Validation(self.to_out(current), retry_after=wait)

        kind = kind_of(row.auth_type, row.grant_type)
        grant: TokenGrant | None = None
        state: CheckState = "authorized"
        detail: str | None = None
        sent_at = self.clock.monotonic()
        try:
            grant = await self._live_check(kind, row.auth_config, secrets, connector_id=connector_id)
        except CredentialsRejected as error:
            state, detail = "rejected", detail_of(error)
        except AppError as error:
            state, detail = "unreachable", detail_of(error)
        now = self.clock.now()
        async with self.db.write() as session:
            repo = ConnectorRepository(session)
            applied = await repo.set_status(
                organization_id, connector_id, row.version, state=state, detail=detail, checked_at=now
            )
            updated = await self._require(repo, organization_id, connector_id)
            if not applied:
                detail = "superseded: the connector changed during the check"
            await self._audit(
                session, organization_id, connector_id, "validate", actor, [], state, detail=detail, at=now
            )
            if applied:
                if state != row.status_state:
                    status = status_data(updated, row.status_state, detail, now)
                    await self.record_event(
                        session, organization_id, "connector.status_changed", status, at=now
                    )
                await repo.record_change(organization_id, connector_id, now, row=updated)
        # A check clears what the token cache remembers of the connector (a rejection included).
        self.tokens.forget(connector_id)
        self._changed_here(updated)
        if grant is not None and updated.version == row.version:
            await self.tokens.seed((connector_id, row.version), grant, sent_at=sent_at)
        return Validation(self.to_out(updated))
