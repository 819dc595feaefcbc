"""Spans of the real app, with tracing on and an in-memory exporter: create, validate and
authorize against real HTTPS providers, in-process and with the Redis token store."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import SecretStr

from app.core.config import Settings
from app.core.tracing import CONNECTOR_ID, OUTCOME, REQUEST_ID, TracingMiddleware
from app.main import Overrides
from tests.conftest import CANARY, canary
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.redis import RedisServer
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
AppFactory = Callable[..., Awaitable[Any]]

# Attributes a server span may have: nothing from the URL but its route template, no header.
SERVER_ATTRIBUTES = {
    "http.request.method",
    "http.route",
    "http.response.status_code",
    "url.scheme",
    REQUEST_ID,
}


class Provider:
    """A real OAuth 2.0 server with one client whose secret is a canary."""

    def __init__(self, server: AuthorizationServerThread) -> None:
        self.server = server
        self.secret = canary("idp-secret")
        server.add_clients([RegisteredClient("traced-client", self.secret)])


@pytest.fixture
def provider(auth_server: AuthorizationServerThread) -> Provider:
    return Provider(auth_server)


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, Sequence):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def recorded_text(span: ReadableSpan) -> list[str]:
    """Every string a span hands to an exporter, except its resource (the process's own)."""
    texts = [span.name, span.status.description or ""]
    for key, value in (span.attributes or {}).items():
        texts.append(key)
        texts.extend(_strings(value))
    for event in span.events:
        texts.append(event.name)
        for key, value in (event.attributes or {}).items():
            texts.append(key)
            texts.extend(_strings(value))
    return texts


def assert_nothing_secret(spans: Sequence[ReadableSpan], *secrets: str) -> None:
    assert spans
    for span in spans:
        assert not span.events, f"{span.name} has events"
        for text in recorded_text(span):
            assert CANARY not in text, f"{span.name}: {text}"
            for secret in secrets:
                assert secret not in text, f"{span.name} records a secret"


def server_span(spans: Sequence[ReadableSpan], response: httpx.Response) -> ReadableSpan:
    """The request span of ``response``, found by its request id."""
    request_id = response.headers["x-request-id"]
    (found,) = [
        s for s in spans if s.kind == SpanKind.SERVER and (s.attributes or {}).get(REQUEST_ID) == request_id
    ]
    return found


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def assert_request_span(span: ReadableSpan, response: httpx.Response, method: str, route: str) -> None:
    attributes = dict(span.attributes or {})
    assert span.name == f"{method} {route}"
    assert set(attributes) == SERVER_ATTRIBUTES
    assert attributes["http.request.method"] == method
    assert attributes["http.route"] == route
    assert attributes["http.response.status_code"] == response.status_code
    assert attributes["url.scheme"] == "http"
    assert attributes[REQUEST_ID] == response.headers["x-request-id"]


def assert_statements_under(spans: Sequence[ReadableSpan], parent: ReadableSpan, request_id: str) -> None:
    statements = [s for s in children(spans, parent) if "db.system" in (s.attributes or {})]
    assert statements, f"no statement under {parent.name}"
    for statement in statements:
        attributes = dict(statement.attributes or {})
        assert statement.kind == SpanKind.CLIENT
        assert attributes["db.system"] in {"sqlite", "postgresql", "redis"}
        assert str(attributes["db.operation.name"]).isalpha()
        assert attributes[REQUEST_ID] == request_id
        assert statement.context is not None and parent.context is not None
        assert statement.context.trace_id == parent.context.trace_id


async def _until(condition: Callable[[], bool]) -> None:
    # Background work (status writes, change notices) ends after the answer; bounded wait.
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the spans of background work never arrived")


async def _scenario(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    provider: Provider,
    scripted_server: ScriptedServer,
    *,
    shared: bool,
) -> None:
    exporter = InMemorySpanExporter()
    app = await app_factory(settings, Overrides(span_exporter=exporter))
    if shared:
        await asyncio.wait_for(app.state.broadcast.subscribed.wait(), timeout=5)
    client = client_for(app=app)
    caller_header = client.headers["Authorization"]
    scripted_server.set_default(Reply(status=204))

    # OAuth 2.0: saved unchecked, then the first authorize requests a token; validate asks again.
    oauth_body = payloads.client_credentials(
        token_url=provider.server.token_url, client_id="traced-client", client_secret=provider.secret
    )
    created = await client.post("/connectors", json=oauth_body, params={"validate": "false"})
    assert created.status_code == 201, created.text
    oauth_id = created.json()["id"]
    authorized = await authorize(client, oauth_id, path="/items?q=1")
    assert authorized.status_code == 200, authorized.text
    access_token = authorized.json()["headers"]["Authorization"].removeprefix("Bearer ")
    validated = await client.post(f"/connectors/{oauth_id}/validate")
    assert validated.json()["status"]["state"] == "authorized", validated.text

    # Basic: checked against the validation URL on create; authorize answers from memory.
    basic_body = payloads.basic(validation_url=scripted_server.url("/auth/check?key=abc"))
    basic = await client.post("/connectors", json=basic_body)
    assert basic.status_code == 201, basic.text
    basic_id = basic.json()["id"]
    basic_answer = await authorize(client, basic_id)
    assert basic_answer.status_code == 200
    basic_header = basic_answer.json()["headers"]["Authorization"]

    # A rejected token request: an error span with the code only.
    wrong = payloads.client_credentials(
        name="Wrong", token_url=provider.server.token_url, client_id="traced-client"
    )
    refused = await client.post("/connectors", json=wrong)
    assert refused.status_code == 422, refused.text

    if shared:
        # Change notices are published after the answer.
        await _until(lambda: len([s for s in exporter.get_finished_spans() if s.name == "PUBLISH"]) >= 3)
    spans = exporter.get_finished_spans()
    token_host = urlsplit(provider.server.token_url).hostname
    assert token_host is not None

    # Request spans: named by route template, the request id of the answer.
    for response, method, route in [
        (created, "POST", "/connectors"),
        (authorized, "POST", "/connectors/{connector_id}/authorize"),
        (validated, "POST", "/connectors/{connector_id}/validate"),
        (basic, "POST", "/connectors"),
        (basic_answer, "POST", "/connectors/{connector_id}/authorize"),
        (refused, "POST", "/connectors"),
    ]:
        span = server_span(spans, response)
        assert_request_span(span, response, method, route)
        assert span.parent is None, "a caller's trace context is not taken over"
    assert_statements_under(spans, server_span(spans, created), created.headers["x-request-id"])
    assert_statements_under(spans, server_span(spans, validated), validated.headers["x-request-id"])

    # The cold authorize: its token request is a child of its request span.
    authorize_span = server_span(spans, authorized)
    (token_request,) = [s for s in children(spans, authorize_span) if s.name == "token request"]
    attributes = dict(token_request.attributes or {})
    assert token_request.kind == SpanKind.CLIENT
    assert attributes == {
        "http.request.method": "POST",
        "server.address": token_host,
        "server.port": urlsplit(provider.server.token_url).port,
        "http.response.status_code": 200,
        "connectors.grant_type": "client_credentials",
        OUTCOME: "authorized",
        CONNECTOR_ID: oauth_id,
        REQUEST_ID: authorized.headers["x-request-id"],
    }
    assert token_request.status.status_code == StatusCode.UNSET
    if shared:
        commands = {
            str((s.attributes or {}).get("db.operation.name"))
            for s in children(spans, authorize_span)
            if (s.attributes or {}).get("db.system") == "redis"
        }
        # Look, lock, look again, take the refresh token, publish the token, unlock.
        assert {"MGET", "SET", "EVALSHA", "MULTI"} <= commands
        assert_statements_under(spans, authorize_span, authorized.headers["x-request-id"])
        for span in children(spans, authorize_span):
            if (span.attributes or {}).get("db.system") == "redis":
                assert (span.attributes or {})[CONNECTOR_ID] == oauth_id

    # The check of validate names its connector.
    (check,) = [s for s in children(spans, server_span(spans, validated)) if s.name == "token request"]
    assert (check.attributes or {})[CONNECTOR_ID] == oauth_id
    assert (check.attributes or {})[OUTCOME] == "authorized"

    # The Basic check records the validation URL's host, never its path or query.
    (basic_check,) = [s for s in children(spans, server_span(spans, basic)) if s.name == "validation request"]
    assert dict(basic_check.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": scripted_server.port,
        "http.response.status_code": 204,
        OUTCOME: "authorized",
        REQUEST_ID: basic.headers["x-request-id"],
    }

    # The refused create: the failure is the error code, nothing the provider said.
    (rejected,) = [s for s in children(spans, server_span(spans, refused)) if s.name == "token request"]
    assert rejected.status.status_code == StatusCode.ERROR
    assert rejected.status.description == "credentials_rejected"
    assert (rejected.attributes or {})["error.type"] == "credentials_rejected"
    assert (rejected.attributes or {})[OUTCOME] == "rejected"
    assert (rejected.attributes or {})["http.response.status_code"] == 401

    # Nothing secret anywhere: no canary, token, header, caller JWT, URL path or query.
    caller_jwt = caller_header.removeprefix("Bearer ")
    basic_password = base64.b64decode(basic_header.removeprefix("Basic ")).decode()
    assert_nothing_secret(
        spans,
        access_token,
        caller_header,
        caller_jwt,
        basic_header,
        basic_password,
        provider.server.token_url,
        "/oauth/token",
        "/auth/check",
        "key=abc",
        "q=1",
        "/items",
    )


async def test_spans_of_create_validate_and_authorize(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    provider: Provider,
    scripted_server: ScriptedServer,
) -> None:
    await _scenario(app_factory, settings, client_for, provider, scripted_server, shared=False)


async def test_spans_with_the_redis_token_store(
    app_factory: AppFactory,
    settings: Settings,
    client_for: ClientFor,
    provider: Provider,
    scripted_server: ScriptedServer,
    own_redis: RedisServer,
) -> None:
    shared = settings.model_copy(update={"redis_url": SecretStr(own_redis.url)})
    await _scenario(app_factory, shared, client_for, provider, scripted_server, shared=True)


async def test_without_tracing_nothing_is_installed(
    app_factory: AppFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    app = await app_factory(settings)
    assert app.state.tracing is None
    assert TracingMiddleware not in {middleware.cls for middleware in app.user_middleware}
    engine = app.state.db.engine.sync_engine
    assert not engine.dispatch.before_cursor_execute
    assert not engine.dispatch.after_cursor_execute
    # The process-wide provider is never set, on or off.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
