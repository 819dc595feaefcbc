"""Python's full garbage collections on a schedule, instead of whenever allocations add up.

A process holding 100,000 connectors keeps about a million objects alive for a long time, and
CPython's collector examines every one of them in each full collection. It starts one by itself
once a quarter more long-lived objects have arrived since the last: with steady turnover of held
connectors (more connectors in use than the cache holds) that was every few seconds, each pause
100-200 ms, and it made most of authorize's p99 and a quarter of its CPU in that case
(``benchmarks/scale.py``, part (b)). Held connectors form no reference cycles: a full collection
finds next to nothing to free. The young generations still collect short-lived cycles as before.

``FullCollections`` turns the automatic full collection off while the application runs, runs one
every ``interval`` seconds instead, and puts the previous thresholds back when it stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Final

__all__ = ["FullCollections"]

log = logging.getLogger(__name__)

# Full collections after this many collections of the middle generation: never, in practice.
_NEVER: Final = 1_000_000_000


class FullCollections:
    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.runs = 0
        self._previous: tuple[int, int, int] | None = None

    def start(self) -> None:
        young, middle, full = gc.get_threshold()
        self._previous = (young, middle, full)
        gc.set_threshold(young, middle, _NEVER)

    def stop(self) -> None:
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None

    async def run(self) -> None:
        """A full collection every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.collect()

    def collect(self) -> int:
        started = time.perf_counter()
        found = gc.collect()
        self.runs += 1
        log.info(
            "full garbage collection",
            extra={"collected": found, "seconds": round(time.perf_counter() - started, 3)},
        )
        return found
