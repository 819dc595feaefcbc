"""Authorization code connectors on two real ``serve`` processes over one PostgreSQL database,
without Redis: a consent started on one replica is finished on the other, and renewals from both
replicas at once never send one refresh token twice (the provider rotates them, and refuses a used
one, which would end the grant).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import _truncate_postgres, run_sync
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.consent import ProviderBrowser
from tests.support.service import (
    ServiceProcess,
    caller_token,
    free_port,
    migrate,
    running_service,
    service_env,
)
from tests.support.tls import LocalCA

USER, PASSWORD = "admin@example.com", "CANARY-admin-pw"
TOKEN_LIFETIME = 3
# Both replicas sit behind one address, as behind a load balancer: the redirect URI.
PUBLIC_URL = "https://connectors.example.com"


@pytest.fixture
def provider(server_tls: ssl.SSLContext) -> Iterator[AuthorizationServerThread]:
    with AuthorizationServerThread(server_tls, access_token_lifetime=TOKEN_LIFETIME) as server:
        server.store.add_user(USER, PASSWORD)
        server.add_clients(
            [
                RegisteredClient(
                    "replicated",
                    "CANARY-replicated-secret",
                    grant_types=("authorization_code", "refresh_token"),
                    scope="profile offline_access",
                    redirect_uris=(f"{PUBLIC_URL}/oauth/callback",),
                )
            ]
        )
        yield server


@pytest.fixture
def replicas(postgres_server: str, local_ca: LocalCA, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    run_sync(_truncate_postgres(postgres_server))
    env = service_env(postgres_server, tmp_path, ca_bundle=str(local_ca.ca_bundle), public_url=PUBLIC_URL)
    migrate(env)
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                running_service({**env, "CONNECTORS_PORT": str(free_port())}, tmp_path / f"replica-{i}.log")
            )
            for i in range(2)
        ]


def client_of(replica: ServiceProcess) -> httpx.Client:
    token = caller_token(replica.env, "org-r")
    return httpx.Client(base_url=replica.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


async def test_a_consent_started_on_one_replica_finishes_on_the_other_and_renewals_never_collide(
    replicas: list[ServiceProcess], provider: AuthorizationServerThread, local_ca: LocalCA
) -> None:
    first, second = replicas
    with client_of(first) as one, client_of(second) as two:
        created = one.post(
            "/connectors",
            json={
                "name": "Shared account",
                "resource_domain_url": provider.issuer + "/api",
                "auth": {
                    "type": "oauth2",
                    "grant_type": "authorization_code",
                    "client_id": "replicated",
                    "client_secret": "CANARY-replicated-secret",
                    "authorization_url": provider.authorization_url,
                    "token_url": provider.token_url,
                    "scope": "profile offline_access",
                },
            },
        )
        assert created.status_code == 201, created.text
        url = f"/connectors/{created.json()['id']}"
        started = one.post(f"{url}/consent").json()
        browser = ProviderBrowser(local_ca.ca_bundle)
        try:
            location = await browser.consent(started["authorization_url"], username=USER, password=PASSWORD)
        finally:
            await browser.aclose()
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL
        # The load balancer sends the browser's callback to the other replica.
        page = httpx.get(f"{second.base_url}{parts.path}?{parts.query}", timeout=10)
        assert page.status_code == 200, page.text
        assert "connected" in page.text

        # The first replica learns of it as of any change made elsewhere (its change follower;
        # with Redis, at once): bounded here by the poll interval, 1 s.
        deadline = time.monotonic() + 10
        while one.post(f"{url}/authorize").status_code != 200:
            assert time.monotonic() < deadline, "the first replica never learned of the consent"
            time.sleep(0.05)

        # Both replicas serve it; over several token lifetimes, calls on both at once make the
        # renewals race: each refresh token is sent once, and the grant never ends.
        def authorized(client: httpx.Client) -> int:
            return client.post(f"{url}/authorize").status_code

        deadline = time.monotonic() + 3 * TOKEN_LIFETIME
        answers: list[int] = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            while time.monotonic() < deadline:
                answers += pool.map(authorized, [one, two] * 4)
        assert set(answers) == {200}, sorted(set(answers))
        renewals = [token for token in provider.store.tokens[1:]]
        assert len(renewals) >= 2, "the short tokens were renewed"
        for client in (one, two):
            assert client.get(url).json()["status"]["state"] == "authorized"
            assert client.get(url).json()["auth"]["has_refresh_token"] is True
