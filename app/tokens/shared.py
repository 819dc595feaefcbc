"""Tokens shared between replicas through Redis.

Each replica keeps its in-process ``TokenCache`` in front; Redis is consulted only when that cache
would otherwise ask the identity provider (a cold connector, a token due for renewal). Per
connector version, Redis holds:

``{prefix}:token:{id}:{version}``
    the current access token, encrypted with the key ring (bound to connector, version and
    field), expiring with the token;
``{prefix}:refresh:{id}:{version}``
    the refresh token, encrypted likewise; taken with ``GETDEL`` by the one replica about to send
    it, so it is never sent twice;
``{prefix}:failure:{id}:{version}``
    the last failure (its error code only), kept for the backoff, so every replica answers it
    instead of retrying on its own;
``{prefix}:lock:{id}:{version}``
    the single-flight lock: ``SET NX PX`` with a random owner value, released by a script that
    deletes it only if it still holds that value.

The guarantee
    While Redis is up, one token request is made per connector version at a time across all
    replicas: a replica that finds the lock taken polls for the token every ``poll_interval``
    until the holder publishes it, the holder's failure appears, or the lock disappears, in which
    case it takes the lock itself. The script that takes the refresh token, the holder's last
    Redis call before its request, also sets the lock's timeout to ``lock_timeout`` again (if the
    lock is still its own), so the request runs under the lock however long Redis took to answer
    before it: the request is bounded by the outbound deadline, which is shorter than
    ``lock_timeout``. A holder killed mid-request delays the others by at most ``lock_timeout``,
    after which the lock expires.

Its limits
    The lock lives on one Redis server. On a failover to a replica that had not yet received the
    lock, or after a lock expired under a holder that was merely slow, two replicas may each
    request a token once; tokens stay correct, since each is valid, but a rotating refresh token
    could then be sent by one of them after the other consumed it, and the provider may revoke
    the grant; the next renewal then runs the configured grant. Clocks of replicas are assumed to
    agree to within the token leeway (expiry crosses replicas as wall-clock time).

Redis trouble
    A slow reply is not a dead Redis. The store sets no timer of its own: every call is bounded by
    the Redis client's socket timeouts (``socket_timeout`` for each write and read,
    ``socket_connect_timeout`` for a new connection; a client without a socket timeout is
    refused), and a reply within them is simply waited for. A busy event loop or a Redis that
    pauses for a moment therefore never makes a replica go alone, and a replica polling another
    one's lock keeps waiting for that replica's token instead of asking the provider itself.

    A real failure (connection refused or reset, the client's socket timeout, any other
    ``RedisError``) marks Redis unavailable for ``cooldown`` seconds (one log line, one metric
    increment): during that time the replica works alone, with its in-process single flight, and
    tries Redis again afterwards, so sharing resumes by itself.

    Commands are never cancelled. A command cut off between sending and reading can leave its
    connection out of step with the server, and a cancellation landing in the connection pool's
    bookkeeping can lose the connection from the pool; so each command runs in a task of its own
    that a caller's cancellation (a flight stopped at shutdown or when its connector changed)
    does not reach: the command finishes, bounded by the socket timeout, and its connection goes
    back to the pool in order. A lock is thus still released when its holder stops waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry.trace import Tracer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core import tracing
from app.core.clock import Clock
from app.core.crypto import DecryptionError, KeyRing

log = logging.getLogger(__name__)

T = TypeVar("T")
CacheKey = tuple[Hashable, int]

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: lock, refresh token; ARGV: owner ('' for none), lock timeout in milliseconds.
_TAKE_REFRESH = """
local held = 0
if ARGV[1] ~= '' and redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  held = 1
end
return {held, redis.call('getdel', KEYS[2])}
"""
# A refresh token the provider did not renew stays usable for a while; bounded all the same.
REFRESH_TOKEN_TTL_SECONDS = 30 * 86_400


class SharedUnavailable(Exception):
    """Redis failed or is cooling down; the caller works alone."""


@dataclass(frozen=True, slots=True)
class SharedToken:
    access_token: str = field(repr=False)
    expires_in: float
    # Wall-clock time (epoch seconds) when its request was sent.
    sent_at: float


@dataclass(frozen=True, slots=True)
class SharedFailure:
    code: str
    rejected: bool
    provider_error: str | None = None


class SharedTokenStore:
    def __init__(
        self,
        redis: Redis,
        keyring: KeyRing,
        *,
        clock: Clock,
        lock_timeout: float,
        poll_interval: float = 0.05,
        cooldown: float = 5.0,
        prefix: str = "connectors",
        on_error: Callable[[str], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tracer: Tracer | None = None,
    ) -> None:
        """``tracer``: a span per command, naming the command only (``_run``)."""
        if redis.connection_pool.connection_kwargs.get("socket_timeout", 1.0) is None:
            # The socket timeout is the only bound on a call: without it a stalled connection
            # would hold a flight, and every replica waiting on its lock, indefinitely.
            raise ValueError("the Redis client needs a socket_timeout")
        self.redis = redis
        self.keyring = keyring
        self.clock = clock
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self.cooldown = cooldown
        self.prefix = prefix
        self.sleep = sleep
        self._on_error = on_error
        self._tracer = tracer
        self._down_until = float("-inf")
        self._release = redis.register_script(_RELEASE)
        self._take_refresh = redis.register_script(_TAKE_REFRESH)
        # The locks each flight (task) holds, by key: its owner values.
        self._owners: weakref.WeakKeyDictionary[asyncio.Task[Any], dict[CacheKey, str]] = (
            weakref.WeakKeyDictionary()
        )
        # Commands still running, some perhaps no longer awaited by anyone.
        self._commands: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_url(cls, url: str, keyring: KeyRing, **options: Any) -> SharedTokenStore:
        client = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=30)
        return cls(client, keyring, **options)

    def available(self) -> bool:
        return self.clock.monotonic() >= self._down_until

    async def drain(self) -> None:
        """Wait for commands still running whose callers stopped waiting (each is bounded by the
        client's socket timeout)."""
        while self._commands:
            await asyncio.gather(*self._commands, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.redis.aclose()

    # Operations --------------------------------------------------------------------------------

    async def read(self, key: CacheKey) -> tuple[SharedToken | None, SharedFailure | None]:
        async def run() -> tuple[SharedToken | None, SharedFailure | None]:
            token_raw, failure_raw = await self.redis.mget(self._key("token", key), self._key("failure", key))
            token = self._open(key, "token", token_raw)
            failure = self._open(key, "failure", failure_raw)
            return (
                SharedToken(**token) if token is not None else None,
                SharedFailure(**failure) if failure is not None else None,
            )

        return await self._call("read", "MGET", run)

    async def try_lock(self, key: CacheKey) -> str | None:
        """The owner value when the lock was taken, None when another replica holds it."""
        owner = secrets.token_hex(16)

        async def run() -> bool:
            return bool(await self.redis.set(self._key("lock", key), owner, nx=True, px=self._lock_ms()))

        if not await self._call("lock", "SET", run):
            return None
        flight = asyncio.current_task()
        if flight is not None:
            self._owners.setdefault(flight, {})[key] = owner
        return owner

    async def locked(self, key: CacheKey) -> bool:
        async def run() -> bool:
            return bool(await self.redis.exists(self._key("lock", key)))

        return await self._call("lock", "EXISTS", run)

    async def release(self, key: CacheKey, owner: str) -> None:
        held = self._held_by_this_flight()
        if held is not None and held.get(key) == owner:
            del held[key]

        async def run() -> None:
            await self._release(keys=[self._key("lock", key)], args=[owner])

        await self._call("unlock", "EVALSHA", run)

    async def take_refresh_token(self, key: CacheKey) -> str | None:
        """The refresh token, taken out of the store; called by the lock holder just before its
        token request, it also gives the lock its full ``lock_timeout`` again."""
        held = self._held_by_this_flight()
        owner = held.get(key, "") if held is not None else ""

        async def run() -> str | None:
            still_held, raw = await self._take_refresh(
                keys=[self._key("lock", key), self._key("refresh", key)], args=[owner, self._lock_ms()]
            )
            if owner and not still_held:
                log.warning(
                    "the single-flight lock expired before the token request; another replica may "
                    "request a token too",
                    extra={"key": repr(key), "lock_timeout_s": self.lock_timeout},
                )
            opened = self._open(key, "refresh", raw)
            return str(opened["refresh_token"]) if opened is not None else None

        return await self._call("refresh", "EVALSHA", run)

    async def publish_token(self, key: CacheKey, token: SharedToken, refresh_token: str | None) -> None:
        """Store a fresh token (and the refresh token to use next), clearing a stored failure."""
        ttl = max(1, int((token.sent_at + token.expires_in - self.clock.now().timestamp()) * 1000))

        async def run() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key("token", key), self._seal(key, "token", dataclasses.asdict(token)), px=ttl)
                pipe.delete(self._key("failure", key))
                if refresh_token is not None:
                    sealed = self._seal(key, "refresh", {"refresh_token": refresh_token})
                    pipe.set(self._key("refresh", key), sealed, ex=REFRESH_TOKEN_TTL_SECONDS)
                await pipe.execute()

        await self._call("publish", "MULTI", run)

    async def publish_failure(self, key: CacheKey, failure: SharedFailure, ttl: float) -> None:
        async def run() -> None:
            await self.redis.set(
                self._key("failure", key),
                self._seal(key, "failure", dataclasses.asdict(failure)),
                px=max(1, int(ttl * 1000)),
            )

        await self._call("publish", "SET", run)

    # Plumbing ----------------------------------------------------------------------------------

    def _key(self, kind: str, key: CacheKey) -> str:
        return f"{self.prefix}:{kind}:{key[0]}:{key[1]}"

    def _lock_ms(self) -> int:
        return max(1, int(self.lock_timeout * 1000))

    def _held_by_this_flight(self) -> dict[CacheKey, str] | None:
        flight = asyncio.current_task()
        return self._owners.get(flight) if flight is not None else None

    def _aad(self, key: CacheKey, field: str) -> bytes:
        return f"shared-token|{key[0]}|{key[1]}|{field}".encode()

    def _seal(self, key: CacheKey, field: str, value: dict[str, Any]) -> str:
        return self.keyring.encrypt(json.dumps(value), aad=self._aad(key, field))

    def _open(self, key: CacheKey, field: str, raw: bytes | str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            value = json.loads(self.keyring.decrypt(text, aad=self._aad(key, field)))
        except (DecryptionError, ValueError):
            # Written under a key this replica lacks, or not by this service: ignore it.
            log.warning("unreadable shared token entry", extra={"field": field})
            return None
        return value if isinstance(value, dict) else None

    async def _call(self, operation: str, command_name: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run one command, waiting as long as the client's socket timeouts allow; see "Redis
        trouble" in the module docstring. ``command_name`` (``MULTI`` for a transaction) names
        its span."""
        if not self.available():
            raise SharedUnavailable(operation)
        command = asyncio.create_task(self._run(operation, command_name, run), name=f"redis {operation}")
        self._commands.add(command)
        command.add_done_callback(self._finished)
        # A cancelled caller stops waiting; the command itself runs to its end.
        return await asyncio.shield(command)

    async def _run(self, operation: str, command_name: str, run: Callable[[], Awaitable[T]]) -> T:
        try:
            # The span names the command, never a key or a value: values are tokens.
            with tracing.client_span(
                self._tracer,
                command_name,
                {
                    "db.system": "redis",
                    "db.operation.name": command_name,
                    "connectors.redis.operation": operation,
                },
            ):
                return await run()
        except (RedisError, OSError, TimeoutError) as error:
            # Only failures of the connection or the server reach here: the store sets no timer,
            # so a TimeoutError is the client's socket timeout, not a slow reply cut short.
            self._down_until = self.clock.monotonic() + self.cooldown
            log.warning(
                "redis unavailable; tokens are not shared for a while",
                extra={"operation": operation, "error": type(error).__name__, "cooldown_s": self.cooldown},
            )
            if self._on_error is not None:
                self._on_error(operation)
            raise SharedUnavailable(operation) from None

    def _finished(self, command: asyncio.Task[Any]) -> None:
        self._commands.discard(command)
        if not command.cancelled():
            # Retrieved, so that a command nobody awaits any more is not reported as unretrieved;
            # a failure was logged when it happened.
            command.exception()
