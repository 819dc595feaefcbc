"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI document.

A real uvicorn server (in a thread) answers them with a real caller token. Every check
schemathesis has is on: no 5xx but the documented upstream failures, every answer as documented
(status, media type, headers, body), schema-valid requests accepted and others refused, the
caller token enforced, created connectors and webhook subscriptions available until deleted and
gone after. Each operation runs its examples, generated positive and negative cases and its
coverage cases (on SQLite); the stateful phase then follows the document's links, for each
resource on its own: from created connectors to reads, changes, checks, history, authorize and
delete; from created subscriptions to reads, changes, secret rotation, deliveries (and from
there to a resend) and delete (on SQLite and PostgreSQL).

What the README lists as intended is accepted, and only that: refusals of schema-valid requests
that no schema can state (``INTENDED_REFUSALS``), and a connector's history, which stays readable
after a delete and then shows the delete (``deleted_stays_deleted``). Runs are bounded and
derandomized: the same requests each time, in a few seconds.
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

import httpx
import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis.specs.openapi.checks import positive_data_acceptance, use_after_free

from app.core.auth import mint_token
from app.core.config import Settings
from app.core.outbound import OutboundClient
from app.main import Overrides, create_app
from app.migrations import upgrade
from tests.conftest import CANARY, run_sync

Case = schemathesis.Case[Any]
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
        webhooks_per_organization=1000,
    )


# The document needs no running app: build it from an app that is never started.
_UNUSED = _settings("sqlite+aiosqlite:///unused.db", Path("."))
_DOCUMENT = create_app(_UNUSED).openapi()
_TOKEN = mint_token(
    _UNUSED,
    organization_id="fuzz-org",
    scopes=["connectors:read", "connectors:write", "connectors:authorize"],
    ttl_seconds=3600,
)
# Links never lead from one resource to another.
_RESOURCES = ("connectors", "webhooks")
_CREATED_LINKS: dict[str, dict[str, Any]] = {
    resource: _DOCUMENT["paths"][f"/{resource}"]["post"]["responses"]["201"]["links"]
    for resource in _RESOURCES
}

