"""The grants admins gave authorization code connectors, and the consents under way: what is
stored of them (SQL), and the row of a grant just given. Their renewals are
``app.connectors.renewals``; ``connectors rotate-keys`` re-encrypts them (``app.rotation``).

Secrets here are sealed as the connector's are (``SecretSealer``, fields ``refresh_token``,
``access_token`` and ``code_verifier``).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from pydantic import SecretStr
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.connectors.models import ConnectorGrant, ConsentRequest
from app.connectors.sealing import SecretSealer
from app.tokens.types import TokenGrant

__all__ = ["NO_GRANT", "ConsentRepository", "GrantFacts", "GrantRepository", "seal_grant"]


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
