"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables ask for it.

The switch
    Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (anything but ``none``), or,
    with that variable unset, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` turns it off
    whatever else is set. ``otlp`` (the default) is OTLP over HTTP/protobuf, the one OTLP
    exporter installed; ``console`` prints spans to stdout; other installed exporters are found
    by their entry-point name. Everything else is the SDK's own reading of its variables: the
    endpoint, headers, timeout and certificates (``OTEL_EXPORTER_OTLP_*``), the sampler
    (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), the batch processor
    (``OTEL_BSP_*``), span limits (``OTEL_SPAN_*``) and the resource (``OTEL_SERVICE_NAME``,
    default ``connectors`` here; ``OTEL_RESOURCE_ATTRIBUTES``).

    When off, nothing is built: no provider, no middleware, no engine events, and the parts that
    could trace hold ``None`` instead of a tracer. What remains is an ``is None`` test, and a
    context variable set around a token request or check, on paths that make network calls
    anyway; nothing at all on ``/authorize`` served from memory.

One provider per application
    Each application holds its own ``TracerProvider`` and hands its tracer to the parts it traces,
    as it does with metrics; the process-wide provider of ``opentelemetry.trace`` is never set
    (it can be set only once per process, and several applications live in one test process).
    The lifespan shuts the provider down last, which exports what is still queued.

What spans carry
    Every span started here has the request id (``connectors.request_id``) while a request is
    being served, and the connector id (``connectors.connector_id``) while work for one connector
    runs (``for_connector``). Nothing else a caller or an upstream sends is recorded: no URL but a
    host, no query, no header, no body, no SQL parameter, no Redis key or value. A failure is the
    span's error status with ``error.type``: the service's error code for an ``AppError``, the
    exception's class name otherwise; the exception's message, which may quote a value, is never
    recorded.

Trace context is neither taken from incoming requests nor sent on outbound ones: callers could
otherwise pick trace ids and force sampling, and identity providers have no business with ours.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer, use_span
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.core.config import ConfigError
from app.core.context import request_id
from app.core.errors import AppError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "CONNECTOR_ID",
    "ERROR_TYPE",
    "OUTCOME",
    "REQUEST_ID",
    "Tracing",
    "TracingMiddleware",
    "client_span",
    "connector_id",
    "error_type",
    "exporter_names",
    "for_connector",
    "mark_failed",
    "outbound_span",
    "setup_tracing",
    "start_span",
    "tracing_requested",
]

DEFAULT_SERVICE_NAME: Final = "connectors"
REQUEST_ID: Final = "connectors.request_id"
CONNECTOR_ID: Final = "connectors.connector_id"
# What a token request or credential check came to: authorized, rejected or unreachable.
OUTCOME: Final = "connectors.outcome"
ERROR_TYPE: Final = "error.type"

_EXPORTER_GROUP: Final = "opentelemetry_traces_exporter"
_OTLP_HTTP: Final = "otlp_proto_http"

# The connector being worked on, for the spans of that work; None outside it.
connector_id: ContextVar[str | None] = ContextVar("connector_id", default=None)

_NO_SPAN: Final = nullcontext(INVALID_SPAN)


# Setup -----------------------------------------------------------------------------------------


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on; see "The switch" in the module docstring."""
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters:
        return exporter_names(environ) != []
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The entry-point names of the exporters ``OTEL_TRACES_EXPORTER`` asks for (``otlp`` when
    unset); empty for ``none``. Raises ``ConfigError`` for an OTLP protocol other than
    ``http/protobuf``."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if "none" in names:
        return []
    resolved: list[str] = []
    for name in names:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
                or "http/protobuf"
            )
            if protocol != "http/protobuf":
                raise ConfigError(
                    "OTEL_EXPORTER_OTLP_PROTOCOL (or OTEL_EXPORTER_OTLP_TRACES_PROTOCOL): only "
                    "http/protobuf is supported"
                )
            name = _OTLP_HTTP
        if name not in resolved:
            resolved.append(name)
    return resolved


def _load_exporter(name: str) -> SpanExporter:
    found = list(entry_points(group=_EXPORTER_GROUP, name=name))
    if not found:
        installed = ", ".join(sorted({"otlp", "none", *entry_points(group=_EXPORTER_GROUP).names}))
        # The value is not echoed, as with every setting; the names that work are.
        raise ConfigError(f"OTEL_TRACES_EXPORTER: an exporter is not installed (known: {installed})")
    exporter: SpanExporter = found[0].load()()
    return exporter


class Tracing:
    """An application's tracer provider and the tracer its parts use."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(DEFAULT_SERVICE_NAME, __version__)

    async def shutdown(self) -> None:
        """Export what is queued and stop; in a thread, as the exporter blocks on the network
        (bounded by its timeout, ``OTEL_EXPORTER_OTLP_TIMEOUT``)."""
        await asyncio.to_thread(self.provider.shutdown)


def setup_tracing(
    environ: Mapping[str, str] | None = None, *, exporter: SpanExporter | None = None
) -> Tracing | None:
    """The application's tracing when the environment asks for it (or ``exporter`` is given, for
    tests: spans then reach it as each ends), else None. Raises ``ConfigError`` for an exporter
    that is not installed."""
    environ = os.environ if environ is None else environ
    if exporter is None and not tracing_requested(environ):
        return None
    # Imported only now: a service without tracing never loads the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, as the SDK reads them, win over the defaults.
    from_environment = OTELResourceDetector().detect().attributes
    resource = Resource.create(
        {SERVICE_NAME: DEFAULT_SERVICE_NAME, SERVICE_VERSION: __version__, **from_environment}
    )
    processors: list[SpanProcessor]
    if exporter is not None:
        processors = [SimpleSpanProcessor(exporter)]
    else:
        processors = [BatchSpanProcessor(_load_exporter(name)) for name in exporter_names(environ)]
    # The sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG) is the SDK's reading too.
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    return Tracing(provider)


# Spans -----------------------------------------------------------------------------------------


@contextmanager
def for_connector(connector: object) -> Iterator[None]:
    """Spans started inside carry ``connector``'s id."""
    token = connector_id.set(str(connector))
    try:
        yield
    finally:
        connector_id.reset(token)


def _with_context(attributes: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    current_request = request_id.get()
    if current_request is not None:
        attributes[REQUEST_ID] = current_request
    current_connector = connector_id.get()
    if current_connector is not None:
        attributes[CONNECTOR_ID] = current_connector
    return attributes


def error_type(error: BaseException) -> str:
    """What a span records of a failure: the error code of ours, the class name of others."""
    return error.code if isinstance(error, AppError) else type(error).__name__


def mark_failed(span: Span, error: BaseException | str) -> None:
    """Set the error status and ``error.type``; never the exception's message."""
    kind = error if isinstance(error, str) else error_type(error)
    span.set_attribute(ERROR_TYPE, kind)
    span.set_status(Status(StatusCode.ERROR, kind))


def start_span(
    tracer: Tracer,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, AttributeValue] | None = None,
) -> Span:
    """A span under the current one, with the request and connector ids; the caller ends it."""
    return tracer.start_span(
        name,
        kind=kind,
        attributes=_with_context(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    )


@contextmanager
def _current_span(
    tracer: Tracer, name: str, kind: SpanKind, attributes: dict[str, AttributeValue]
) -> Iterator[Span]:
    span = start_span(tracer, name, kind=kind, attributes=attributes)
    with use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        try:
            yield span
        except BaseException as error:
            mark_failed(span, error)
            raise


def client_span(
    tracer: Tracer | None, name: str, attributes: dict[str, AttributeValue]
) -> AbstractContextManager[Span]:
    """A client span made current for the block, its failure recorded; a non-recording stand-in
    when ``tracer`` is None (tracing off), so callers need no branch of their own."""
    if tracer is None:
        return _NO_SPAN
    return _current_span(tracer, name, SpanKind.CLIENT, attributes)


def outbound_span(
    tracer: Tracer | None,
    name: str,
    method: str,
    url: str,
    attributes: dict[str, AttributeValue] | None = None,
) -> AbstractContextManager[Span]:
    """A client span for an HTTP request to ``url``, recording its host and port only: a path or
    query written by a user may carry anything."""
    if tracer is None:
        return _NO_SPAN
    recorded: dict[str, AttributeValue] = {"http.request.method": method, **(attributes or {})}
    parts = urlsplit(url)
    try:
        if parts.hostname:
            recorded["server.address"] = parts.hostname
        recorded["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        pass  # a malformed port: the request itself fails and says so
    return _current_span(tracer, name, SpanKind.CLIENT, recorded)


# The request span ------------------------------------------------------------------------------


class TracingMiddleware:
    """Pure ASGI middleware: one server span per HTTP request, named ``METHOD route-template``.

    It records the method, the route template (never the path, which holds ids, or the query),
    the scheme, the response status and the request id; a 5xx answer or an exception is an
    error. Added only when tracing is on, inside ``RequestIdMiddleware`` (which sets the id).
    """

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        span = start_span(
            self.tracer,
            method,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
        )
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                await self.app(scope, receive, send_wrapper)
            except BaseException as error:
                mark_failed(span, error)
                raise
            else:
                if status >= 500:
                    mark_failed(span, str(status))
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status)
