"""``POST /authorize`` and what it answers from: the connectors this process holds in memory.

The hot path awaits memory only: a held connector's static credential, or a token from the token
cache. A miss loads the connector once for every caller waiting on it; the change follower keeps
what is held current (``_changed``, ``_refresh``), and a change made here is held at once
(``_changed_here``). A part of ``ConnectorService`` (``Authorizing``): what it needs of the rest
of the service is ``_Service``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from app.connectors import schemas
from app.connectors.follower import ChangeFollower
from app.connectors.kinds import kind_of
from app.connectors.memory import ConnectorMemory, HeldConnector
from app.connectors.misses import Misses
from app.connectors.models import Connector
from app.connectors.preload import Preload
from app.connectors.renewals import GrantKeeper
from app.connectors.repository import ConnectorRepository
from app.connectors.sealing import UNREADABLE, SecretSealer
from app.connectors.service.background import Background
from app.connectors.usage import NEVER_NOTED, UsageRecorder
from app.core.db import Database
from app.core.errors import (
    ConnectorNotFound,
    ConsentRequired,
    CredentialsRejected,
    DatabaseUnavailable,
    DestinationNotAllowed,
    PathOutsideResourceDomain,
    SecretUnreadable,
)
from app.core.urls import URLRuleError, join_resource_path, origin_of
from app.tokens.static import with_query
from app.tokens.types import OAuth2Config, StaticCredential

if TYPE_CHECKING:
    from app.connectors.service.core import Tokens

__all__ = ["Authorizing"]

log = logging.getLogger(__name__)

CONSENT_DETAIL = (
    "The connector's account is not connected (or the provider ended the grant): an admin must "
    "connect it again (POST /connectors/{id}/consent, then the provider's consent page)"
)


class _Service(Protocol):
    """What authorize and the memory use of the service they are part of."""

    db: Database
    sealer: SecretSealer
    tokens: Tokens
    memory: ConnectorMemory
    misses: Misses
    usage: UsageRecorder | None
    grants: GrantKeeper
    follower: ChangeFollower
    background: Background
    max_staleness: float
    preloader: Preload | None

    async def _load(self, organization_id: str, connector_id: uuid.UUID) -> HeldConnector | None: ...

    def held_from(self, row: Connector) -> HeldConnector: ...

    async def _token_config(self, connector_id: uuid.UUID, held: HeldConnector) -> OAuth2Config: ...

    def _replace(self, row: Connector, *, force: bool = False) -> None: ...

    def _forget_here(self, connector_id: uuid.UUID) -> None: ...


class Authorizing:
    """The authorize and memory methods of ``ConnectorService``."""

    # Authorize ---------------------------------------------------------------------------------

    async def authorize(
        self: _Service, organization_id: str, connector_id: uuid.UUID, request: schemas.AuthorizeRequest
    ) -> schemas.AuthorizeResponse:
        if self.follower.age() > self.max_staleness:
            # What is held may be out of date by now.
            raise DatabaseUnavailable("connector changes could not be followed for too long")
        held = self.memory.get(connector_id)
        if held is None:
            held = await self.memory.load(
                organization_id, connector_id, lambda: self._load(organization_id, connector_id)
            )
            if held is None:
                raise ConnectorNotFound()
        if held.organization_id != organization_id:
            raise ConnectorNotFound()
        if self.usage is not None:
            self.usage.note(connector_id, held)
        try:
            url = join_resource_path(held.base_url, request.path)
        except URLRuleError as error:
            raise PathOutsideResourceDomain(str(error)) from None
        if held.unreadable:
            raise SecretUnreadable(UNREADABLE)
        if held.credential is not None:
            # Basic, API keys: handed out from memory, never an outbound call.
            return schemas.AuthorizeResponse.model_construct(
                url=with_query(url, held.credential.query),
                headers=dict(held.credential.headers),
                resource_origin=held.origin,
                expires_at=None,
            )
        if held.state == "rejected":
            raise CredentialsRejected(status=502)
        if held.state == "consent_required":
            # No grant to renew: only an admin's consent mends it, so nothing is sent.
            raise ConsentRequired(CONSENT_DETAIL)
        key = (connector_id, held.version)
        stale = self.tokens.peek(key) if request.force_refresh else None
        try:
            token = await self.tokens.get(
                key, lambda: self._token_config(connector_id, held), stale_token=stale
            )
        except (CredentialsRejected, DestinationNotAllowed) as error:
            # On save these are the caller's input problem (422); here the upstream failed.
            raise type(error)(error.detail, status=502, **error.extra) from None
        return schemas.AuthorizeResponse.model_construct(
            url=url,
            headers={"Authorization": f"Bearer {token.access_token}"},
            resource_origin=held.origin,
            expires_at=token.expires_at,
        )

    def auth_type_of(self: _Service, organization_id: str, connector_id: uuid.UUID) -> str | None:
        """The connector's ``type`` if authorize holds it in memory, else None."""
        held = self.memory.peek(connector_id)
        if held is None or held.organization_id != organization_id:
            return None
        return held.auth_type

    # Memory ------------------------------------------------------------------------------------

    async def start(self: _Service) -> None:
        """Take the follower's starting point, if the database answers (else it keeps trying);
        with preload on, read its first page (``app.connectors.preload``)."""
        with contextlib.suppress(DatabaseUnavailable):
            await self.follower.poll()
        if self.preloader is not None:
            await self.preloader.first()

    async def _load(self: _Service, organization_id: str, connector_id: uuid.UUID) -> HeldConnector | None:
        # One query for the misses of every caller meanwhile (app.connectors.misses).
        row = await self.misses.get(organization_id, connector_id)
        return self.held_from(row) if row is not None else None

    async def _rows(self: _Service, connector_ids: Sequence[uuid.UUID]) -> Sequence[Connector]:
        return await self.db.scalars(ConnectorRepository.select_by_ids(connector_ids))

    def held_from(self: _Service, row: Connector) -> HeldConnector:
        kind = kind_of(row.auth_type, row.grant_type)
        credential: StaticCredential | None = None
        unreadable = False
        if not kind.issues_tokens:
            try:
                credential = kind.credential(row.auth_config, self.sealer.open_row(row))
            except SecretUnreadable:
                # Held all the same: authorize answers the problem from memory, not a load a call.
                unreadable = True
        return HeldConnector(
            organization_id=row.organization_id,
            version=row.version,
            change_seq=row.change_seq,
            base_url=row.resource_domain_url,
            origin=origin_of(row.resource_domain_url),
            state=row.status_state,
            auth_type=row.auth_type,
            grant_type=row.grant_type,
            public=dict(row.auth_config),
            # A static credential is all authorize needs; token kinds decrypt these for a request.
            sealed={} if not kind.issues_tokens else dict(row.secrets),
            credential=credential,
            unreadable=unreadable,
            # Noted as called within the hour (by any process): no need to note it again sooner.
            used_noted=self.usage.noted_at(row.used_at) if self.usage is not None else NEVER_NOTED,
        )

    async def _token_config(self: _Service, connector_id: uuid.UUID, held: HeldConnector) -> OAuth2Config:
        """The token request's configuration, decrypted from the held copy just before use.

        It runs inside the token cache's flight, which hands an error of its own to the waiting
        callers unchanged and reports nothing, so an unreadable secret never marks the connector
        rejected.
        """
        secrets = self.sealer.open(held.organization_id, connector_id, held.sealed)
        kind = kind_of(held.auth_type, held.grant_type)
        config = kind.token_config(held.public, secrets)
        if kind.needs_consent:
            # Renewals go through the grant an admin gave, kept beside the connector.
            config = dataclasses.replace(config, grant=self.grants.stored(held.organization_id, connector_id))
        return config

    def _changed_here(self: _Service, row: Connector) -> None:
        """A change committed here: hold the new copy at once and tell the other replicas."""
        # A copy whose secret cannot be opened is held too: authorize answers its problem.
        self._replace(row)
        self.background.notify(row.id)

    def _replace(self: _Service, row: Connector, *, force: bool = False) -> None:
        """Hold ``row`` unless a later change is held; drop tokens its change made useless."""
        old = self.memory.peek(row.id)
        if old is not None and old.change_seq >= row.change_seq and not force:
            return
        self.memory.changed(row.id)
        self.memory.offer(row.id, self.held_from(row), force=force)
        sticky = ("rejected", "consent_required")
        if old is not None and (
            old.version != row.version or (old.state in sticky and old.state != row.status_state)
        ):
            # A new version needs new tokens; a rejection (or a grant found gone) that was cleared
            # is not sticky any more.
            self.tokens.forget(row.id)

    def _changed(self: _Service, keys: Sequence[tuple[str, uuid.UUID]]) -> Sequence[tuple[str, uuid.UUID]]:
        """The follower's question: which of these changed connectors must be read again."""
        held = []
        for key in set(keys):
            if self.memory.changed(key[1]):
                held.append(key)
            else:
                # Its tokens may outlive an evicted copy: a rejection among them must not stick.
                self.tokens.forget(key[1])
        return held

    def _refresh(
        self: _Service, rows: Sequence[Connector], asked: Sequence[tuple[str, uuid.UUID]], force: bool = False
    ) -> None:
        """The follower's answer: current rows of held connectors; an absent one was deleted."""
        found = {row.id for row in rows}
        for row in rows:
            held = self.memory.peek(row.id)
            if held is None or held.organization_id != row.organization_id:
                continue
            try:
                self._replace(row, force=force)
            except Exception as error:
                # Not servable here (a row this version cannot read): stop serving the old copy
                # rather than stop following every other change.
                log.warning(
                    "a changed connector could not be held",
                    extra={"connector": str(row.id), "error": type(error).__name__},
                )
                self._forget_here(row.id)
        for _, connector_id in asked:
            if connector_id not in found and self.memory.peek(connector_id) is not None:
                self._forget_here(connector_id)

    def _forget_here(self: _Service, connector_id: uuid.UUID) -> None:
        self.memory.drop(connector_id)
        self.tokens.forget(connector_id)

    def _held_keys(self: _Service) -> Sequence[tuple[str, uuid.UUID]]:
        held = ((self.memory.peek(connector_id), connector_id) for connector_id in self.memory.held_ids())
        return [(copy.organization_id, connector_id) for copy, connector_id in held if copy is not None]
