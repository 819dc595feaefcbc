"""Work the connector service does after answering: status writes, change notices, checks.

Every such task is kept until it ends, so that closing the service waits for all of them and
none is collected while it runs; ``notify`` tells the other replicas of a change made here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Background", "ChangeListener"]

ChangeListener = Callable[[uuid.UUID], Coroutine[Any, Any, None]]


class Background:
    def __init__(self, on_change: ChangeListener | None = None) -> None:
        """``on_change`` is told of every change committed here (``app.core.broadcast``)."""
        self._on_change = on_change
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def notify(self, connector_id: uuid.UUID) -> None:
        if self._on_change is not None:
            self.run(self._on_change(connector_id))

    async def drain(self) -> None:
        """Wait for every task under way (those they start included)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
