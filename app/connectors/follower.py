"""The change follower: one per process, it keeps the connectors held in memory current.

Every write that changes a connector numbers its change (``ConnectorRepository.record_change``):
numbers come from a one-row counter whose lock is held until the writing transaction ends, so
they are taken in commit order and have no gaps. The follower remembers the last number it
applied (its cursor) and, once per ``interval``, reads the counter: one tiny query whatever the
number of connectors. Only when it moved does it read the changes above the cursor (indexed) and
the rows of the changed connectors this process holds, and replace those copies; changes of
connectors it does not hold cost nothing more. Numbers missing from what it reads can only have
been pruned while this process was away from the database that long, and a counter below the
cursor means a restored database: in both cases it reads everything it holds again.

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
from app.core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# Applies the rows of the changed connectors that are held; the second argument lists every
# (organization id, connector id) that was asked for, so that an absent row means deleted; the
# third says to replace copies even when they carry a higher change number (a restored database).
Apply = Callable[[Sequence[Connector], Sequence[tuple[str, uuid.UUID]], bool], None]
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
        reached: Callable[[], None] | None = None,
    ) -> None:
        """``reached`` is told after every poll that reached the database (it is back)."""
        self.db = db
        self._reached = reached
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
                last = await repo.last_seq()
                changes: Sequence[tuple[int, str, uuid.UUID]] = []
                full = force = False
                if self.cursor is None:
                    # The first poll: whatever was held before it (writes made while the database
                    # was away at start) is read again.
                    full, cursor = True, last
                elif last < self.cursor:
                    # The counter went back (a restored database): nothing held can be trusted.
                    log.warning("the change counter went back; refreshing every held connector")
                    full = force = True
                    cursor = last
                elif last == self.cursor:
                    cursor = last
                else:
                    changes = await repo.since(self.cursor, self.batch)
                    expected = range(self.cursor + 1, self.cursor + 1 + len(changes))
                    if changes and [seq for seq, _, _ in changes] == list(expected):
                        cursor = changes[-1][0]
                    else:
                        # Numbers have no gaps: missing ones were pruned before this process read
                        # them. What it holds is read again, as of now.
                        log.warning("missed changes were pruned; refreshing every held connector")
                        full, cursor = True, last
                # Asked in every case: a load running now must not keep what it read before a change.
                wanted = self._select([(org, connector_id) for _, org, connector_id in changes])
                if full:
                    wanted = self._held()
                rows = await self._read(session, wanted)
            self._apply(rows, wanted, force)
            self.cursor = cursor
            self.last_success = self.clock.monotonic()
            seen += len(changes)
            if full or len(changes) < self.batch:
                if self._reached is not None:
                    self._reached()
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
            except DatabaseUnavailable:
                pass  # logged once by app.core.db; tried again next time
            except Exception:
                log.exception("following connector changes failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def prune(self) -> None:
        """Delete changes older than ``retention`` every ``prune_every`` seconds, until cancelled.

        A task of its own, so that a slow delete never holds up a poll.
        """
        while True:
            try:
                async with self.db.write() as session:
                    await ChangeRepository(session).prune(self.clock.now() - self.retention)
            except DatabaseUnavailable:
                pass
            except Exception:
                log.exception("pruning connector changes failed")
            await asyncio.sleep(self.prune_every)
