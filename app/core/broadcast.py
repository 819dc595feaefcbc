"""Change notices between replicas over Redis pub/sub.

A replica that changes a connector publishes its id; every other replica's change follower
(``app.connectors.follower``) reads the change log at once, so a change is served everywhere
within the time a message and one poll take, typically milliseconds. The notice carries nothing
but the hint: what changed is read from the database. Pub/sub delivers at most once: a replica
that was not subscribed (Redis down, reconnecting) misses notices, so it polls when it
subscribes again, and its follower's own interval bounds staleness regardless.

A publish is bounded by the Redis client's socket timeouts, not by a timer of its own: a slow
reply is waited for (the notice was most likely delivered; cutting the command short would only
turn it into a false error and leave its connection to be thrown away), and only a real failure
(connection refused or reset, the client's socket timeout, any other ``RedisError``) is logged
and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from opentelemetry.trace import Tracer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core import tracing

log = logging.getLogger(__name__)


class Broadcast:
    def __init__(
        self,
        redis: Redis,
        *,
        channel: str = "connectors:changes",
        retry_max: float = 5.0,
        on_error: Callable[[str], None] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """``tracer``: a span per publish (the command name only); the subscription, which lasts
        as long as the process, has none."""
        self.redis = redis
        self.channel = channel
        self.retry_max = retry_max
        self._on_error = on_error
        self._tracer = tracer
        self.subscribed = asyncio.Event()
        # Tags this process's notices, so that it does not act on its own.
        self.origin = secrets.token_hex(8)

    async def publish(self, message: str) -> None:
        """Send a notice; a failure is logged and counted, never raised (the followers' interval
        still bounds how long other replicas serve the old state)."""
        try:
            with tracing.client_span(
                self._tracer, "PUBLISH", {"db.system": "redis", "db.operation.name": "PUBLISH"}
            ):
                await self.redis.publish(self.channel, f"{self.origin} {message}")
        except (RedisError, OSError) as error:
            self._failed("publish", error)

    async def listen(self, handle: Callable[[str], None], resync: Callable[[], None]) -> None:
        """Deliver notices to ``handle`` until cancelled, resubscribing after failures.

        ``resync`` runs on every (re)subscription: notices sent meanwhile were lost.
        """
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                resync()
                self.subscribed.set()
                delay = 0.1
                async for message in pubsub.listen():
                    data = message.get("data")
                    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                    origin, _, notice = text.partition(" ")
                    if origin != self.origin:
                        handle(notice)
            except (RedisError, OSError) as error:
                self._failed("subscribe", error)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    def _failed(self, operation: str, error: BaseException) -> None:
        log.warning("redis broadcast failed", extra={"operation": operation, "error": type(error).__name__})
        if self._on_error is not None:
            self._on_error(operation)
