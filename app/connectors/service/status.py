"""Writing what token requests learn of a connector's status, in the background, in order.

The token cache tells ``record_outcome`` the result of every token request it makes. The new
state is held in memory at once (authorize never waits for the database), then written with its
``connector.status_changed`` event, after the previous write of the same connector: writes of one
connector happen in the order their outcomes did. A write is a change like any other: the
follower reads the row back and the other replicas learn of it.

While the database is away, the newest status of each connector is kept (``unwritten``), with
the state stored before the first one that could not be written, and the time it was learned:
once the follower reaches the database again (``write_unwritten``) each is written with its
event and that time, unless it is no longer true of what is held, or the state changed and
changed back meanwhile.

The recorder is built before the token cache, which is given ``record_outcome``, and before the
service, which shares its memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import Hashable
from datetime import datetime

from app.audit.repository import AuditRepository
from app.connectors.events import EventRecorder
from app.connectors.memory import ConnectorMemory
from app.connectors.repository import ConnectorRepository
from app.connectors.service.background import Background
from app.connectors.service.payloads import status_change
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import DatabaseUnavailable
from app.tokens.types import CheckState

__all__ = ["StatusChange", "StatusRecorder"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class StatusChange:
    """A status learned from a token request, to be written: the state it changes ``was`` from
    (as stored), and when it was learned (``at``), which it is recorded as checked at, whenever
    it is written."""

    organization_id: str
    version: int
    was: str
    state: CheckState
    detail: str | None
    at: datetime


class StatusRecorder:
    def __init__(
        self,
        *,
        db: Database,
        memory: ConnectorMemory,
        clock: Clock,
        record_event: EventRecorder,
        background: Background,
    ) -> None:
        self.db = db
        self.memory = memory
        self.clock = clock
        self.record_event = record_event
        self.background = background
        self._writes: dict[uuid.UUID, asyncio.Task[None]] = {}
        # Statuses learned while the database was away, written once the follower reaches it.
        self.unwritten: dict[uuid.UUID, StatusChange] = {}

    async def record_outcome(self, key: Hashable, state: CheckState, detail: str | None) -> None:
        """Hold a token request's result at once; write it, in the background, when it changed."""
        if not isinstance(key, tuple) or len(key) != 2:
            return
        connector_id, version = key
        held = self.memory.peek(connector_id)
        if held is None or held.version != version or held.state == state:
            return
        was, held.state = held.state, state
        self._queue(
            connector_id, StatusChange(held.organization_id, version, was, state, detail, self.clock.now())
        )

    def write_unwritten(self) -> None:
        """The database answers again: write the statuses learned while it was away (each with
        its event), those still true of what is held."""
        pending, self.unwritten = self.unwritten, {}
        for connector_id, status in pending.items():
            held = self.memory.peek(connector_id)
            still_true = held is not None and held.version == status.version and held.state == status.state
            # A status that changed and changed back while the database was away is the one stored.
            if still_true and status.was != status.state:
                self._queue(connector_id, status)

    def _queue(self, connector_id: uuid.UUID, status: StatusChange) -> None:
        # Written in the order they happened: each write of a connector waits for the one before.
        previous = self._writes.get(connector_id)
        task = self._writes[connector_id] = self.background.run(self._write(previous, connector_id, status))
        task.add_done_callback(functools.partial(self._written, connector_id))

    def _written(self, connector_id: uuid.UUID, task: asyncio.Task[None]) -> None:
        if self._writes.get(connector_id) is task:
            del self._writes[connector_id]

    async def _write(
        self, previous: asyncio.Task[None] | None, connector_id: uuid.UUID, status: StatusChange
    ) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        # An earlier status of this version that could not be written: this one replaces it, and
        # changes from the state stored before it.
        earlier = self.unwritten.get(connector_id)
        if earlier is not None and earlier.version == status.version:
            status = dataclasses.replace(status, was=earlier.was)
            if status.was == status.state:
                # Changed and changed back while the database was away: the stored status holds.
                del self.unwritten[connector_id]
                return
        organization_id, version, state, at = status.organization_id, status.version, status.state, status.at
        try:
            async with self.db.write() as session:
                repo = ConnectorRepository(session)
                applied = await repo.set_status(
                    organization_id, connector_id, version, state=state, detail=status.detail, checked_at=at
                )
                if applied:
                    data = {
                        "connector_id": str(connector_id),
                        "organization_id": organization_id,
                        "version": version,
                        **status_change(status.was, state, status.detail, at),
                    }
                    await self.record_event(session, organization_id, "connector.status_changed", data, at=at)
                    if "consent_required" in (status.was, state):
                        # The grant was found gone (or came back): an admin must know.
                        await AuditRepository(session).record(
                            organization_id,
                            connector_id,
                            action="status",
                            actor=None,
                            changed_fields=[],
                            outcome=state,
                            detail=status.detail,
                            at=at,
                        )
                    await repo.record_change(organization_id, connector_id, self.clock.now())
        except DatabaseUnavailable:
            # Held in memory; written when the follower next reaches the database.
            self.unwritten[connector_id] = status
            return
        except Exception:
            log.exception(
                "recording a token request's outcome failed", extra={"connector": str(connector_id)}
            )
            return
        self.unwritten.pop(connector_id, None)
        if applied:
            self.background.notify(connector_id)
