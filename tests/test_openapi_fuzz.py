"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI document.

A real uvicorn server (in a thread) answers them, on SQLite and on PostgreSQL, with a real caller
token. Every check schemathesis has is on: no 5xx but the documented upstream failures, every
answer as documented (status, media type, headers, body), schema-valid requests accepted and
others refused, the token enforced. Each operation runs its examples, generated positive and
negative cases and its coverage cases; then the stateful phase follows the document's links from
created connectors to reads, changes, checks, history, authorize and delete.

A few refusals are intended and listed in the README, because no schema can state them
(``INTENDED_REFUSALS``); history that stays readable after a delete is the one use-after-free
the README promises. Runs are bounded and derandomized, so the same requests are made each time.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.core.auth import mint_token
from app.core.config import Settings
from app.core.outbound import OutboundClient
from app.main import Overrides, create_app
from app.migrations import upgrade
from tests.conftest import CANARY, run_sync

_JWT_SECRET = secrets.token_urlsafe(32)
_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _settings(database_url: str, data_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        jwt_secret=_JWT_SECRET,
        encryption_keys=f"k1:{_KEY}",
        allow_private_destinations=True,
        outbound_timeout_seconds=0.5,
        access_log=False,
        max_connectors_per_org=1000,
    )


# The document needs no running app: build it from an app that is never started.
_DOCUMENT = create_app(_settings("sqlite+aiosqlite:///unused.db", Path("."))).openapi()
_TOKEN = mint_token(
    _settings("sqlite+aiosqlite:///unused.db", Path(".")),
    organization_id="fuzz-org",
    scopes=["connectors:read", "connectors:write", "connectors:authorize"],
    ttl_seconds=3600,
)

# Each live check calls a generated host, which resolves to 127.0.0.1 where nothing listens on
# its port: a documented 502 (or a 504), never a 500 or a 503.
_UPSTREAM_FAILURES = ["502", "504"]
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"deterministic": True, "max-examples": 12},
        "phases": {"stateful": {"max-steps": 8}},
        "auth": {"openapi": {"bearerAuth": {"bearer": _TOKEN}}},
        "checks": {
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", *_UPSTREAM_FAILURES]},
            # Replaced by ``accepted_unless_intended`` below.
            "positive_data_acceptance": {"enabled": False},
        },
        "operations": [
            {
                # Generating coverage cases from the URL patterns takes minutes (nested repetitions
                # of escapes); the fuzzing phase covers these two with generated cases instead.
                "include-operation-id": ["createConnector", "updateConnector"],
                "phases": {"coverage": {"enabled": False}},
            },
            {
                # History stays readable after a delete (README, "Audit trail").
                "include-operation-id": "getConnectorHistory",
                "checks": {"use_after_free": {"enabled": False}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(_DOCUMENT, config=CONFIG)


# Refusals of schema-valid requests that the README lists as intended, by operation: each takes
# the status and the problem body and says whether the refusal is one of them.
INTENDED_REFUSALS: dict[str, Callable[[int, dict[str, Any]], bool]] = {
    # A stale or unknown If-Match: the precondition failed, the request was fine.
    "updateConnector": lambda status, body: status == 412,
    "deleteConnector": lambda status, body: status == 412,
    # What the path becomes once decoded or normalised (README, "Paths given to /authorize").
    "authorizeConnector": lambda status, body: body.get("code") == "path_outside_resource_domain",
}


def _operation(case: schemathesis.Case) -> dict[str, Any]:
    operation: dict[str, Any] = _DOCUMENT["paths"][case.operation.path][case.method.lower()]
    return operation


def _parameters_as_documented(case: schemathesis.Case) -> bool:
    """Whether every parameter sent matches its documented pattern.

    The coverage phase may mark a case positive although it carries a value its generator drew
    as a negative one (an optional header whose pattern it cannot satisfy): such a case is not a
    schema-valid request, whatever its label says.
    """
    sent = {
        "path": case.path_parameters or {},
        "query": case.query or {},
        "header": {name.lower(): value for name, value in (case.headers or {}).items()},
    }
    for parameter in _operation(case).get("parameters", []):
        name = parameter["name"].lower() if parameter["in"] == "header" else parameter["name"]
        value = sent.get(parameter["in"], {}).get(name)
        pattern = parameter["schema"].get("pattern")
        if isinstance(value, str) and pattern is not None and re.search(pattern, value) is None:
            return False
    return True


def accepted_unless_intended(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """``positive_data_acceptance``, except for the refusals the README lists."""
    if not _parameters_as_documented(case):
        return None
    intended = INTENDED_REFUSALS.get(_operation(case).get("operationId", ""))
    if intended is not None and 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and intended(response.status_code, body):
            return None
    return positive_data_acceptance(ctx, response, case)


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
        for _ in range(500):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{directory / 'fuzz.db'}"
        run_sync(upgrade(url))
    else:
        url = request.getfixturevalue("postgres_server")

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
    with _Server(_settings(url, directory), Overrides(outbound=outbound)) as base:
        schema.config.update(base_url=base)
        yield base
    run_sync(outbound.aclose())


def _validate(case: schemathesis.Case, response: schemathesis.Response, **kwargs: Any) -> None:
    assert CANARY not in response.text
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepted_unless_intended],
        **kwargs,
    )


@schema.parametrize()
def test_each_operation_answers_as_documented(case: schemathesis.Case, live: str) -> None:
    _validate(case, case.call(base_url=live))


def test_linked_operations_answer_as_documented(live: str) -> None:
    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live}

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: Any
        ) -> None:
            _validate(case, response, recorder=self.recorder)

    Machine.run(
        settings=hypothesis.settings(
            max_examples=25,
            stateful_step_count=8,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
