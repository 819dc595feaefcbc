"""Which connectors are called, written coarsely: what a starting process loads first.

Only kept where preload is on (``CONNECTORS_PRELOAD_CONNECTORS``): nothing else reads it.
Authorize notes a held connector when it is called and was not noted in the last hour (one
comparison on the hot path). Every ``flush_interval`` seconds the noted connectors are written in
batches (``connectors.used_at``), and a connector that any replica marked within the hour is left
as it is: a connector in steady use costs one small write an hour, whatever the number of calls
and replicas. ``app.connectors.preload`` reads the most recently used connectors first, so a
new replica fills its memory with the ones its callers are about to ask for.

It is a hint: a write that fails (the database away) is dropped, and the connector is noted again
an hour later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from datetime import datetime, timedelta

from app.connectors.memory import HeldConnector
from app.connectors.repository import ConnectorRepository
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

NOTE_EVERY_SECONDS = 3600.0
# The mark of a copy never noted (shared, so a copy costs no object of its own for it).
NEVER_NOTED = float("-inf")
FLUSH_INTERVAL_SECONDS = 10.0
BATCH = 500


class UsageRecorder:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        every: float = NOTE_EVERY_SECONDS,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
    ) -> None:
        self.db = db
        self.clock = clock
        self.every = every
        self.flush_interval = flush_interval
        self._pending: set[uuid.UUID] = set()

    def noted_at(self, used_at: datetime | None) -> float:
        """The monotonic time a copy read with this ``used_at`` counts as noted at."""
        if used_at is None:
            return NEVER_NOTED
        return self.clock.monotonic() - (self.clock.now() - used_at).total_seconds()

    def note(self, connector_id: uuid.UUID, held: HeldConnector) -> None:
        """A call of a held connector: noted at most once per ``every`` seconds per copy."""
        now = self.clock.monotonic()
        if now - held.used_noted >= self.every:
            held.used_noted = now
            self._pending.add(connector_id)

    async def run(self) -> None:
        """Write what was noted every ``flush_interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception as error:  # a hint: never worth stopping the process's work
                log.warning("connector usage not written", extra={"error": type(error).__name__})

    async def flush(self) -> int:
        """Write the noted connectors now; returns how many were written (or found recent)."""
        pending, self._pending = self._pending, set()
        now = self.clock.now()
        written = 0
        ids = iter(pending)
        while batch := list(itertools.islice(ids, BATCH)):
            try:
                async with self.db.write() as session:
                    await ConnectorRepository(session).mark_used(
                        batch, now, not_since=now - timedelta(seconds=self.every)
                    )
            except DatabaseUnavailable:
                log.info(
                    "connector usage not written: the database is unavailable",
                    extra={"dropped": len(pending) - written},
                )
                return written
            written += len(batch)
        return written