# Bounds of the stateful phase: scenarios, and calls in each. With 25 scenarios the connectors'
# run reached every link alone, but not after other tests had run in the same process (the
# scenarios drawn then differ); 40 reached them either way until the consent link came: 50 do.
# `make test` runs this module in a process of its own: in a pytest-xdist worker, what ran before
# differs from run to run.
STATEFUL_SCENARIOS = 50
STATEFUL_STEPS = 5

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"deterministic": True, "max-examples": 8},
        # Only the document's own links: from a created connector to what takes its id.
        "phases": {"stateful": {"inference": {"algorithms": []}}},
        "auth": {"openapi": {"bearerAuth": {"bearer": _TOKEN}}},
        "checks": {
            # A live check calls a generated host, which resolves to 127.0.0.1 where nothing
            # listens on its port: a documented 502 (or 504). Never a 500 or a 503.
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "502", "504"]},
            # These two are run by the checks below, which accept what the README intends.
            "positive_data_acceptance": {"enabled": False},
            "use_after_free": {"enabled": False},
        },
        "operations": [
            {
                # Generating coverage cases from the URL patterns (nested repetitions of escapes)
                # takes minutes; the fuzzing phase covers these with generated cases instead.
                "include-operation-id": [
                    "createConnector",
                    "updateConnector",
                    "createWebhook",
                    "updateWebhook",
                ],
                "phases": {"coverage": {"enabled": False}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(_DOCUMENT, config=CONFIG)


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resource_document(resource: str) -> dict[str, Any]:
    """The document without the other resources' paths, and without the schemas only they use."""
    others = tuple(f"/{other}" for other in _RESOURCES if other != resource)
    paths = {path: item for path, item in _DOCUMENT["paths"].items() if not path.startswith(others)}
    schemas: dict[str, Any] = _DOCUMENT["components"]["schemas"]
    used: set[str] = set()
    pending = list(_refs(paths))
    while pending:
        name = pending.pop()
        if name in schemas and name not in used:
            used.add(name)
            pending.extend(_refs(schemas[name]))
    components = {**_DOCUMENT["components"], "schemas": {n: s for n, s in schemas.items() if n in used}}
    return {**_DOCUMENT, "paths": paths, "components": components}


# The stateful phase, per resource: each gets scenarios of its own.
_STATEFUL = {
    resource: schemathesis.openapi.from_dict(_resource_document(resource), config=CONFIG)
    for resource in _RESOURCES
}


# Intended refusals of schema-valid requests (README): rules that no schema can state.
# Two extra token parameter names that differ only in case or separators.
_SAME_PARAMETER = "two parameter names differ only in case or in '.', '-' and '_'"
# An auth patch is merged with the connector as stored, then judged whole: fields of another kind
# are unknown there, a new kind needs its whole auth object, a Basic user name has no ':'.
_AUTH_MERGE = {"unknown field", "Field required", "a Basic authentication username may not contain ':'"}


# A PEM key or certificate is judged by what it holds, which no schema can state; so is an API
# key's name or prefix against the stored `in`.
_KEY_FIELDS = {"auth.private_key", "auth.tls_certificate", "auth.tls_private_key"}
_API_KEY_MERGE = {
    "a query parameter name must be 1-64 ASCII letters, digits, '-', '.', '_' or '~'",
    "a prefix is only sent with in: header; send null or leave it out with in: query",
    "that header name is reserved: the HTTP client or a proxy sets it itself, or it describes the body",
}


_RETURN_URL = {
    "its origin is not among the allowed return origins",
    "must be visible ASCII (percent-encode other characters)",
    "must be an absolute http(s) URL",
    "must be an absolute http(s) URL without credentials or fragment",
}


def _key_material(body: dict[str, Any]) -> bool:
    errors = body.get("errors") or []
    return (
        body.get("code") == "invalid_request"
        and bool(errors)
        and all(e["field"] in _KEY_FIELDS for e in errors)
    )


def _only(body: dict[str, Any], code: str, reasons: set[str]) -> bool:
    errors = body.get("errors") or []
    return body.get("code") == code and bool(errors) and all(error["reason"] in reasons for error in errors)


# By operation: given a refusal's status and problem body, whether it is one of them.
INTENDED_REFUSALS: dict[str, Callable[[int, dict[str, Any]], bool]] = {
    "createConnector": lambda status, body: (
        _only(body, "invalid_request", {_SAME_PARAMETER}) or _key_material(body)
    ),
    "updateConnector": lambda status, body: (
        # A stale or unknown If-Match: the precondition failed, the request was well formed.
        status == 412
        # A URL that moves needs the secrets again.
        or body.get("code") == "secret_required"
        or _only(body, "invalid_request", {*_AUTH_MERGE, *_API_KEY_MERGE, _SAME_PARAMETER})
        or _key_material(body)
    ),
    "deleteConnector": lambda status, body: status == 412,
    # A stale or unknown If-Match, as for connectors.
    "updateWebhook": lambda status, body: status == 412,
    "deleteWebhook": lambda status, body: status == 412,
    # What the path becomes once decoded or normalised (README, "Paths given to /authorize").
    "authorizeConnector": lambda status, body: body.get("code") == "path_outside_resource_domain",
    # A return URL's origin against the configured ones, and its characters (README, "Connecting
    # an account").
    "startConsent": lambda status, body: _only(body, "invalid_request", _RETURN_URL),
    # A callback without a consent the service knows answers a page saying so (README, ibid.).
    "consentCallback": lambda status, body: status == 400,
}


def _operation(case: Case) -> dict[str, Any]:
    operation: dict[str, Any] = _DOCUMENT["paths"][case.operation.path][case.operation.method.lower()]
    return operation


def _body(response: schemathesis.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _parameters_as_documented(case: Case) -> bool:
    """Whether every parameter sent matches its documented pattern.

    The coverage phase may label a case positive although it carries a value drawn as a negative
    one (an optional header whose pattern it cannot satisfy): such a case is no schema-valid
    request, whatever its label says.
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
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> bool | None:
    """``positive_data_acceptance``, except for the refusals the README lists as intended."""
    if not _parameters_as_documented(case):
        return None
    intended = INTENDED_REFUSALS.get(_operation(case)["operationId"])
    if (
        intended is not None
        and 400 <= response.status_code < 500
        and intended(response.status_code, _body(response))
    ):
        return None
    return positive_data_acceptance(ctx, response, case)


def deleted_stays_deleted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> bool | None:
    """``use_after_free``, except for a deleted connector's history (README, "Audit trail"):
    it stays readable, and its newest event is the delete."""
    if _operation(case)["operationId"] == "getConnectorHistory" and response.status_code == 200:
        items = _body(response).get("items") or [{}]
        if items[0].get("action") == "delete":
            return None
    return use_after_free(ctx, response, case)


_REPLACED: list[schemathesis.CheckFunction] = [positive_data_acceptance, use_after_free]
_REPLACEMENTS: list[schemathesis.CheckFunction] = [accepted_unless_intended, deleted_stays_deleted]


def _validate(case: Case, response: schemathesis.Response, recorder: Any = None) -> None:
    assert CANARY not in response.text
    case.validate_response(
        response, excluded_checks=_REPLACED, additional_checks=_REPLACEMENTS, recorder=recorder
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server:
    def __init__(self, config: Settings, overrides: Overrides) -> None:
        self.port = _free_port()
        self.app = app = create_app(config, overrides)
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


def _serve(database_url: str, directory: Path) -> Iterator[str]:
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
        # One attempt: a retry after a pause would only make each failing check slower.
        max_attempts=1,
    )
    server = _Server(_settings(database_url, directory), Overrides(outbound=outbound))
    with server as base:
        # Webhook deliveries to generated URLs go to loopback too, never to a real resolver. No
        # subscription exists before the server answers, so none was sent another way.
        server.app.state.webhook_deliveries.outbound = outbound
        yield base
    run_sync(outbound.aclose())


@pytest.fixture(scope="module")
def live_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite+aiosqlite:///{directory / 'fuzz.db'}"
    run_sync(upgrade(url))
    yield from _serve(url, directory)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield request.getfixturevalue("live_sqlite")
        return
    yield from _serve(request.getfixturevalue("postgres_server"), tmp_path_factory.mktemp("fuzz"))


def _delete_all(base: str) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {_TOKEN}"}) as client:
        for connector in client.get("/connectors").json()["items"]:
            client.delete(f"/connectors/{connector['id']}").raise_for_status()
        for webhook in client.get("/webhooks").json()["items"]:
            client.delete(f"/webhooks/{webhook['id']}").raise_for_status()


@schema.parametrize()
def test_each_operation_answers_as_documented(case: Case, live_sqlite: str) -> None:
    _validate(case, case.call(base_url=live_sqlite))


@pytest.mark.parametrize("resource", _RESOURCES)
def test_linked_operations_answer_as_documented(live: str, resource: str) -> None:
    answered: set[tuple[str, int]] = set()
    schema = _STATEFUL[resource]

    # Hypothesis derives its derandomized seed from this class's source: a change to it draws
    # other scenarios, which may then miss a link within the bounds below.
    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Each scenario starts from an empty organization, so replaying one makes the same calls.
            _delete_all(live)

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": live}

        def after_call(self, response: schemathesis.Response, case: Case) -> None:
            super().after_call(response, case)
            answered.add((_operation(case)["operationId"], response.status_code))

        def validate_response(self, response: schemathesis.Response, case: Case, **kwargs: Any) -> None:
            _validate(case, response, recorder=self.recorder)

    Machine.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
    # Every link from a creation was followed with a connector or subscription that existed: its
    # target answered something other than 401 (a generated token) or 404 (a generated id) at
    # least once.
    reached = {operation for operation, status in answered if status not in (401, 404)}
    assert reached >= {link["operationId"] for link in _CREATED_LINKS[resource].values()}, sorted(answered)
