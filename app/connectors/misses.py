"""Authorize's misses, loaded together: the connectors asked for while a query runs share the next.

A process that holds few of the connectors it is asked for (a new replica, or more connectors in
use than its cache holds) would otherwise send one query per miss, each with a session and a
connection check of its own. ``Misses`` keeps one query in flight: every miss that arrives while
it runs waits for the next, which asks for all of them at once (``id IN (...)``, at most
``batch`` ids). Under load the misses of a whole round trip cost one query; alone, a miss costs
what it did.

It returns rows, not copies to hold: ``ConnectorMemory`` still decides what is held, and a row of
another organization than the one asking is answered as missing to the caller who asked.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence

from app.connectors.models import Connector

Fetch = Callable[[Sequence[uuid.UUID]], Awaitable[Sequence[Connector]]]


class Misses:
    def __init__(self, fetch: Fetch, *, batch: int = 500) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._fetch = fetch
        self._batch = batch
        self._waiting: dict[uuid.UUID, asyncio.Future[Connector | None]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> Connector | None:
        """The connector's row if it is this organization's, else None; shared with every other
        caller asking for it meanwhile."""
        waiting = self._waiting.get(connector_id)
        if waiting is None:
            loop = asyncio.get_running_loop()
            waiting = self._waiting[connector_id] = loop.create_future()
            # Retrieved here too: a failed query whose callers all gave up is not an unhandled error.
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
            if self._runner is None:
                self._runner = loop.create_task(self._run())
        # Shielded: a caller that gives up does not cancel the query the others wait for.
        row = await asyncio.shield(waiting)
        return row if row is not None and row.organization_id == organization_id else None

    async def _run(self) -> None:
        try:
            # The misses of this turn of the event loop join the first query.
            await asyncio.sleep(0)
            while self._waiting:
                ids = list(itertools.islice(self._waiting, self._batch))
                futures = [self._waiting.pop(connector_id) for connector_id in ids]
                try:
                    rows = await self._fetch(ids)
                except Exception as error:
                    for future in futures:
                        if not future.done():
                            future.set_exception(error)
                    continue
                except asyncio.CancelledError:
                    for future in futures:
                        future.cancel()
                    raise
                found = {row.id: row for row in rows}
                for connector_id, future in zip(ids, futures, strict=True):
                    if not future.done():
                        future.set_result(found.get(connector_id))
        finally:
            self._runner = None

    async def aclose(self) -> None:
        runner = self._runner
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
