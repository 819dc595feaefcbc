"""Tracing: the switch read from the OTEL_* variables, what the SDK is left to read, export over
OTLP/HTTPS, and the statement, Redis and request spans with what they must never record."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.core.config import ConfigError, Settings
from app.core.context import request_id
from app.core.crypto import KeyRing
from app.core.db import Database, build_engine
from app.core.tracing import (
    CONNECTOR_ID,
    REQUEST_ID,
    TracingMiddleware,
    exporter_names,
    for_connector,
    setup_tracing,
    tracing_requested,
)
from app.main import create_app
from app.tokens.shared import SharedTokenStore, SharedUnavailable
from tests.conftest import CANARY, canary
from tests.support.fakes import FakeTime
from tests.support.servers import Reply, ScriptedServer, unused_port
from tests.support.tls import LocalCA

ENDPOINT = "https://collector.example:4318"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from an environment without OTEL_* variables."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    yield
    # No test may install the process-wide provider.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def middleware_classes(app: FastAPI) -> list[object]:
    return [middleware.cls for middleware in app.user_middleware]


# The switch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": ""}, False),
        ({"OTEL_TRACES_EXPORTER": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_TRACES_EXPORTER": "None"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "console"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_SDK_DISABLED": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ],
)
def test_the_switch(environ: dict[str, str], on: bool) -> None:
    assert tracing_requested(environ) is on
    if not on:
        assert setup_tracing(environ) is None


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, ["otlp_proto_http"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_http"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp_proto_http", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,otlp_proto_http"}, ["otlp_proto_http"]),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, []),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp_proto_http"]),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
            ["otlp_proto_http"],
        ),
    ],
)
def test_exporter_names(environ: dict[str, str], names: list[str]) -> None:
    assert exporter_names(environ) == names


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_an_otlp_protocol_that_is_not_installed_stops_the_start(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="only http/protobuf"):
        setup_tracing(environ)


def test_an_exporter_that_is_not_installed_stops_the_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", f"zipkin-{CANARY}")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER") as raised:
        create_app(settings)
    assert CANARY not in str(raised.value)
    assert "console" in str(raised.value)


def test_without_otel_variables_nothing_is_built(settings: Settings) -> None:
    app = create_app(settings)
    assert app.state.tracing is None
    assert TracingMiddleware not in middleware_classes(app)


# What the SDK reads itself ----------------------------------------------------------------------


def test_service_name_resource_and_sampler_come_from_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    attributes = tracing.provider.resource.attributes
    assert attributes["service.name"] == "connectors"
    assert attributes["service.version"]

    monkeypatch.setenv("OTEL_SERVICE_NAME", "connectors-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,service.namespace=flows")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    attributes = tracing.provider.resource.attributes
    assert attributes["service.name"] == "connectors-eu"
    assert attributes["deployment.environment"] == "staging"
    assert attributes["service.namespace"] == "flows"
    sampler = tracing.provider.sampler
    assert isinstance(sampler, TraceIdRatioBased) and sampler.rate == 0.25

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "from-attributes"
    assert tracing.provider.sampler is ALWAYS_OFF
    with tracing.tracer.start_as_current_span("sampled out"):
        pass
    assert exporter.get_finished_spans() == ()


async def test_spans_reach_an_otlp_collector_named_by_the_environment(
    settings: Settings,
    scripted_server: ScriptedServer,
    local_ca: LocalCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole path as an operator sets it up: variables in, protobuf over HTTPS out, flushed
    when the application stops."""
    scripted_server.set_default(Reply(status=200, headers={"Content-Type": "application/x-protobuf"}))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", scripted_server.url(""))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(local_ca.ca_bundle))
    # The exporter's HTTP library lets these replace the certificate named above.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    app = create_app(settings)
    assert app.state.tracing is not None
    assert TracingMiddleware in middleware_classes(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz", params={"q": "query-value"})
        assert scripted_server.count == 0, "spans are batched, not sent one by one"
    (export,) = scripted_server.requests
    assert export.method == "POST"
    assert export.path == "/v1/traces"
    assert export.headers["content-type"] == "application/x-protobuf"
    assert b"query-value" not in export.body
    request = ExportTraceServiceRequest()
    request.ParseFromString(export.body)
    (resource_spans,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "connectors"
    assert resource["deployment.environment"] == "test"
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    by_name = {span.name: span for span in spans}
    assert {"GET /healthz", "GET /readyz"} <= by_name.keys()
    ids = {
        attribute.value.string_value
        for span in spans
        for attribute in span.attributes
        if attribute.key == REQUEST_ID
    }
    assert {health.headers["x-request-id"], ready.headers["x-request-id"]} <= ids
    # The readiness check's query is a child of its request span.
    (ping,) = [span for span in spans if span.name == "SELECT"]
    assert ping.parent_span_id == by_name["GET /readyz"].span_id


# Statements -------------------------------------------------------------------------------------


async def test_statements_are_traced_with_their_operation_and_table_only(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    db = Database(build_engine(database_url), tracer=tracing.tracer)
    # Not a canary: the driver's own debug log, which the service holds back, would show it.
    secret = f"parameter-{secrets.token_hex(4)}"
    try:
        async with db.read() as session:
            await session.execute(text("SELECT :value"), {"value": secret})
        assert exporter.get_finished_spans() == (), "a statement outside any operation is not traced"

        request_token = request_id.set("req-1")
        try:
            with tracing.tracer.start_as_current_span("operation") as operation, for_connector("c-1"):
                async with db.write() as session:
                    await session.execute(
                        text("UPDATE organizations SET created_at = created_at WHERE id = :id"),
                        {"id": secret},
                    )
                with pytest.raises(IntegrityError):
                    async with db.write() as session:
                        await session.execute(
                            text("INSERT INTO organizations (id, created_at) VALUES (:id, NULL)"),
                            {"id": secret},
                        )
        finally:
            request_id.reset(request_token)
    finally:
        await db.dispose()
    spans = [span for span in exporter.get_finished_spans() if span.name != "operation"]
    assert {span.name for span in spans} >= {"UPDATE", "INSERT"}
    for span in spans:
        assert span.kind == SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == operation.get_span_context().span_id
        attributes = dict(span.attributes or {})
        assert attributes["db.system"] == db.engine.dialect.name
        assert attributes["db.operation.name"] == span.name
        assert attributes[REQUEST_ID] == "req-1"
        assert attributes[CONNECTOR_ID] == "c-1"
        assert not span.events
        for value in (*attributes.values(), span.status.description or ""):
            assert secret not in str(value)
            assert "created_at" not in str(value), "no statement text"
    (failed,) = [span for span in spans if span.status.status_code == StatusCode.ERROR]
    assert failed.name == "INSERT"
    assert dict(failed.attributes or {})["error.type"] == failed.status.description
    assert failed.status.description in {"IntegrityError", "NotNullViolationError"}


# Redis ------------------------------------------------------------------------------------------


async def test_a_failed_redis_command_records_its_name_and_error_type(fake_time: FakeTime) -> None:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    redis = Redis.from_url(
        f"redis://127.0.0.1:{unused_port()}/0", socket_timeout=1.0, socket_connect_timeout=1.0
    )
    store = SharedTokenStore(
        redis, KeyRing([("k1", b"k" * 32)]), clock=fake_time, lock_timeout=1.0, tracer=tracing.tracer
    )
    try:
        with pytest.raises(SharedUnavailable):
            await store.read((canary("connector"), 1))
    finally:
        await store.aclose()
    (span,) = exporter.get_finished_spans()
    assert span.name == "MGET"
    assert dict(span.attributes or {}) == {
        "db.system": "redis",
        "db.operation.name": "MGET",
        "connectors.redis.operation": "read",
        "error.type": "ConnectionError",
    }
    assert span.status.status_code == StatusCode.ERROR
    assert not span.events


# Requests ---------------------------------------------------------------------------------------


async def test_a_request_that_raises_records_the_type_and_never_the_message() -> None:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing({}, exporter=exporter)
    assert tracing is not None
    secret = canary("message")

    async def failing(_request: Request) -> Response:
        raise RuntimeError(f"token={secret}")

    app = Starlette(routes=[Route("/items/{item}", failing, methods=["POST"])])
    traced = TracingMiddleware(app, tracing.tracer)
    transport = httpx.ASGITransport(app=traced, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        # The test client logs the URL: its values are plain markers, not canaries.
        response = await client.post("/items/item-7?q=query-7", headers={"Authorization": secret})
    assert response.status_code == 500
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /items/{item}"
    assert span.kind == SpanKind.SERVER
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/items/{item}",
        "url.scheme": "https",
        "http.response.status_code": 500,
        "error.type": "RuntimeError",
    }
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "RuntimeError"
    assert not span.events
    assert "item-7" not in span.name
