"""Time and name resolution under the test's control."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta


class FakeTime:
    """A clock that only moves when told, and a ``sleep`` that records the wait and moves it.

    Implements ``app.core.clock.Clock``; pass ``fake.sleep`` where a sleep function is injected.
    """

    def __init__(self, start: datetime = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)) -> None:
        self._start = start
        self._elapsed = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return 1000.0 + self._elapsed

    def advance(self, seconds: float) -> None:
        self._elapsed += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        # Still yield to the loop, as a real sleep would.
        await asyncio.sleep(0)


class StaticResolver:
    """Answers from a table, counting lookups; a name missing from the table fails to resolve."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = dict(table)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return list(self.table[host])


class SequenceResolver:
    """Gives a different answer on each lookup, as a rebinding DNS server would."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self._answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        index = min(len(self.lookups), len(self._answers)) - 1
        return list(self._answers[index])
