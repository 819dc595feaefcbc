"""Tokens shared between replicas: several token caches (one per replica) over a real Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from app.connectors.kinds.client_auth.client_secret_basic import ClientSecretBasic
from app.core.clock import SystemClock
from app.core.crypto import KeyRing
from app.core.errors import CredentialsRejected, TokenEndpointError
from app.tokens.cache import TokenCache
from app.tokens.shared import SharedFailure, SharedToken, SharedTokenStore, SharedUnavailable
from app.tokens.types import OAuth2Config, TokenGrant
from tests.support.fakes import FakeTime
from tests.support.redis import RedisServer, reachable

T = TypeVar("T")
REDIS_URL = os.environ.get("CONNECTORS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONFIG = OAuth2Config(
    grant_type="client_credentials",
    token_url="https://idp.example.test/token",
    client_id="c",
    client_auth=ClientSecretBasic(SecretStr("CANARY-shared")),
)


async def load() -> OAuth2Config:
    return CONFIG


@dataclass
class Provider:
    """A fake identity provider shared by every replica: counts requests, can be held."""

    requests: list[str | None] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once a request has arrived (and waits at the gate, if it is closed).
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    lifetime: float = 3600.0
    fail_with: Exception | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        self.requests.append(refresh_token)
        self.asked.set()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        n = len(self.requests)
        return TokenGrant(f"access-{n}", self.lifetime, refresh_token=f"refresh-{n}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not reachable(REDIS_URL):
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not reachable and CI=true")
        pytest.skip("Redis not reachable: set CONNECTORS_TEST_REDIS_URL to run these tests")
    return REDIS_URL


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing([("k1", secrets.token_bytes(32))])


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class Replicas:
    """N token caches, each with its own Redis connection, as N replicas would have."""

    def __init__(
        self, url: str, keyring: KeyRing, provider: Provider, prefix: str, lock_timeout: float
    ) -> None:
        self.clients = []
        self.caches = []
        for _ in range(3):
            client = Redis.from_url(url)
            store = SharedTokenStore(
                client,
                keyring,
                clock=SystemClock(),
                lock_timeout=lock_timeout,
                prefix=prefix,
                poll_interval=0.01,
            )
            self.clients.append(client)
            self.caches.append(TokenCache(provider, clock=SystemClock(), shared=store, stale_min_age=0.0))

    async def close(self) -> None:
        for cache in self.caches:
            await cache.aclose()
        for client in self.clients:
            await client.aclose()


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
async def replicas(
    redis_url: str, keyring: KeyRing, provider: Provider, redis: Redis
) -> AsyncIterator[Replicas]:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    group = Replicas(redis_url, keyring, provider, prefix, lock_timeout=0.5)
    yield group
    await group.close()
    keys = [key async for key in redis.scan_iter(f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


KEY = ("0b8f8a0e-0000-4000-8000-000000000001", 1)


async def test_one_request_for_concurrent_callers_on_every_replica(
    replicas: Replicas, provider: Provider
) -> None:
    provider.gate.clear()
    calls = [asyncio.create_task(cache.get(KEY, load)) for cache in replicas.caches for _ in range(50)]
    await asyncio.sleep(0.1)
    provider.gate.set()
    tokens = await asyncio.gather(*calls)
    assert {t.access_token for t in tokens} == {"access-1"}
    assert provider.requests == [None]


async def test_a_dead_lock_holder_delays_others_by_at_most_the_lock_timeout(
    replicas: Replicas, provider: Provider, redis: Redis
) -> None:
    store = replicas.caches[0]._shared
    assert store is not None
    # A replica took the lock and was killed before answering: nobody releases it.
    assert await store.try_lock(KEY) is not None
    started = time.monotonic()
    token = await replicas.caches[1].get(KEY, load)
    waited = time.monotonic() - started
    assert token.access_token == "access-1"
    assert provider.requests == [None]
    assert 0.3 <= waited < 0.5 + 0.5


async def test_refresh_tokens_are_never_sent_twice_across_replicas(
    replicas: Replicas, provider: Provider
) -> None:
    await replicas.caches[0].get(KEY, load)
    # Each replica's copy is made stale in turn; every renewal goes through the shared store.
    for _ in range(4):
        for cache in replicas.caches:
            current = await cache.get(KEY, load)
            await cache.get(KEY, load, stale_token=current.access_token)
    sent = [token for token in provider.requests if token is not None]
    assert sent, "refresh tokens were used"
    assert len(sent) == len(set(sent))


async def test_a_token_from_another_replica_is_taken_over(replicas: Replicas, provider: Provider) -> None:
    first = await replicas.caches[0].get(KEY, load)
    others = [await cache.get(KEY, load) for cache in replicas.caches[1:]]
    assert {t.access_token for t in others} == {first.access_token}
    assert len(provider.requests) == 1


async def test_a_rejection_is_shared(replicas: Replicas, provider: Provider) -> None:
    provider.fail_with = CredentialsRejected()
    with pytest.raises(CredentialsRejected):
        await replicas.caches[0].get(KEY, load)
    for cache in replicas.caches[1:]:
        with pytest.raises(CredentialsRejected):
            await cache.get(KEY, load)
    assert len(provider.requests) == 1


async def test_a_transient_failure_is_shared_for_its_backoff(replicas: Replicas, provider: Provider) -> None:
    provider.fail_with = TokenEndpointError(provider_error="temporarily_unavailable")
    for cache in replicas.caches:
        with pytest.raises(TokenEndpointError) as raised:
            await cache.get(KEY, load)
        assert raised.value.extra.get("provider_error") == "temporarily_unavailable"
    assert len(provider.requests) == 1


async def test_tokens_in_redis_are_encrypted_and_bound(
    replicas: Replicas, provider: Provider, redis: Redis, keyring: KeyRing
) -> None:
    provider.lifetime = 600
    await replicas.caches[0].get(KEY, load)
    store = replicas.caches[0]._shared
    assert store is not None
    values = [await redis.get(key) async for key in redis.scan_iter(f"{store.prefix}:*")]
    blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in values if v)
    assert b"access-1" not in blob
    assert b"refresh-1" not in blob
    # Copied to another version's key, the entry does not decrypt: it is ignored.
    raw = await redis.get(f"{store.prefix}:token:{KEY[0]}:1")
    assert raw is not None
    await redis.set(f"{store.prefix}:token:{KEY[0]}:2", raw)
    assert (await store.read((KEY[0], 2)))[0] is None


# Redis going away, or merely slow ------------------------------------------------------------
#
# A slow Redis is made with CLIENT PAUSE ... ALL on a connection of the test's own: the server holds
# every client's commands, its own too, until the pause ends, then answers them all. A command sent
# after the pause was acknowledged is therefore answered no sooner than the pause ends, however
# busy the machine is; and a command of the test's own waits for exactly that end, with no sleep.

PAUSE_SECONDS = 1.0
# Far beyond the 250 ms after which replies used to count as failures, far within the pause.
SLOW_SECONDS = 0.5


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=30)
    yield client
    await client.aclose()


async def pause(admin: Redis, seconds: float = PAUSE_SECONDS) -> None:
    """Redis holds every command for ``seconds``: slow, not dead."""
    await admin.client_pause(int(seconds * 1000), all=True)


async def pause_over(admin: Redis) -> None:
    """Returns once the pause has ended: this command waits for that like any other."""
    await admin.ping()


def timed(durations: list[float], operation: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    async def run(*args: Any) -> T:
        started = time.monotonic()
        try:
            return await operation(*args)
        finally:
            durations.append(time.monotonic() - started)

    return run


def a_store(url: str, clock: FakeTime, errors: list[str], **options: Any) -> tuple[Redis, SharedTokenStore]:
    """A store as app.main builds it, on a client of its own (``options`` go to the client)."""
    client = Redis.from_url(url, **{"socket_timeout": 5.0, "socket_connect_timeout": 1.0, **options})
    store = SharedTokenStore(
        client, KeyRing([("k1", b"k" * 32)]), clock=clock, lock_timeout=7.0, on_error=errors.append
    )
    return client, store


async def test_a_slow_reply_is_waited_for_and_never_marks_redis_unavailable(
    own_redis: RedisServer, admin: Redis, fake_time: FakeTime
) -> None:
    errors: list[str] = []
    client, store = a_store(own_redis.url, fake_time, errors)
    keys = [(f"slow-{n}", 1) for n in range(7)]
    token = SharedToken("access-slow", 600.0, fake_time.now().timestamp())
    try:
        await pause(admin)
        started = time.monotonic()
        read, owner, locked, refresh, *_ = await asyncio.gather(
            store.read(keys[0]),
            store.try_lock(keys[1]),
            store.locked(keys[2]),
            store.take_refresh_token(keys[3]),
            store.publish_token(keys[4], token, "refresh-slow"),
            store.publish_failure(keys[5], SharedFailure("token_endpoint_timeout", False), 10.0),
            store.release(keys[6], "nobody"),
        )
        waited = time.monotonic() - started
        # Every kind of call was held by the pause, and answered once it was over.
        assert waited >= SLOW_SECONDS
        assert read == (None, None)
        assert owner is not None
        assert not locked
        assert refresh is None
        assert errors == []
        assert store.available()
        assert (await store.read(keys[4]))[0] == token
        assert await store.take_refresh_token(keys[4]) == "refresh-slow"
        assert (await store.read(keys[5]))[1] == SharedFailure("token_endpoint_timeout", False)
    finally:
        await client.aclose()


async def test_a_waiter_keeps_waiting_through_slow_replies_and_one_token_is_requested(
    own_redis: RedisServer,
    admin: Redis,
    fake_time: FakeTime,
    provider: Provider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    errors: list[str] = []
    holder_client, holder_store = a_store(own_redis.url, fake_time, errors)
    waiter_client, waiter_store = a_store(own_redis.url, fake_time, errors)
    reads: list[float] = []
    monkeypatch.setattr(waiter_store, "read", timed(reads, waiter_store.read))
    polls: list[float] = []

    async def poll(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            # The waiter found the lock taken. From now on Redis is slow: the waiter's next read
            # and the holder's publish and release are all held by the pause.
            await pause(admin)
            provider.gate.set()
            return
        await asyncio.sleep(seconds)

    waiter_store.sleep = poll
    holder = TokenCache(provider, clock=fake_time, shared=holder_store)
    waiter = TokenCache(provider, clock=fake_time, shared=waiter_store)
    try:
        provider.gate.clear()
        first = asyncio.create_task(holder.get(KEY, load))
        await provider.asked.wait()
        second = await waiter.get(KEY, load)
        assert (await first).access_token == second.access_token == "access-1"
        assert provider.requests == [None], "one token request, whatever Redis took to answer"
        assert max(reads) >= SLOW_SECONDS, "a read of the waiter was slow"
        assert errors == []
        assert holder_store.available()
        assert waiter_store.available()
    finally:
        await holder.aclose()
        await waiter.aclose()
        await holder_client.aclose()
        await waiter_client.aclose()


async def test_a_socket_timeout_marks_redis_unavailable_and_leaves_no_stale_reply_behind(
    own_redis: RedisServer, admin: Redis, fake_time: FakeTime
) -> None:
    errors: list[str] = []
    client, store = a_store(own_redis.url, fake_time, errors, socket_timeout=0.2)
    mine = ("stale-reply", 1)
    token = SharedToken("access-after", 600.0, fake_time.now().timestamp())
    try:
        await pause(admin)
        # Longer than the client's socket timeout: a real failure.
        with pytest.raises(SharedUnavailable):
            await store.read(KEY)
        assert errors == ["read"]
        assert not store.available()
        with pytest.raises(SharedUnavailable):
            await store.read(KEY)
        assert errors == ["read"], "a cooling-down store does not even try"
        await pause_over(admin)
        fake_time.advance(store.cooldown)
        assert store.available()
        # The client's connections are in order: each reply answers its own command.
        await store.publish_token(mine, token, None)
        assert await store.read(mine) == (token, None)
        assert await store.read(KEY) == (None, None)
        assert errors == ["read"]
    finally:
        await client.aclose()


async def test_a_caller_that_stops_waiting_does_not_cut_its_command_short(
    own_redis: RedisServer, admin: Redis, fake_time: FakeTime
) -> None:
    errors: list[str] = []
    client, store = a_store(own_redis.url, fake_time, errors)
    token = SharedToken("access-kept", 600.0, fake_time.now().timestamp())
    try:
        owner = await store.try_lock(KEY)
        assert owner is not None
        await pause(admin)
        # A flight stopped (shutdown, or its connector changed) while Redis was answering slowly.
        callers = [
            asyncio.create_task(store.publish_token(KEY, token, "refresh-kept")),
            asyncio.create_task(store.release(KEY, owner)),
        ]
        while len(store._commands) < len(callers):
            await asyncio.sleep(0)
        for caller in callers:
            caller.cancel()
        for caller in callers:
            with pytest.raises(asyncio.CancelledError):
                await caller
        await store.drain()
        # Both commands ran to their end: the token is stored and the lock released.
        assert await store.read(KEY) == (token, None)
        assert await store.take_refresh_token(KEY) == "refresh-kept"
        assert not await store.locked(KEY)
        assert errors == []
        assert store.available()
    finally:
        await client.aclose()


async def test_the_holder_rearms_its_lock_just_before_its_token_request(
    own_redis: RedisServer, admin: Redis, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[str] = []
    client, store = a_store(own_redis.url, fake_time, errors)
    store.lock_timeout = 60.0
    # What is left of the lock when the holder gets to its request (slow replies used the rest);
    # far from expiring, so that the test does not depend on how fast this machine is.
    left_ms = 30_000
    lock = f"{store.prefix}:lock:{KEY[0]}:{KEY[1]}"
    token = SharedToken("access-0", 600.0, fake_time.now().timestamp())
    try:
        await store.publish_token(KEY, token, "refresh-0")
        owner = await store.try_lock(KEY)
        assert owner is not None
        await admin.pexpire(lock, left_ms)
        # Taking the refresh token gives the lock its whole timeout again.
        assert await store.take_refresh_token(KEY) == "refresh-0"
        assert await admin.pttl(lock) > left_ms
        assert await admin.get(lock) == owner.encode()
        # Only the flight holding the lock re-arms it.
        await admin.pexpire(lock, left_ms)
        assert await asyncio.create_task(store.take_refresh_token(KEY)) is None
        assert await admin.pttl(lock) <= left_ms
        # The lock expired and another replica took it: its lock is left as it is, and said so.
        await admin.set(lock, "another replica", px=left_ms)
        with caplog.at_level(logging.WARNING, logger="app.tokens.shared"):
            assert await store.take_refresh_token(KEY) is None
        assert "lock expired before the token request" in caplog.text
        assert await admin.pttl(lock) <= left_ms
        await store.release(KEY, owner)
        assert await admin.get(lock) == b"another replica"
        assert errors == []
    finally:
        await client.aclose()


def test_a_client_without_a_socket_timeout_is_refused(keyring: KeyRing) -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=None)
    with pytest.raises(ValueError, match="socket_timeout"):
        SharedTokenStore(client, keyring, clock=SystemClock(), lock_timeout=7.0)


async def test_redis_down_is_not_an_outage_and_sharing_resumes(
    own_redis: RedisServer, keyring: KeyRing, provider: Provider, fake_time: FakeTime
) -> None:
    errors: list[str] = []
    client = Redis.from_url(own_redis.url, socket_timeout=2.0, socket_connect_timeout=1.0)
    store = SharedTokenStore(client, keyring, clock=fake_time, lock_timeout=7.0, on_error=errors.append)
    cache = TokenCache(provider, clock=fake_time, shared=store)
    try:
        assert (await cache.get(KEY, load)).access_token == "access-1"
        own_redis.stop()
        cache.forget(KEY[0])
        # Redis is gone: the token still comes, straight from the provider, with one error noted.
        assert (await cache.get(KEY, load)).access_token == "access-2"
        assert errors
        assert not store.available()
        own_redis.start()
        fake_time.advance(store.cooldown)
        assert store.available()
        cache.forget(KEY[0])
        assert (await cache.get(KEY, load)).access_token == "access-3"
        # Shared again: the token is in the new Redis.
        assert (await store.read(KEY))[0] is not None
    finally:
        await cache.aclose()
        await client.aclose()
