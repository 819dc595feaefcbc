"""Injectable time, so expiry logic is tested without sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time for timestamps, monotonic time for deadlines and expiry."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def rfc3339(at: datetime) -> str:
    """``at`` in RFC 3339, in UTC with a ``Z``, to the millisecond (as events carry times)."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
