"""Connector rules: creation under the limit, partial updates, live checks and authorize.

Database transactions are short and never held across an outbound call: a live check runs
between a read and the write, and the write re-checks what the read saw (limit, name, version).

Each change writes its audit event in the write's transaction, so an acknowledged change always
has its event and a rolled-back one has none. A refused attempt on an existing connector is
recorded afterwards in a short transaction of its own. Events name fields, never values.

``authorize`` is the hot path. It answers from the connectors this process holds in memory
(``app.connectors.memory``: organization, version, status, URLs, for Basic the ready header, for
OAuth the encrypted secrets a renewal needs) and from the token cache: in steady state no
database query, no decryption and no outbound call. A connector not held is loaded once, shared
by all who wait for it. Each write made here holds its new copy at once and tells the other
replicas; the change follower (``app.connectors.follower``) brings every other change in within
its interval. While the database is away, what is held keeps being served, renewals included,
until the follower has not heard from the database for ``max_staleness`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection, Coroutine, Hashable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.repository import AuditRepository
from app.audit.schemas import SUCCEEDED, AuditAction, AuditEvent, AuditEventList
from app.connectors import schemas
from app.connectors.events import EventRecorder, no_events
from app.connectors.follower import ChangeFollower
from app.connectors.kinds import CheckTools, Kind, kind_for, kind_of
from app.connectors.memory import ConnectorMemory
from app.connectors.models import Connector
from app.connectors.repository import ConnectorRepository, StatsRepository
from app.connectors.service.audit_fields import changed_fields, fields_set
from app.connectors.service.authorize import Authorizing
from app.connectors.service.background import Background, ChangeListener
from app.connectors.service.patching import merge_auth
from app.connectors.service.payloads import event_data, status_data
from app.connectors.service.sealing import SecretSealer
from app.connectors.service.status import StatusRecorder
from app.connectors.service.validation import Validating, Validation
from app.core import tracing
from app.core.clock import Clock
from app.core.crypto import KeyRing
from app.core.db import Database
from app.core.errors import (
    AppError,
    ConnectorLimitReached,
    ConnectorNotFound,
    DatabaseUnavailable,
    InvalidRequest,
    NameTaken,
    SecretRequired,
    VersionMismatch,
)
from app.core.keychecks import KeyChecks
from app.core.metrics import Metrics
from app.tokens.types import CheckState, ConfigLoader, IssuedToken, TokenGrant

log = logging.getLogger("app.connectors.service")


class DestinationChecker(Protocol):
    """Refuses a URL whose host is, or resolves to, a non-global address."""

    async def __call__(self, url: str) -> None: ...


class Tokens(Protocol):
    """The part of the token cache this service uses."""

    async def get(
        self, key: tuple[Hashable, int], load: ConfigLoader, *, stale_token: str | None = None
    ) -> IssuedToken: ...

    def peek(self, key: tuple[Hashable, int]) -> str | None: ...

    async def seed(
        self, key: tuple[Hashable, int], grant: TokenGrant, *, sent_at: float | None = None
    ) -> None: ...

    def forget(self, connector_id: Hashable) -> None: ...


class ConnectorService(Authorizing, Validating):
    def __init__(
        self,
        *,
        db: Database,
        keyring: KeyRing,
        tokens: Tokens,
        checker: CheckTools,
        check_destination: DestinationChecker,
        clock: Clock,
        max_per_org: int,
        held_capacity: int = 100_000,
        max_staleness: float = 300.0,
        poll_interval: float = 1.0,
        validate_interval: float = 10.0,
        on_change: ChangeListener | None = None,
        key_checks: KeyChecks | None = None,
        record_event: EventRecorder = no_events,
        status: StatusRecorder | None = None,
    ) -> None:
        """``key_checks`` checks private keys in full off the event loop (one worker process
        made on first use when not given); ``record_event`` is told of every change.

        ``status`` is the recorder of token requests' outcomes that the token cache was given
        (``status_recorder`` builds it, with the memory this service then shares); without one,
        the service makes its own (``record_outcome`` then reaches it)."""
        self.db = db
        self.key_checks = key_checks or KeyChecks()
        # Writes the event of each change in the change's transaction (app.connectors.events).
        self.record_event = record_event
        self.keyring = keyring
        self.sealer = SecretSealer(keyring)
        self.tokens = tokens
        # What kinds' live checks use (app.tokens.check.LiveChecker).
        self.checker = checker
        self.check_destination = check_destination
        self.clock = clock
        self.max_per_org = max_per_org
        # How long after the follower last heard from the database what is held is still served.
        self.max_staleness = max_staleness
        if status is None:
            status = status_recorder(
                db=db,
                clock=clock,
                held_capacity=held_capacity,
                on_change=on_change,
                record_event=record_event,
            )
        self.status = status
        self.memory = status.memory
        # Status writes, change notices (on_change: the other replicas) and checks under way.
        self.background = status.background
        self.follower = ChangeFollower(
            db,
            clock=clock,
            interval=poll_interval,
            select=self._changed,
            apply=self._refresh,
            held=self._held_keys,
            reached=status.write_unwritten,
        )
        # POST /validate: at most one live check per connector version per interval; the checks
        # under way here, shared by every caller asking meanwhile, and how many have ended.
        self.validate_interval = validate_interval
        self._validations: dict[tuple[str, uuid.UUID, int], asyncio.Future[Validation | None]] = {}
        self._validations_ended = 0

    # Reads -------------------------------------------------------------------------------------

    async def list(self, organization_id: str) -> schemas.ConnectorList:
        async with self.db.read() as session:
            rows = await ConnectorRepository(session).list(organization_id)
        return schemas.ConnectorList(items=[self.to_out(row) for row in rows], limit=self.max_per_org)

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> schemas.Connector:
        async with self.db.read() as session:
            row = await self._require(ConnectorRepository(session), organization_id, connector_id)
        return self.to_out(row)

    async def count_by_state(self) -> dict[str, int]:
        """Connectors of every organization per status state, for the operators' metrics."""
        async with self.db.read() as session:
            return await StatsRepository(session).count_by_state()

    async def history(self, organization_id: str, connector_id: uuid.UUID, *, limit: int) -> AuditEventList:
        """The connector's audit events, newest first; still readable after a delete.

        Not found only when the organization has neither the connector nor any event for it.
        """
        async with self.db.read() as session:
            events = await AuditRepository(session).for_connector(organization_id, connector_id, limit=limit)
            if not events:
                await self._require(ConnectorRepository(session), organization_id, connector_id)
        return AuditEventList(items=[AuditEvent.model_validate(event) for event in events])

    # Writes ------------------------------------------------------------------------------------

    async def create(
        self,
        organization_id: str,
        body: schemas.ConnectorCreate,
        *,
        validate: bool,
        actor: str | None = None,
    ) -> schemas.Connector:
        kind = kind_for(body.auth)
        public, secrets = kind.split(body.auth)
        name_key = schemas.name_key(body.name)
        # Cheap pre-checks, so an impossible create never reaches the identity provider. The
        # write below checks again under the organization's lock.
        async with self.db.read() as session:
            repo = ConnectorRepository(session)
            await self._check_room(repo, organization_id)
            if await repo.name_taken(organization_id, name_key):
                raise NameTaken()
        await self._check_private_keys(organization_id, kind, public, secrets)
        await self._check_destinations(body.resource_domain_url, kind, public)
        sent_at = self.clock.monotonic()
        # A kind with nothing to check against (an API key without a validation URL) stays unverified.
        validate = validate and kind.checkable(public)
        grant = await self._live_check(kind, public, secrets) if validate else None
        connector_id = uuid.uuid4()
        now = self.clock.now()
        row = Connector(
            id=connector_id,
            organization_id=organization_id,
            name=body.name,
            name_key=name_key,
            version=1,
            created_at=now,
            updated_at=now,
            **self._credential_columns(
                organization_id, connector_id, body.resource_domain_url, kind, public, secrets, validate, now
            ),
        )
        async with self.db.write() as session:
            repo = ConnectorRepository(session)
            await repo.lock_organization(organization_id, now)
            await self._check_room(repo, organization_id)
            if await repo.name_taken(organization_id, name_key):
                raise NameTaken()
            await repo.add(row)
            await self._audit(
                session, organization_id, connector_id, "create", actor, fields_set(body), SUCCEEDED, at=now
            )
            await self.record_event(session, organization_id, "connector.created", event_data(row), at=now)
            await repo.record_change(organization_id, connector_id, now, row=row)
        self._changed_here(row)
        if grant is not None:
            await self.tokens.seed((connector_id, row.version), grant, sent_at=sent_at)
        return self.to_out(row)

    async def update(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        patch: schemas.ConnectorPatch,
        *,
        if_match: Collection[int] | None,
        validate: bool,
        actor: str | None = None,
    ) -> schemas.Connector:
        try:
            return await self._update(
                organization_id, connector_id, patch, if_match=if_match, validate=validate, actor=actor
            )
        except AppError as error:
            await self._record_refusal(
                organization_id, connector_id, "update", actor, fields_set(patch), error
            )
            raise

    async def _update(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        patch: schemas.ConnectorPatch,
        *,
        if_match: Collection[int] | None,
        validate: bool,
        actor: str | None,
    ) -> schemas.Connector:
        async with self.db.read() as session:
            repo = ConnectorRepository(session)
            row = await self._require(repo, organization_id, connector_id)
            if if_match is not None and row.version not in if_match:
                raise VersionMismatch()
            sent = patch.model_fields_set
            for field in ("name", "resource_domain_url"):
                if field in sent and getattr(patch, field) is None:
                    raise InvalidRequest(errors=[{"field": field, "reason": "may not be null"}])
            name = patch.name if patch.name is not None else row.name
            name_key = schemas.name_key(name)
            if name_key != row.name_key and await repo.name_taken(
                organization_id, name_key, except_id=connector_id
            ):
                raise NameTaken()
        base_url = patch.resource_domain_url or row.resource_domain_url
        merged = merge_auth(row, patch.auth, self.sealer.open_row)
        kind, public, secrets, sent_secrets = merged.kind, merged.public, merged.secrets, merged.sent_secrets
        secret_names = set(secrets) if secrets is not None else set(row.secrets)
        old_kind = kind_of(row.auth_type, row.grant_type)
        credentials_touched = (
            kind is not old_kind
            or public != row.auth_config
            or bool(sent_secrets)
            or base_url != row.resource_domain_url
        )
        url_moved = base_url != row.resource_domain_url or (
            kind is old_kind and any(public.get(u) != row.auth_config.get(u) for u in kind.guarded_urls)
        )
        if url_moved:
            missing = sorted(name for name in secret_names if name not in sent_secrets)
            if missing:
                raise SecretRequired(
                    "a change of a URL must send the secrets again",
                    errors=[
                        {"field": f"auth.{name}", "reason": "required with this change"} for name in missing
                    ],
                )
        if not credentials_touched and name == row.name:
            return self.to_out(row)

        values: dict[str, Any] = {"name": name, "name_key": name_key, "version": row.version + 1}
        if not credentials_touched and row.validate_claimed_version == row.version:
            # Same credentials: the last check still counts, or a rename loop would lift the limit.
            values["validate_claimed_version"] = row.version + 1
        grant: TokenGrant | None = None
        if credentials_touched:
            if secrets is None:
                secrets = self.sealer.open_row(row)
            # Only keys sent now: a stored one had its full check when it was saved.
            keys_sent = {name: secrets[name] for name in sent_secrets if name in secrets}
            await self._check_private_keys(organization_id, kind, public, keys_sent)
            await self._check_destinations(base_url, kind, public)
            sent_at = self.clock.monotonic()
            validate = validate and kind.checkable(public)
            if validate:
                grant = await self._live_check(kind, public, secrets, connector_id=connector_id)
            values.update(
                self._credential_columns(
                    organization_id, connector_id, base_url, kind, public, secrets, validate, self.clock.now()
                )
            )
        values["updated_at"] = self.clock.now()
        async with self.db.write() as session:
            repo = ConnectorRepository(session)
            if not await repo.update(organization_id, connector_id, row.version, values):
                await self._require(repo, organization_id, connector_id)
                raise VersionMismatch("the connector changed while this update was processed")
            updated = await self._require(repo, organization_id, connector_id)
            changed = changed_fields(row, name, base_url, kind, public, sent_secrets, secret_names)
            await self._audit(
                session,
                organization_id,
                connector_id,
                "update",
                actor,
                changed,
                SUCCEEDED,
                at=values["updated_at"],
            )
            at = values["updated_at"]
            data = {**event_data(updated), "changed_fields": changed}
            await self.record_event(session, organization_id, "connector.updated", data, at=at)
            if updated.status_state != row.status_state:
                status = status_data(updated, row.status_state, updated.status_detail, at)
                await self.record_event(session, organization_id, "connector.status_changed", status, at=at)
            await repo.record_change(organization_id, connector_id, at, row=updated)
        self._changed_here(updated)
        if grant is not None:
            await self.tokens.seed((connector_id, updated.version), grant, sent_at=sent_at)
        return self.to_out(updated)

    async def delete(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        *,
        if_match: Collection[int] | None,
        actor: str | None = None,
    ) -> None:
        try:
            async with self.db.write() as session:
                repo = ConnectorRepository(session)
                row = await self._require(repo, organization_id, connector_id)
                if if_match is not None and row.version not in if_match:
                    raise VersionMismatch()
                await repo.delete(organization_id, connector_id)
                await self._audit(session, organization_id, connector_id, "delete", actor, [], SUCCEEDED)
                now = self.clock.now()
                data = {
                    "connector_id": str(connector_id),
                    "organization_id": organization_id,
                    "name": row.name,
                }
                await self.record_event(session, organization_id, "connector.deleted", data, at=now)
                await repo.record_change(organization_id, connector_id, now)
        except AppError as error:
            await self._record_refusal(organization_id, connector_id, "delete", actor, [], error)
            raise
        self._forget_here(connector_id)
        self.background.notify(connector_id)

    # Running it ---------------------------------------------------------------------------------

    def background_work(self) -> tuple[Coroutine[Any, Any, None], ...]:
        """What runs beside the requests until cancelled: following the changes made elsewhere,
        and pruning the change log."""
        return (self.follower.run(), self.follower.prune())

    def changes_announced(self) -> None:
        """Another replica announced a change (or notices may have been missed): read the
        changes now."""
        self.follower.wake()

    async def readiness(self) -> float | None:
        """None when the database answers; else how many seconds what is held may still be
        served from memory (0 or less: no longer)."""
        try:
            await self.db.ping()
        except DatabaseUnavailable:
            return self.max_staleness - self.follower.age()
        return None

    def observe(self, metrics: Metrics) -> None:
        """Set the gauges of what this process holds and how current it is."""
        metrics.held.set(len(self.memory))
        metrics.follower_age.set(min(self.follower.age(), 1e9))
        metrics.database_up.set(1 if self.db.available else 0)

    # Audit -------------------------------------------------------------------------------------

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
    ) -> None:
        await AuditRepository(session).record(
            organization_id,
            connector_id,
            action=action,
            actor=actor,
            changed_fields=changed_fields,
            outcome=outcome,
            detail=detail,
            at=at or self.clock.now(),
        )

    async def _record_refusal(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        attempted_fields: Sequence[str],
        error: AppError,
    ) -> None:
        """Record a refused attempt on an existing connector, in a transaction of its own."""
        if isinstance(error, ConnectorNotFound | DatabaseUnavailable):
            return  # nothing of the caller's organization was touched, or nothing can be recorded
        provider = error.extra.get("provider_error")
        try:
            async with self.db.write() as session:
                await self._audit(
                    session,
                    organization_id,
                    connector_id,
                    action,
                    actor,
                    attempted_fields,
                    error.code,
                    detail=provider if isinstance(provider, str) else None,
                )
        except Exception as failure:
            # The caller's answer is the refusal; failing to record it must not replace it.
            log.warning(
                "could not record a refused attempt",
                extra={"connector": str(connector_id), "error": type(failure).__name__},
            )

    # Helpers -----------------------------------------------------------------------------------

    def to_out(self, row: Connector) -> schemas.Connector:
        kind = kind_of(row.auth_type, row.grant_type)
        return schemas.Connector.model_validate(
            {
                "id": row.id,
                "name": row.name,
                "resource_domain_url": row.resource_domain_url,
                "auth": kind.read_model(row.auth_config, row.secrets),
                "status": {
                    "state": row.status_state,
                    "checked_at": row.status_checked_at,
                    "detail": row.status_detail,
                },
                "version": row.version,
                "created_at": row.created_at,
                "updated_at": row.updated_at,
            }
        )

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector:
        row = await repo.get(organization_id, connector_id)
        if row is None:
            raise ConnectorNotFound()
        return row

    async def _check_room(self, repo: ConnectorRepository, organization_id: str) -> None:
        if await repo.count(organization_id) >= self.max_per_org:
            raise ConnectorLimitReached(f"an organization may have at most {self.max_per_org} connectors")

    async def _check_private_keys(
        self, organization_id: str, kind: Kind, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]
    ) -> None:
        """The full check of each private key among ``secrets``, in a worker process; the last of
        the checks made before anything is sent or stored, being the costliest."""
        for field in kind.private_key_fields(public):
            if field in secrets:
                refusal = await self.key_checks.refusal(organization_id, secrets[field].get_secret_value())
                if refusal is not None:
                    raise InvalidRequest(errors=[{"field": f"auth.{field}", "reason": refusal}])

    async def _check_destinations(self, base_url: str, kind: Kind, public: Mapping[str, Any]) -> None:
        for url in (base_url, *kind.destinations(public)):
            await self.check_destination(url)

    async def _live_check(
        self,
        kind: Kind,
        public: Mapping[str, Any],
        secrets: Mapping[str, SecretStr],
        *,
        connector_id: uuid.UUID | None = None,
    ) -> TokenGrant | None:
        """Check the credentials; the check's span names ``connector_id`` (none before a create)."""
        if connector_id is None:
            return await kind.check(self.checker, public, secrets)
        with tracing.for_connector(connector_id):
            return await kind.check(self.checker, public, secrets)

    def _credential_columns(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        base_url: str,
        kind: Kind,
        public: dict[str, Any],
        secrets: Mapping[str, SecretStr],
        validated: bool,
        now: datetime,
    ) -> dict[str, Any]:
        """The columns written when URLs or credentials are set, secrets encrypted."""
        return {
            "resource_domain_url": base_url,
            "auth_type": kind.auth_type,
            "grant_type": kind.variant,
            "auth_config": public,
            "secrets": self.sealer.seal(organization_id, connector_id, secrets),
            "key_id": self.keyring.primary_key_id,
            "status_state": "authorized" if validated else "unverified",
            "status_checked_at": now if validated else None,
            "status_detail": None,
        }

    async def aclose(self) -> None:
        """Stop loads; wait for status writes and change notices still under way."""
        await self.memory.aclose()
        await self.background.drain()
        self.key_checks.close()

    async def record_outcome(self, key: Hashable, state: CheckState, detail: str | None) -> None:
        """A token request's outcome (``StatusRecorder.record_outcome``)."""
        await self.status.record_outcome(key, state, detail)


def status_recorder(
    *,
    db: Database,
    clock: Clock,
    held_capacity: int = 100_000,
    on_change: ChangeListener | None = None,
    record_event: EventRecorder = no_events,
) -> StatusRecorder:
    """The recorder of token requests' outcomes, with the memory of held connectors it and the
    service share: built first, so that the token cache can be given ``record_outcome``."""
    return StatusRecorder(
        db=db,
        memory=ConnectorMemory(held_capacity),
        clock=clock,
        record_event=record_event,
        background=Background(on_change),
    )
