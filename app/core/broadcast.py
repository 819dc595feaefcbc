"""Change notices between replicas over Redis pub/sub.

A replica that changes a connector publishes its id; every replica (itself included) drops its
cached copy and tokens of that connector, so a change is served everywhere within the time a
message takes, typically milliseconds. Pub/sub delivers at most once: a replica that was not
subscribed (Redis down, reconnecting) misses notices, so it drops all its copies when it
subscribes again, and the version check in ``ConnectorService`` bounds staleness regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Broadcast:
    def __init__(
        self,
        redis: Redis,
        *,
        channel: str = "connectors:changes",
        op_timeout: float = 0.5,
        retry_max: float = 5.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.op_timeout = op_timeout
        self.retry_max = retry_max
        self._on_error = on_error
        self.subscribed = asyncio.Event()

    async def publish(self, message: str) -> None:
        """Send a notice; a failure is logged and counted, never raised (the version check
        still bounds how long other replicas serve the old state)."""
        try:
            async with asyncio.timeout(self.op_timeout):
                await self.redis.publish(self.channel, message)
        except (RedisError, OSError, TimeoutError) as error:
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
                    if isinstance(data, bytes):
                        handle(data.decode())
                    elif isinstance(data, str):
                        handle(data)
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
