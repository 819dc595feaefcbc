"""Memory that authorize's caches take per entry, measured with tracemalloc.

Run with ``make bench-memory`` (or ``.venv/bin/python -m benchmarks.memory [--count N]``). It
fills, in this process, the three bounded caches the service keeps: held connectors (Basic and
OAuth client credentials, as the service builds them), OAuth token entries (an 800-character
access token, about the size of a provider's JWT) and remembered caller tokens; it prints the
bytes each entry adds, LRU bookkeeping included. The server's resident size under load is
printed by the scale mode of ``benchmarks.authorize``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import secrets
import tracemalloc
import uuid
from collections.abc import Callable

from pydantic import SecretStr

from app.connectors.memory import ConnectorMemory, HeldConnector
from app.core.auth import SCOPE_AUTHORIZE, TokenVerifier, mint_token
from app.core.clock import SystemClock
from app.core.config import Settings
from app.core.crypto import KeyRing, secret_aad
from app.core.urls import origin_of
from app.tokens.basic import basic_header
from app.tokens.cache import TokenCache
from app.tokens.types import OAuth2Config, StaticCredential, TokenGrant

SETTINGS = Settings(
    encryption_keys="k1:" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="),
    jwt_secret=secrets.token_urlsafe(32),
)
KEYRING = KeyRing.from_settings(SETTINGS)


def basic(index: int) -> tuple[uuid.UUID, HeldConnector]:
    username = f"svc-user-{index}"
    header = basic_header(username, SecretStr(secrets.token_urlsafe(16)))
    url = "https://api.example.com"
    public = {"username": username, "validation_url": f"{url}/auth/check"}
    held = HeldConnector(
        f"org-{index // 5:06d}",
        1,
        0,
        url,
        origin_of(url),
        "authorized",
        "basic",
        None,
        public,
        {},
        StaticCredential(headers={"Authorization": header}),
    )
    return uuid.uuid4(), held


def oauth(index: int) -> tuple[uuid.UUID, HeldConnector]:
    connector_id, organization_id = uuid.uuid4(), f"org-{index // 5:06d}"
    aad = secret_aad(organization_id, connector_id, "client_secret")
    sealed = {"client_secret": KEYRING.encrypt(secrets.token_urlsafe(32), aad=aad)}
    public: dict[str, object] = {
        "client_id": f"client-{index}",
        "token_url": "https://idp.example.com/oauth/token",
        "scope": "read write",
        "client_auth_method": "client_secret_basic",
        "audience": None,
        "extra_token_params": {},
        "token_lifetime_seconds": None,
    }
    url = "https://api.example.com/base"
    held = HeldConnector(
        organization_id,
        1,
        0,
        url,
        origin_of(url),
        "authorized",
        "oauth2",
        "client_credentials",
        public,
        sealed,
        None,
    )
    return connector_id, held


def per_entry(count: int, fill: Callable[[], object]) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = fill()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del kept
    return used / count


def held_connectors(count: int, build: Callable[[int], tuple[uuid.UUID, HeldConnector]]) -> float:
    def fill() -> object:
        memory = ConnectorMemory(count)
        for index in range(count):
            memory.offer(*build(index))
        return memory

    return per_entry(count, fill)


class _NoRequests:
    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        raise AssertionError("no request is made")


async def token_entries(count: int) -> float:
    keys = [(uuid.uuid4(), 1) for _ in range(count)]
    cache = TokenCache(_NoRequests(), clock=SystemClock(), capacity=count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:
        await cache.seed(key, TokenGrant(secrets.token_urlsafe(600)[:800], 3600.0))
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await cache.aclose()
    return used / count


async def caller_tokens(count: int) -> float:
    verifier = TokenVerifier(SETTINGS.model_copy(update={"caller_token_cache_size": count}))
    tokens = [
        mint_token(SETTINGS, organization_id=f"org-{i:06d}", scopes=[SCOPE_AUTHORIZE]) for i in range(count)
    ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for token in tokens:
        await verifier.verify(token)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await verifier.aclose()
    return used / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="entries per cache (default 20000)")
    count = parser.parse_args().count
    print(f"bytes per entry, {count} entries each (tracemalloc):")
    print(f"  held Basic connector                 {held_connectors(count, basic):8.0f}")
    print(f"  held OAuth connector (secret sealed) {held_connectors(count, oauth):8.0f}")
    tokens = asyncio.run(token_entries(count))
    print(f"  OAuth token entry (800-char token)   {tokens:8.0f}   (the token's own bytes included)")
    print(f"  remembered caller token              {asyncio.run(caller_tokens(count)):8.0f}")


if __name__ == "__main__":
    main()
