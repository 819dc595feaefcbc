"""Tokens shared between replicas: several token caches (one per replica) over a real Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from app.core.clock import SystemClock
from app.core.crypto import KeyRing
from app.core.errors import CredentialsRejected, TokenEndpointError
from app.tokens.cache import TokenCache
from app.tokens.shared import SharedTokenStore
from app.tokens.types import OAuth2Config, TokenGrant
from tests.support.redis import RedisServer, reachable

REDIS_URL = os.environ.get("CONNECTORS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONFIG = OAuth2Config(
    grant_type="client_credentials",
    token_url="https://idp.example.test/token",
    client_id="c",
    client_secret=SecretStr("CANARY-shared"),
)


async def load() -> OAuth2Config:
    return CONFIG


@dataclass
class Provider:
    """A fake identity provider shared by every replica: counts requests, can be held."""

    requests: list[str | None] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    lifetime: float = 3600.0
    fail_with: Exception | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        self.requests.append(refresh_token)
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


# Redis going away ------------------------------------------------------------------------------


async def test_redis_down_is_not_an_outage_and_sharing_resumes(
    own_redis: RedisServer, keyring: KeyRing, provider: Provider
) -> None:
    errors: list[str] = []
    client = Redis.from_url(own_redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    store = SharedTokenStore(
        client, keyring, clock=SystemClock(), lock_timeout=1.0, cooldown=0.2, on_error=errors.append
    )
    cache = TokenCache(provider, clock=SystemClock(), shared=store)
    try:
        assert (await cache.get(KEY, load)).access_token == "access-1"
        own_redis.stop()
        cache.forget(KEY[0])
        # Redis is gone: the token still comes, straight from the provider, with one error noted.
        assert (await cache.get(KEY, load)).access_token == "access-2"
        assert errors
        assert not store.available()
        own_redis.start()
        await asyncio.sleep(0.25)
        assert store.available()
        cache.forget(KEY[0])
        assert (await cache.get(KEY, load)).access_token == "access-3"
        # Shared again: the token is in the new Redis.
        assert (await store.read(KEY))[0] is not None
    finally:
        await cache.aclose()
        await client.aclose()
