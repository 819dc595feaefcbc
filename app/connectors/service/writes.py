"""Creating, updating and deleting connectors: the rules of a save, in the order of their cost.

A save is checked cheapest first: the body (by its model), the organization's limit and the name,
the full check of a private key it sends (in a worker process), the destinations, and last the
live check of the credentials (an outbound call). Nothing is written until all have passed; the
write repeats the limit and name checks under the organization's lock, records the audit event
and the connector's event in the same transaction, and numbers the change for the followers. A
part of ``ConnectorService`` (``Writing``): what it needs of the rest of the service is
``_Service``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.schemas import SUCCEEDED, AuditAction
from app.connectors import schemas
from app.connectors.events import EventRecorder
from app.connectors.grants import GrantFacts, GrantRepository
from app.connectors.kinds import Kind, kind_for, kind_of
from app.connectors.kinds.oauth2_authorization_code import CONSENT_FIELDS
from app.connectors.models import Connector
from app.connectors.renewals import GrantKeeper
from app.connectors.repository import ConnectorRepository
from app.connectors.sealing import SecretSealer
from app.connectors.service.audit_fields import changed_fields, fields_set
from app.connectors.service.background import Background
from app.connectors.service.patching import merge_auth
from app.connectors.service.payloads import event_data, status_data
from app.core.clock import Clock
from app.core.crypto import KeyRing
from app.core.db import Database
from app.core.errors import (
    AppError,
    ConnectorLimitReached,
    InvalidRequest,
    NameTaken,
    SecretRequired,
    VersionMismatch,
)
from app.core.keychecks import KeyChecks
from app.tokens.types import TokenGrant

if TYPE_CHECKING:
    from app.connectors.service.core import DestinationChecker, Tokens

__all__ = ["Writing"]

log = logging.getLogger("app.connectors.service")


class _Service(Protocol):
    """What writes use of the service they are part of."""

    db: Database
    clock: Clock
    keyring: KeyRing
    sealer: SecretSealer
    tokens: Tokens
    background: Background
    record_event: EventRecorder
    key_checks: KeyChecks
    check_destination: DestinationChecker
    max_per_org: int

    grants: GrantKeeper

    def to_out(self, row: Connector, grant: GrantFacts | None = None) -> schemas.Connector: ...

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> schemas.Connector: ...

    async def _grant_facts(
        self, session: AsyncSession, organization_id: str, rows: Sequence[Connector]
    ) -> dict[uuid.UUID, GrantFacts]: ...

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector: ...

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

    async def _live_check(
        self,
        kind: Kind,
        public: Mapping[str, Any],
        secrets: Mapping[str, SecretStr],
        *,
        connector_id: uuid.UUID | None = None,
    ) -> TokenGrant | None: ...

    def _changed_here(self, row: Connector) -> None: ...

    def _forget_here(self, connector_id: uuid.UUID) -> None: ...

    async def create(
        self,
        organization_id: str,
        body: schemas.ConnectorCreate,
        *,
        validate: bool,
        actor: str | None = None,
    ) -> schemas.Connector: ...

    async def update(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        patch: schemas.ConnectorPatch,
        *,
        if_match: Collection[int] | None,
        validate: bool,
        actor: str | None = None,
    ) -> schemas.Connector: ...

    async def _update(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        patch: schemas.ConnectorPatch,
        *,
        if_match: Collection[int] | None,
        validate: bool,
        actor: str | None,
    ) -> schemas.Connector: ...

    async def delete(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        *,
        if_match: Collection[int] | None,
        actor: str | None = None,
    ) -> None: ...

    async def _record_refusal(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        attempted_fields: Sequence[str],
        error: AppError,
    ) -> None: ...

    async def _check_room(self, repo: ConnectorRepository, organization_id: str) -> None: ...

    async def _check_private_keys(
        self, organization_id: str, kind: Kind, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]
    ) -> None: ...

    async def _check_destinations(self, base_url: str, kind: Kind, public: Mapping[str, Any]) -> None: ...

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
    ) -> dict[str, Any]: ...


class Writing:
    """The create, update and delete methods of ``ConnectorService``."""

    # Writes ------------------------------------------------------------------------------------

    async def create(
        self: _Service,
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
        self: _Service,
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
        self: _Service,
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
            return await self.get(organization_id, connector_id) if kind.needs_consent else self.to_out(row)

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
        grant_ends = old_kind.needs_consent and (
            kind is not old_kind or _consent_changed(row, public, secrets, self.sealer.open_row)
        )
        if kind.needs_consent and kind is old_kind and not grant_ends:
            # What the grant was given to is the same: it holds, and so does the status (left as
            # stored, never written back from this read).
            for column in ("status_state", "status_checked_at", "status_detail"):
                values.pop(column, None)
        values["updated_at"] = self.clock.now()
        async with self.db.write() as session:
            repo = ConnectorRepository(session)
            if not await repo.update(organization_id, connector_id, row.version, values):
                await self._require(repo, organization_id, connector_id)
                raise VersionMismatch("the connector changed while this update was processed")
            updated = await self._require(repo, organization_id, connector_id)
            if grant_ends:
                await GrantRepository(session).drop(organization_id, connector_id)
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
            facts = await self._grant_facts(session, organization_id, [updated])
        if grant_ends:
            self.grants.forget(connector_id)
        self._changed_here(updated)
        if grant is not None:
            await self.tokens.seed((connector_id, updated.version), grant, sent_at=sent_at)
        return self.to_out(updated, facts.get(connector_id))

    async def delete(
        self: _Service,
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

    # Helpers of writes ------------------------------------------------------------------------

    async def _check_room(self: _Service, repo: ConnectorRepository, organization_id: str) -> None:
        if await repo.count(organization_id) >= self.max_per_org:
            raise ConnectorLimitReached(f"an organization may have at most {self.max_per_org} connectors")

    async def _check_private_keys(
        self: _Service,
        organization_id: str,
        kind: Kind,
        public: Mapping[str, Any],
        secrets: Mapping[str, SecretStr],
    ) -> None:
        """The full check of each private key among ``secrets``, in a worker process; the last of
        the checks made before anything is sent or stored, being the costliest."""
        for field in kind.private_key_fields(public):
            if field in secrets:
                refusal = await self.key_checks.refusal(organization_id, secrets[field].get_secret_value())
                if refusal is not None:
                    raise InvalidRequest(errors=[{"field": f"auth.{field}", "reason": refusal}])

    async def _check_destinations(
        self: _Service, base_url: str, kind: Kind, public: Mapping[str, Any]
    ) -> None:
        for url in (base_url, *kind.destinations(public)):
            await self.check_destination(url)

    def _credential_columns(
        self: _Service,
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
            # A kind that needs consent has no grant until an admin gives one.
            "status_state": (
                "consent_required" if kind.needs_consent else "authorized" if validated else "unverified"
            ),
            "status_checked_at": now if validated else None,
            "status_detail": None,
        }


def _consent_changed(
    row: Connector,
    public: Mapping[str, Any],
    secrets: Mapping[str, SecretStr] | None,
    open_row: Callable[[Connector], dict[str, SecretStr]],
) -> bool:
    """Whether an update changes what a grant was given to: the client, the provider's
    endpoints, the scope, the issuer or the client authentication (its secrets included)."""
    if any(public.get(name) != row.auth_config.get(name) for name in CONSENT_FIELDS):
        return True
    if secrets is None:
        return False
    stored = open_row(row)
    return set(secrets) != set(stored) or any(
        value.get_secret_value() != stored[name].get_secret_value() for name, value in secrets.items()
    )
