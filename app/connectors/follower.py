"""The change follower: one per process, it keeps the connectors held in memory current.

Every write that changes a connector numbers its change (``ConnectorRepository.record_change``):
numbers come from a one-row counter whose lock is held until the writing transaction ends, so
they are taken in commit order and have no gaps. The follower remembers the last number it
applied (its cursor) and, once per ``interval``, asks for the changes above it: one indexed
query whatever the number of connectors. For the changed connectors this process holds it reads
their rows in one more query and replaces the copies; changes of connectors it does not hold
cost nothing more. A gap in the numbers can only mean that old changes were pruned while this
process was away from the database that long: it then refreshes everything it holds.

``wake`` makes it poll at once: a replica that wrote a change tells the others over Redis
(``app.core.broadcast``), so a change reaches every replica within milliseconds; without such a
push it is seen within ``interval`` plus one query. The process that made a change holds the new
copy at once, without waiting for its follower.

``last_success`` is when the follower last heard from the database. The service answers from
memory only while that is at most ``max_staleness`` ago: past it, what is held may be out of
date, and authorize answers ``database_unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app.connectors.models import Connector
from app.connectors.repository import ChangeRepository
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import AppError

log = logging.getLogger(__name__)

# Applies the rows of the changed connectors that are held; the second argument lists every
# (organization id, connector id) that was asked for, so that an absent row means deleted.
Apply = Callable[[Sequence[Connector], Sequence[tuple[str, uuid.UUID]]], None]
# Which of the changed connectors this process holds (and so must read again).
Select = Callable[[Sequence[tuple[str, uuid.UUID]]], Sequence[tuple[str, uuid.UUID]]]
# Every connector held, for a full refresh.
Held = Callable[[], Sequence[tuple[str, uuid.UUID]]]


class ChangeFollower:
    def __init__(
        self,
        db: Database,
        *,
        clock: Clock,
        select: Select,
        apply: Apply,
        held: Held,
        interval: float = 1.0,
        batch: int = 1000,
        retention: timedelta = timedelta(days=1),
        prune_every: float = 600.0,
    ) -> None:
        self.db = db
        self.clock = clock
        self.interval = interval
        self.batch = batch
        self.retention = retention
        self.prune_every = prune_every
        self._select = select
        self._apply = apply
        self._held = held
        self.cursor: int | None = None
        # clock.monotonic() of the last poll that reached the database.
        self.last_success = -math.inf
        self._wake = asyncio.Event()
        self._pruned_at = -math.inf

    def wake(self) -> None:
        """Poll now (a change notice arrived)."""
        self._wake.set()

    def age(self) -> float:
        """Seconds since the database last answered a poll."""
        return self.clock.monotonic() - self.last_success

    async def poll(self) -> int:
        """Apply every change committed since the last poll; the number of changes read.

        Raises what the database raises (``DatabaseUnavailable`` when it is away).
        """
        seen = 0
        while True:
            async with self.db.read() as session:
                repo = ChangeRepository(session)
                if self.cursor is None:
                    # The first poll: everything held was loaded after this point.
                    self.cursor = await repo.last_seq()
                    changes: Sequence[tuple[int, str, uuid.UUID]] = []
                else:
                    changes = await repo.since(self.cursor, self.batch)
                full = bool(changes) and changes[0][0] != self.cursor + 1
                if full:
                    log.warning(
                        "changes were pruned before this process read them; refreshing every held connector",
                        extra={"cursor": self.cursor, "next": changes[0][0]},
                    )
                    wanted = self._held()
                else:
                    wanted = self._select([(org, connector_id) for _, org, connector_id in changes])
                rows = await self._read(session, wanted)
            self.last_success = self.clock.monotonic()
            self._apply(rows, wanted)
            if changes:
                self.cursor = changes[-1][0]
            seen += len(changes)
            if len(changes) < self.batch:
                return seen

    async def _read(self, session: AsyncSession, wanted: Sequence[tuple[str, uuid.UUID]]) -> list[Connector]:
        repo = ChangeRepository(session)
        rows: list[Connector] = []
        for start in range(0, len(wanted), self.batch):
            rows.extend(await repo.connectors(wanted[start : start + self.batch]))
        return rows

    async def run(self) -> None:
        """Poll every ``interval`` (or at once when woken) until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.poll()
                await self._prune()
            except AppError:
                pass  # the database is away: logged once by app.core.db; tried again next time
            except Exception:
                log.exception("following connector changes failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _prune(self) -> None:
        now = self.clock.monotonic()
        if now - self._pruned_at < self.prune_every:
            return
        self._pruned_at = now
        async with self.db.write() as session:
            await ChangeRepository(session).prune(self.clock.now() - self.retention)
