"""Filling a starting process's memory: the connectors called lately first, then the others.

``Preload`` reads connectors a page at a time and holds them (``ConnectorMemory.fill``) until
the memory is full or every connector was read: first those called lately
(``app.connectors.usage``), most recent first, then the others by their last change. It never
replaces a held copy nor pushes one out, and leaves out a connector whose change arrives while
its page is read (its next call loads it). It stops at the first failure (the database away):
the connectors it did not read are loaded by their first calls.

*Called lately* are the connectors with a usage mark, most recently called first: marks are
never cleared, so this is every connector called since marks were kept, bounded by the memory's
size.

The process says it is *starting* (``/readyz`` answers 503) until the connectors called lately
are held, for at most ``ready_wait`` seconds: a load balancer then sends it traffic once the
connectors its callers are about to ask for are in memory. Without it, each of them is loaded by
its first call under full load, and the last of those misses wait many turns of a busy event
loop (a new replica's p99 stayed above the warm one's for 15-20 s). The first page is read before
the process serves (``first``): a process with few connectors is never *starting* at all. The
others are read in the background (``rest``), those not called lately slowly, while the process
serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from app.connectors.memory import ConnectorMemory, HeldConnector
from app.connectors.models import Connector
from app.connectors.repository import ConnectorRepository
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import DatabaseUnavailable

__all__ = ["PAGE", "Preload"]

log = logging.getLogger(__name__)

# Connectors read per query: a page's rows are made into objects at once, so small enough to keep
# requests waiting a few milliseconds only.
PAGE = 50
# Rows made ready between two turns of the event loop.
CHUNK = 20
# Connectors not called lately are read while the process already takes its share of the
# traffic: 10 per query, a query every 0.1 s (about 100 a second), so that no page holds the
# event loop (or, reading it, the interpreter) for more than a fraction of a millisecond. At 50
# per query every 0.25 s, a new replica's p99 under full load stayed 2-4 ms above the warm one's
# for the minute measured (make bench-scale, part (c)).
UNUSED_PAGE = 10
UNUSED_PAUSE = 0.1


class Preload:
    def __init__(
        self,
        db: Database,
        memory: ConnectorMemory,
        hold: Callable[[Connector], HeldConnector],
        clock: Clock,
        *,
        ready_wait: float,
        page: int | None = None,
        unused_page: int = UNUSED_PAGE,
        unused_pause: float = UNUSED_PAUSE,
    ) -> None:
        """``hold`` makes a row into the copy memory holds; ``ready_wait``: at most this many
        seconds after ``first`` the process says it is starting (0: never); ``page``: rows per
        query (``PAGE``)."""
        self.db = db
        self.memory = memory
        self.hold = hold
        self.clock = clock
        self.page = page or PAGE
        self.unused_page = unused_page
        self.unused_pause = unused_pause
        self.ready_wait = ready_wait
        self.held = 0
        # Reading the connectors called lately (True), then the others (False), then done (None).
        self.used: bool | None = True
        self._before: tuple[object, ...] | None = None
        self._started = time.monotonic()
        self._ready_by = -1.0

    def starting(self) -> str | None:
        """Why the process is not yet worth routing to, or None."""
        if self.used is not True or self.clock.monotonic() >= self._ready_by:
            return None
        return f"loading the connectors called lately ({self.held:,} held so far)"

    async def first(self) -> None:
        """Read the first page, before the process serves; a database that is away ends it."""
        self._started = time.monotonic()
        self._ready_by = self.clock.monotonic() + self.ready_wait
        try:
            await self.step()
        except DatabaseUnavailable:
            self._stopped()
        except Exception as error:
            # A hint, not a condition of serving: a process that cannot preload still serves.
            self._failed(error)

    async def rest(self) -> None:
        """Read the other pages while the process serves."""
        try:
            while self.used is not None:
                # Connectors not called lately may wait: at most a share of the CPU for them.
                await asyncio.sleep(0 if self.used else self.unused_pause)
                await self.step()
        except DatabaseUnavailable:
            self._stopped()
        except Exception as error:
            self._failed(error)

    async def run(self) -> int:
        """``first``, then ``rest`` (a preload of its own, as the tests run one); how many
        connectors it held."""
        await self.first()
        await self.rest()
        return self.held

    async def step(self) -> None:
        """Read and hold one page, and move to the next phase once a phase is read or memory full."""
        used = self.used
        if used is None:
            return
        size = self.page if used else self.unused_page
        rows: Sequence[Connector] = []
        if not self.memory.full():
            with self.memory.watch() as changed:
                page = ConnectorRepository.select_recent(size, self._before, used=used)
                rows = await self.db.scalars(page)
                await self._hold(rows, changed)
        if len(rows) == size and not self.memory.full():
            self._before = ConnectorRepository.recent_key(rows[-1], used=used)
            return
        self._before = None
        if used:
            self.used = False
            log.info("connectors called lately preloaded", extra={"held": self.held, "seconds": self._took()})
        else:
            self.used = None
            log.info("connectors preloaded", extra={"held": self.held, "seconds": self._took()})

    async def _hold(self, rows: Sequence[Connector], changed: set[uuid.UUID]) -> None:
        """Hold a page's connectors but those ``changed`` since it was read."""
        for index, row in enumerate(rows, 1):
            if row.id not in changed:
                self.held += self.memory.fill(row.id, self.hold(row))
            if index % CHUNK == 0:
                # The requests that arrived meanwhile go first.
                await asyncio.sleep(0)

    def _stopped(self) -> None:
        self.used = None
        log.info("preloading connectors stopped: the database is unavailable", extra={"held": self.held})

    def _failed(self, error: Exception) -> None:
        self.used = None
        # The class only: a message could quote what was being read.
        log.warning("preloading connectors failed", extra={"held": self.held, "error": type(error).__name__})

    def _took(self) -> float:
        return round(time.monotonic() - self._started, 2)
