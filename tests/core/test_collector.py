"""Full garbage collections on a schedule (``app.core.collector``): off by allocation counts while
the application runs, run every interval instead, and Python's thresholds back afterwards."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from app.core.collector import FullCollections
from app.core.config import Settings
from app.main import create_app


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_application_turns_automatic_full_collections_off_while_it_runs(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings
) -> None:
    before = gc.get_threshold()
    await app_factory(settings)
    young, middle, full = gc.get_threshold()
    assert (young, middle) == before[:2] and full > 1_000_000


async def test_stopping_the_application_stops_its_scheduled_collections(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        (scheduled,) = [task for task in asyncio.all_tasks() if task.get_name() == "full collections"]
    assert scheduled.done()


async def test_python_keeps_its_own_schedule_when_told_so(
    app_factory: Callable[..., Awaitable[Any]], settings: Settings
) -> None:
    before = gc.get_threshold()
    app = await app_factory(settings.model_copy(update={"full_gc_interval_seconds": 0}))
    assert app.state.services.collector is None and gc.get_threshold() == before


async def test_a_full_collection_runs_every_interval_and_stopping_restores_the_thresholds() -> None:
    before = gc.get_threshold()
    collector = FullCollections(0.01)
    collector.start()
    freed = asyncio.Event()
    # A reference cycle that only a collection frees, old enough to have left the young generations.
    cycle = _Cycle()
    weakref.finalize(cycle, freed.set)
    gc.collect()
    del cycle
    task = asyncio.create_task(collector.run())
    try:
        await asyncio.wait_for(freed.wait(), timeout=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        collector.stop()
    assert collector.runs >= 1
    assert gc.get_threshold() == before
