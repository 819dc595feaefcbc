"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI document.

A real uvicorn server (in a thread, on SQLite) answers them; no generated request may produce a
500, a response that breaks the documented schema, or a leaked secret.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.core.auth import mint_token
from app.core.config import Settings
from app.core.outbound import OutboundClient
from app.main import Overrides, create_app
from app.migrations import upgrade
from tests.conftest import CANARY, run_sync


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server:
    def __init__(self, config: Settings, overrides: Overrides) -> None:
        self.port = _free_port()
        app = create_app(config, overrides)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite+aiosqlite:///{directory / 'fuzz.db'}"
    run_sync(upgrade(url))
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    config = Settings(
        database_url=url,
        data_dir=directory,
        jwt_secret=secrets.token_urlsafe(32),
        encryption_keys=f"k1:{key}",
        allow_private_destinations=True,
        outbound_timeout_seconds=0.5,
        access_log=False,
    )
    token = mint_token(
        config,
        organization_id="fuzz-org",
        scopes=["connectors:read", "connectors:write", "connectors:authorize"],
    )

    # Every name resolves to 127.0.0.1, where nothing listens on 443: live checks and /validate
    # fail fast on loopback, and no generated host name ever reaches a real resolver.
    async def loopback(_host: str, _port: int) -> list[str]:
        return ["127.0.0.1"]

    outbound = OutboundClient(
        timeout_seconds=0.5,
        ca_bundle=None,
        allow_private_destinations=True,
        max_response_bytes=64 * 1024,
        resolver=loopback,
    )
    with _Server(config, Overrides(outbound=outbound)) as base:
        yield base, token
    run_sync(outbound.aclose())


# The document needs no running app: build it from an app that is never started.
_DOCUMENT = create_app(Settings(jwt_secret="x" * 32, encryption_keys="k1:" + "A" * 43)).openapi()
schema = schemathesis.openapi.from_dict(_DOCUMENT)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_documented_responses(case: Any, live: tuple[str, str]) -> None:
    base, token = live
    case.headers = {**dict(case.headers or {}), "Authorization": f"Bearer {token}"}
    # validate=false keeps generated creates from calling out; every other query value is kept.
    if case.query is not None and "validate" in case.query:
        case.query["validate"] = "false"
    response = case.call(base_url=base)
    assert response.status_code != 500, response.text
    assert CANARY not in response.text
    # The schema cannot express every rule (a host must be a valid name, say), so valid-looking
    # data may be refused with a 422; and a documented 502/504 from an unreachable upstream is
    # not a server error (the 500 check is above). Everything else is checked.
    case.validate_response(response, excluded_checks=[positive_data_acceptance, not_a_server_error])
    if response.status_code >= 400:
        assert "application/problem+json" in str(response.headers.get("content-type"))


def test_openapi_documents_the_auth_union(live: tuple[str, str]) -> None:
    base, _ = live
    document = httpx.get(f"{base}/openapi.json").json()
    create = document["components"]["schemas"]["ConnectorCreate"]["properties"]["auth"]
    assert create["discriminator"]["propertyName"] == "type"
    schemas = document["components"]["schemas"]
    assert create["discriminator"]["mapping"] == {
        "basic": "#/components/schemas/BasicAuthIn",
        "oauth2": "#/components/schemas/OAuth2AuthIn",
    }
    assert schemas["OAuth2AuthIn"]["discriminator"]["propertyName"] == "grant_type"
    for name in ("BasicAuthIn", "OAuth2ClientCredentialsIn", "OAuth2PasswordIn"):
        assert schemas[name]["examples"], name
    assert schemas["BasicAuthIn"]["properties"]["password"]["writeOnly"] is True
