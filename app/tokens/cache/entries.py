"""What the token cache keeps per connector: the token with its schedule, the refresh token, the
one token request under way (the flight), and the failure to replay until its backoff has passed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

from app.core.errors import AppError
from app.tokens.types import IssuedToken

CacheKey = tuple[Hashable, int]

_NEVER = -math.inf


def _running(entry: _Entry) -> asyncio.Task[IssuedToken] | None:
    """The entry's token request if it is still running.

    A finished flight stays on the entry until its done-callback runs on a later turn of the
    loop; joining it then would hand out the result of a request that may be long past.
    """
    flight = entry.flight
    return flight if flight is not None and not flight.done() else None


def _detached(error: AppError) -> AppError:
    """A copy of ``error`` without traceback, cause or context: safe to keep and to raise again."""
    cls = type(error)
    clone = cls.__new__(cls, *error.args)
    clone.__dict__.update(error.__dict__)
    return clone


@dataclass(frozen=True, slots=True)
class _Token:
    issued: IssuedToken
    usable_until: float
    refresh_at: float
    # clock.monotonic() when the token arrived here.
    received_at: float


@dataclass(slots=True, eq=False)
class _Entry:
    version: int
    token: _Token | None = None
    refresh_token: str | None = field(default=None, repr=False)
    flight: asyncio.Task[IssuedToken] | None = None
    # A caller awaits the flight: it must not be cancelled when the entry is dropped.
    joined: bool = False
    rejected: AppError | None = None
    failure: AppError | None = None
    failures: int = 0
    retry_at: float = _NEVER
    # The last token a caller reported refused: a shared copy of it is not taken over.
    stale: str | None = field(default=None, repr=False)
