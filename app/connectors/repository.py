"""All SQL about connectors. Every method takes the organization; nothing here commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, insert, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app.connectors.models import (
    ChangeSequence,
    Connector,
    ConnectorChange,
    ConnectorGrant,
    ConsentRequest,
    Organization,
)
from app.core.errors import NameTaken

# The orders of ConnectorRepository.select_recent, both served by the index ix_connectors_preload.
_RECENT_USED = (Connector.used_at, Connector.change_seq, Connector.id)
_RECENT_UNUSED = (Connector.change_seq, Connector.id)


class ConnectorRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock_organization(self, organization_id: str, now: datetime) -> None:
        """Create the organization's row if needed and lock it until the transaction ends.

        Creates for one organization queue on this lock, so the count-then-insert that enforces
        the per-organization limit cannot interleave (SQLite serialises writers already).
        """
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        await self.session.execute(
            insert(Organization)
            .values(id=organization_id, created_at=now)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        # FOR NO KEY UPDATE: it queues creates, but not the foreign-key checks (FOR KEY SHARE) that
        # other writes to the organization's connectors make while they hold the change counter.
        await self.session.execute(
            select(Organization.id).where(Organization.id == organization_id).with_for_update(key_share=True)
        )

    async def count(self, organization_id: str) -> int:
        result = await self.session.execute(
            select(func.count()).select_from(Connector).where(Connector.organization_id == organization_id)
        )
        return int(result.scalar_one())

    async def list(self, organization_id: str) -> Sequence[Connector]:
        result = await self.session.execute(
            select(Connector)
            .where(Connector.organization_id == organization_id)
            .order_by(Connector.name_key, Connector.name, Connector.id)
        )
        return result.scalars().all()

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> Connector | None:
        result = await self.session.execute(
            select(Connector).where(
                Connector.organization_id == organization_id, Connector.id == connector_id
            )
        )
        return result.scalar_one_or_none()

    @staticmethod
    def select_by_ids(connector_ids: Sequence[uuid.UUID]) -> Select[Connector]:
        """The rows of these connectors, whichever organization's (deleted ones are absent), for
        ``Database.scalars``."""
        return select(Connector).where(Connector.id.in_(connector_ids))

    @staticmethod
    def select_recent(limit: int, before: Sequence[Any] | None = None, *, used: bool) -> Select[Connector]:
        """A page of connectors, newest first: with ``used``, those called lately, by when, then
        by last change; else those never noted as called, by last change. ``before`` is
        ``recent_key`` of the previous page's last connector."""
        columns = _RECENT_USED if used else _RECENT_UNUSED
        query = (
            select(Connector)
            .where(Connector.used_at.is_not(None) if used else Connector.used_at.is_(None))
            .order_by(*(column.desc() for column in columns))
            .limit(limit)
        )
        if before is not None:
            bound = tuple_(
                *(literal(value, column.type) for value, column in zip(before, columns, strict=True))
            )
            query = query.where(tuple_(*columns) < bound)
        return query

    @staticmethod
    def recent_key(row: Connector, *, used: bool) -> tuple[Any, ...]:
        return tuple(getattr(row, column.key) for column in (_RECENT_USED if used else _RECENT_UNUSED))

    async def mark_used(
        self, connector_ids: Sequence[uuid.UUID], at: datetime, *, not_since: datetime
    ) -> None:
        """Note that these connectors were called at ``at``, unless noted since ``not_since``."""
        await self.session.execute(
            update(Connector)
            .where(
                Connector.id.in_(connector_ids),
                or_(Connector.used_at.is_(None), Connector.used_at < not_since),
            )
            .values(used_at=at)
            .execution_options(synchronize_session=False)
        )

    async def name_taken(
        self, organization_id: str, name_key: str, *, except_id: uuid.UUID | None = None
    ) -> bool:
        query = select(Connector.id).where(
            Connector.organization_id == organization_id, Connector.name_key == name_key
        )
        if except_id is not None:
            query = query.where(Connector.id != except_id)
        result = await self.session.execute(query.limit(1))
        return result.first() is not None

    async def add(self, connector: Connector) -> None:
        self.session.add(connector)
        await self._flush_unique()

    async def update(
        self, organization_id: str, connector_id: uuid.UUID, expected_version: int, values: dict[str, Any]
    ) -> bool:
        """Apply ``values`` if the row is still at ``expected_version``; False if it is not."""
        changed = await self._update_version(organization_id, connector_id, expected_version, values)
        await self._flush_unique()
        return changed

    async def set_status(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        version: int,
        *,
        state: str,
        detail: str | None,
        checked_at: datetime,
    ) -> bool:
        """Record a check's outcome for that version; a newer version is left alone."""
        values = {"status_state": state, "status_detail": detail, "status_checked_at": checked_at}
        return await self._update_version(organization_id, connector_id, version, values)

    async def claim_check(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        version: int,
        *,
        at: datetime,
        interval: float,
    ) -> bool:
        """Claim an on-demand live check of ``version`` at ``at``; False if the connector is at
        another version, or a check of this version was claimed less than ``interval`` seconds ago.

        One conditional UPDATE: of the replicas claiming at once, exactly one gets it.
        """
        result = await self.session.execute(
            update(Connector)
            .where(
                Connector.organization_id == organization_id,
                Connector.id == connector_id,
                Connector.version == version,
                or_(
                    Connector.validate_claimed_version.is_(None),
                    Connector.validate_claimed_version != version,
                    Connector.validate_claimed_at.is_(None),
                    Connector.validate_claimed_at <= at - timedelta(seconds=interval),
                ),
            )
            .values(validate_claimed_at=at, validate_claimed_version=version)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def _update_version(
        self, organization_id: str, connector_id: uuid.UUID, version: int, values: dict[str, Any]
    ) -> bool:
        result = await self.session.execute(
            update(Connector)
            .where(
                Connector.organization_id == organization_id,
                Connector.id == connector_id,
                Connector.version == version,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def delete(self, organization_id: str, connector_id: uuid.UUID) -> bool:
        # Its grant and consents go with it, whatever SQLite's foreign_keys pragma says.
        for table in (ConnectorGrant, ConsentRequest):
            await self.session.execute(
                delete(table)
                .where(table.organization_id == organization_id, table.connector_id == connector_id)
                .execution_options(synchronize_session=False)
            )
        result = await self.session.execute(
            delete(Connector)
            .where(Connector.organization_id == organization_id, Connector.id == connector_id)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def record_change(
        self, organization_id: str, connector_id: uuid.UUID, at: datetime, *, row: Connector | None = None
    ) -> int:
        """Number the change this transaction made to the connector; call it last, after the change.

        ``row``, the connector as this session holds it, is given the number without another write.
        """
        (seq,) = await self.record_changes([(organization_id, connector_id)], at)
        if row is not None:
            set_committed_value(row, "change_seq", seq)
        return seq

    async def record_changes(self, keys: Sequence[tuple[str, uuid.UUID]], at: datetime) -> Sequence[int]:
        """Number the changes this transaction made to these (organization, connector) pairs.

        Call it last, once the rows are changed (and so locked): it takes the numbers from the
        one-row counter, whose row lock is then held until the transaction ends, so numbers are
        taken in commit order and a rollback gives them back. Taking the counter after every row
        lock is what keeps two writers from waiting on each other. Writes each number into its
        connector's row (if it still exists) and the change log.
        """
        result = await self.session.execute(
            update(ChangeSequence)
            .where(ChangeSequence.id == 1)
            .values(last_seq=ChangeSequence.last_seq + len(keys))
            .returning(ChangeSequence.last_seq)
        )
        last = int(result.scalar_one())
        seqs = range(last - len(keys) + 1, last + 1)
        for seq, (organization_id, connector_id) in zip(seqs, keys, strict=True):
            await self.session.execute(
                update(Connector)
                .where(Connector.organization_id == organization_id, Connector.id == connector_id)
                .values(change_seq=seq)
                .execution_options(synchronize_session=False)
            )
        await self.session.execute(
            insert(ConnectorChange),
            [
                {"seq": seq, "organization_id": org, "connector_id": connector_id, "changed_at": at}
                for seq, (org, connector_id) in zip(seqs, keys, strict=True)
            ],
        )
        return seqs

    async def _flush_unique(self) -> None:
        try:
            await self.session.flush()
        except IntegrityError:
            raise NameTaken() from None


class ChangeRepository:
    """The change log, read across organizations by each process's follower.

    Rows name connectors, never their content; ``connectors`` reads the current rows of the
    changed connectors a process holds, each by its organization and id.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def last_seq(self) -> int:
        result = await self.session.execute(select(ChangeSequence.last_seq).where(ChangeSequence.id == 1))
        return int(result.scalar_one())

    async def since(self, cursor: int, limit: int) -> Sequence[tuple[int, str, uuid.UUID]]:
        """Changes numbered above ``cursor``, in order: (seq, organization id, connector id)."""
        result = await self.session.execute(
            select(ConnectorChange.seq, ConnectorChange.organization_id, ConnectorChange.connector_id)
            .where(ConnectorChange.seq > cursor)
            .order_by(ConnectorChange.seq)
            .limit(limit)
        )
        return [(int(seq), str(org), connector_id) for seq, org, connector_id in result.all()]

    async def connectors(self, keys: Sequence[tuple[str, uuid.UUID]]) -> Sequence[Connector]:
        """The current rows of these (organization id, connector id) pairs; deleted ones are absent."""
        if not keys:
            return []
        result = await self.session.execute(
            select(Connector).where(tuple_(Connector.organization_id, Connector.id).in_(keys))
        )
        return result.scalars().all()

    async def prune(self, before: datetime) -> int:
        """Delete changes older than ``before``; a follower that far behind reloads what it holds."""
        result = await self.session.execute(
            delete(ConnectorChange)
            .where(ConnectorChange.changed_at < before)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


class BulkRepository:
    """Adds many connectors of many organizations at once (imports, benchmarks).

    Rows arrive complete, secrets already encrypted. No change is numbered: nobody can hold a
    connector that did not exist.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_all(
        self, organizations: Sequence[dict[str, Any]], connectors: Sequence[dict[str, Any]]
    ) -> None:
        dialect = self.session.get_bind().dialect.name
        upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        if organizations:
            await self.session.execute(
                upsert(Organization).on_conflict_do_nothing(index_elements=["id"]), list(organizations)
            )
        if connectors:
            await self.session.execute(insert(Connector), list(connectors))


class RotationRepository:
    """Cross-organization access for key rotation, the one operation that spans tenants."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def batch_not_under(self, key_id: str, size: int) -> Sequence[Connector]:
        result = await self.session.execute(
            select(Connector).where(Connector.key_id != key_id).order_by(Connector.id).limit(size)
        )
        return result.scalars().all()

    async def replace_secrets(
        self,
        organization_id: str,
        connector_id: uuid.UUID,
        old_key_id: str,
        version: int,
        secrets: dict[str, str],
        key_id: str,
    ) -> bool:
        """Swap the ciphertexts if nobody changed them meanwhile: the key id and the version read
        are the witnesses (every write of secrets makes a new version, even one sealed under the
        old key by a replica whose ring still puts it first)."""
        result = await self.session.execute(
            update(Connector)
            .where(
                Connector.organization_id == organization_id,
                Connector.id == connector_id,
                Connector.key_id == old_key_id,
                Connector.version == version,
            )
            .values(secrets=secrets, key_id=key_id)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


class KeyUsageRepository:
    """Which keys the stored secrets are under, across organizations, for checking the key ring."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def key_ids(self) -> Sequence[str]:
        """Every key id stored secrets are under (the indexed ``key_id`` column), in order."""
        result = await self.session.execute(select(Connector.key_id).distinct().order_by(Connector.key_id))
        return [str(key_id) for key_id in result.scalars()]

    async def sample(self, key_id: str) -> tuple[str, uuid.UUID, dict[str, str]] | None:
        """One connector under ``key_id``: its organization, id and stored secrets."""
        result = await self.session.execute(
            select(Connector.organization_id, Connector.id, Connector.secrets)
            .where(Connector.key_id == key_id)
            .limit(1)
        )
        row = result.first()
        if row is None:
            return None
        organization_id, connector_id, secrets = row
        return str(organization_id), connector_id, dict(secrets)


class StatsRepository:
    """Aggregates over every organization, for operators: counts only, never a connector's data."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def count_by_state(self) -> dict[str, int]:
        """How many connectors are in each status state; states without connectors are absent."""
        result = await self.session.execute(
            select(Connector.status_state, func.count()).group_by(Connector.status_state)
        )
        return {str(state): int(count) for state, count in result.all()}
