"""Fixtures shared by the test packages that talk to real servers; conftest files import them."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import httpcore
import pytest

from app.core.clock import Clock
from app.core.outbound import OutboundClient, Resolver
from tests.support.authserver import AuthorizationServerThread
from tests.support.fakes import FakeTime
from tests.support.servers import ScriptedServer
from tests.support.tls import LocalCA


class OutboundOptions(TypedDict, total=False):
    timeout_seconds: float
    ca_bundle: Path | None
    allow_private_destinations: bool
    max_response_bytes: int
    max_attempts: int
    backoff_base_seconds: float
    resolver: Resolver | None
    clock: Clock | None
    sleep: Callable[[float], Awaitable[None]] | None
    jitter: Callable[[], float] | None
    network_backend: httpcore.AsyncNetworkBackend | None


class MakeOutbound(Protocol):
    def __call__(self, **overrides: Unpack[OutboundOptions]) -> OutboundClient: ...


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def server_tls(local_ca: LocalCA) -> ssl.SSLContext:
    return local_ca.server_context()


@pytest.fixture
def scripted_server(server_tls: ssl.SSLContext) -> Iterator[ScriptedServer]:
    with ScriptedServer(server_tls) as server:
        yield server


@pytest.fixture
def auth_server(server_tls: ssl.SSLContext) -> Iterator[AuthorizationServerThread]:
    with AuthorizationServerThread(server_tls) as server:
        yield server


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def make_outbound(local_ca: LocalCA, fake_time: FakeTime) -> AsyncIterator[MakeOutbound]:
    """Builds outbound clients that trust the test CA, wait on ``fake_time`` and close at teardown.

    Defaults: private destinations allowed (test servers live on 127.0.0.1), a 2 s deadline,
    64 KiB bodies, 3 attempts, jitter fixed at the middle of its range.
    """
    clients: list[OutboundClient] = []

    def make(**overrides: Unpack[OutboundOptions]) -> OutboundClient:
        options: OutboundOptions = {
            "timeout_seconds": 2.0,
            "ca_bundle": local_ca.ca_bundle,
            "allow_private_destinations": True,
            "max_response_bytes": 64 * 1024,
            "clock": fake_time,
            "sleep": fake_time.sleep,
            "jitter": lambda: 0.5,
        }
        options.update(overrides)
        client = OutboundClient(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def outbound(make_outbound: MakeOutbound) -> OutboundClient:
    return make_outbound()
