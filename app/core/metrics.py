"""Prometheus metrics, in a registry of their own per application.

Each ``create_app`` builds one ``Metrics`` and hands it to the parts it measures; ``GET /metrics``
renders its registry. A registry per application (not the library's global one) lets tests and
several applications in one process count separately. A part built without one gets a private
``Metrics`` that nobody reads, so it never has to ask whether it is being measured.

Every label has a small, fixed set of values: outcomes are ``ok`` or an error ``code`` of
``app.core.errors``, kinds and states are the service's own vocabulary. Nothing a caller or a
connector supplies (ids, organizations, URLs, hosts, tokens) ever becomes a label value: it would
make the series unbounded, and the metrics are read by people who may not see tenants' data.

Metrics on the hot path (authorize, token cache hits) resolve their labelled children once, so a
measurement is an increment or an observation, never a label lookup. Every request's count and
duration (``HTTPMetricsMiddleware``) costs less still: plain numbers that the event loop adds to,
without the client library's lock per increment, turned into samples only when scraped.

No ``_created`` series is written: each counter and histogram would add one per labelled child,
a timestamp that Prometheus does not use in the text format and that only costs storage. The
registry drops them itself, whatever the client library's process-wide switch says.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterable, Mapping
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CONNECTOR_STATES",
    "CONTENT_TYPE",
    "WEBHOOK_ANSWERED",
    "HTTPMetricsMiddleware",
    "Metrics",
    "status_class",
]

# The text exposition format 0.0.4, which every Prometheus server reads. (Recent client versions
# point CONTENT_TYPE_LATEST at format 1.0.0; what ``render`` writes is 0.0.4.)
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

CONNECTOR_STATES: Final = ("unverified", "authorized", "rejected", "unreachable", "consent_required")
# Results of webhook delivery attempts that got an answer; the others are named by error code.
WEBHOOK_ANSWERED: Final = ("succeeded", "failed")
UNKNOWN: Final = "unknown"

# From a warm in-process answer (well under a millisecond) to a token request that uses the whole
# outbound deadline (5 s by default).
_AUTHORIZE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_OUTBOUND_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The methods counted by name; any other is counted as ``other``, so a caller cannot make series.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route of a request no route matched (a 404, or a 413 refused before routing): never its
# path, which the caller chooses.
UNMATCHED: Final = "unmatched"


def status_class(status_code: int) -> str:
    """``2xx`` for 200 to 299 and so on; ``other`` outside 100 to 599."""
    return f"{status_code // 100}xx" if 100 <= status_code <= 599 else "other"


class _Registry(CollectorRegistry):
    """A registry whose counters and histograms have no ``_created`` samples."""

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            created = family.name + "_created"
            family.samples = [sample for sample in family.samples if sample.name != created]
            yield family


class _RouteSeries:
    __slots__ = ("buckets", "statuses", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0
        self.statuses: dict[int, int] = {}


class _RequestMetrics(Collector):
    """``connectors_http_requests_total`` and ``connectors_http_request_duration_seconds``.

    Kept as plain numbers per (method, route): only the event loop adds to them and only the event
    loop renders them (``GET /metrics``), so no lock is needed, where the library's labelled
    children would take three per request (count, duration sum, bucket).
    """

    _REQUESTS = "connectors_http_requests"
    _REQUESTS_HELP = (
        "Answered requests by method, route template (unmatched when no route matched) and status."
    )
    _DURATION = "connectors_http_request_duration_seconds"
    _DURATION_HELP = "Time from a request's arrival to the end of its answer, by method and route template."

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = tuple(float(bound) for bound in buckets)
        self._series: dict[tuple[str, str], _RouteSeries] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"
        series = self._series.get((method, route))
        if series is None:
            # Reached once per combination, and the combinations are few: the routes and the
            # methods above (the statuses, below, are those the service answers).
            series = self._series[(method, route)] = _RouteSeries(len(self._bounds) + 1)
        series.buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        series.sum += seconds
        statuses = series.statuses
        statuses[status] = statuses.get(status, 0) + 1

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        requests, durations = self._families()
        # Written as the library writes its own histograms' bounds (``1.0``, ``+Inf``).
        bounds = [floatToGoString(bound) for bound in (*self._bounds, math.inf)]  # type: ignore[no-untyped-call]
        for (method, route), series in self._series.items():
            for status, count in series.statuses.items():
                requests.add_metric([method, route, str(status)], count)
            durations.add_metric(
                [method, route],
                buckets=list(zip(bounds, itertools.accumulate(series.buckets), strict=True)),
                sum_value=series.sum,
            )
        return [requests, durations]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(self._REQUESTS, self._REQUESTS_HELP, labels=["method", "route", "status"]),
            HistogramMetricFamily(self._DURATION, self._DURATION_HELP, labels=["method", "route"]),
        )


class Metrics:
    """The service's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry = _Registry()
        registry = self.registry
        self.build_info = Gauge(
            "connectors_build_info",
            "Always 1; the labels name the service version, the Python version and the database.",
            ["version", "python_version", "database"],
            registry=registry,
        )
        self._requests = _RequestMetrics(_AUTHORIZE_BUCKETS)
        registry.register(self._requests)
        self.authorize_requests = Counter(
            "connectors_authorize_requests",
            "Authorize calls by outcome (ok, the error code, or client_disconnected when the client "
            "left while sending its body) and auth type (unknown before the connector was found).",
            ["outcome", "auth_type"],
            registry=registry,
        )
        self.authorize_duration = Histogram(
            "connectors_authorize_duration_seconds",
            "Time to answer an authorize call, caller authentication included.",
            ["auth_type"],
            buckets=_AUTHORIZE_BUCKETS,
            registry=registry,
        )
        self.token_requests = Counter(
            "connectors_token_requests",
            "Token requests sent to identity providers, by grant type and outcome "
            "(authorized, rejected, unreachable).",
            ["grant_type", "outcome"],
            registry=registry,
        )
        self.token_cache_lookups = Counter(
            "connectors_token_cache_lookups",
            "Token cache lookups: hit when a cached token was handed out, miss otherwise.",
            ["result"],
            registry=registry,
        )
        self.token_single_flight_waits = Counter(
            "connectors_token_single_flight_waits",
            "Callers that waited for a token request another caller had started, instead of starting one.",
            registry=registry,
        )
        self.outbound_duration = Histogram(
            "connectors_outbound_request_duration_seconds",
            "Outbound token, validation and webhook requests, retries included, by kind and result "
            "(status class, timeout, refused destination or error).",
            ["kind", "result"],
            buckets=_OUTBOUND_BUCKETS,
            registry=registry,
        )
        self.dns_lookups = Counter(
            "connectors_dns_lookups",
            "Host name lookups for outbound requests, by result: resolved, shared (joined one in "
            "flight), timeout, not_found, cached_failure (a recent failure answered again) or "
            "over_limit (the organization had too many in flight).",
            ["result"],
            registry=registry,
        )
        self.consents = Counter(
            "connectors_consents",
            "Consent callbacks (authorization code connectors) by result: connected, or the error "
            "the admin's browser was sent back with (access_denied, unknown_state, code_rejected, ...).",
            ["result"],
            registry=registry,
        )
        self.connectors = Gauge(
            "connectors_stored",
            "Connectors of all organizations by status state, counted when scraped.",
            ["state"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "connectors_redis_errors",
            "Failed Redis calls, by operation (a fixed name per call site).",
            ["operation"],
            registry=registry,
        )
        self.held = Gauge(
            "connectors_held",
            "Connectors this process holds in memory for authorize.",
            registry=registry,
        )
        self.follower_age = Gauge(
            "connectors_change_follower_age_seconds",
            "Seconds since this process last read the change log (authorize stops past the staleness limit).",
            registry=registry,
        )
        self.database_up = Gauge(
            "connectors_database_up",
            "1 while the database answers this process, 0 from its first failure to its next success.",
            registry=registry,
        )
        self.webhook_delivery_attempts = Counter(
            "connectors_webhook_delivery_attempts",
            "Webhook delivery attempts by result: succeeded (a 2xx answer), failed (any other "
            "answer), or the error code of an attempt that got none (upstream_timeout, "
            "upstream_unreachable, destination_not_allowed, secret_unreadable, internal_error).",
            ["result"],
            registry=registry,
        )
        for result in WEBHOOK_ANSWERED:
            self.webhook_delivery_attempts.labels(result=result)
        self.webhook_deliveries_failed = Counter(
            "connectors_webhook_deliveries_failed",
            "Webhook deliveries given up after their whole retry schedule (their subscription is "
            "then failing).",
            registry=registry,
        )
        self.webhook_oldest_pending_age = Gauge(
            "connectors_webhook_oldest_pending_event_age_seconds",
            "Age of the oldest event still waiting to be delivered to an enabled, active "
            "subscription (0 when none), counted when scraped.",
            registry=registry,
        )
        self.token_cache_hits = self.token_cache_lookups.labels(result="hit")
        self.token_cache_misses = self.token_cache_lookups.labels(result="miss")
        self._authorize_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def set_build_info(self, *, version: str, python_version: str, database: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version=version, python_version=python_version, database=database).set(1)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration; ``route`` is a template or ``unmatched``."""
        self._requests.observe(method, route, status, seconds)

    def observe_authorize(self, outcome: str, auth_type: str | None, seconds: float) -> None:
        """Count one authorize call and its duration; ``outcome`` is ``ok`` or an error code."""
        labels = (outcome, auth_type or UNKNOWN)
        children = self._authorize_children.get(labels)
        if children is None:
            children = self._authorize_children[labels] = (
                self.authorize_requests.labels(*labels),
                self.authorize_duration.labels(labels[1]),
            )
        children[0].inc()
        children[1].observe(seconds)

    def set_connector_states(self, counts: Mapping[str, int] | None) -> None:
        """Set the connectors gauge; ``None`` (the count failed) leaves it without samples."""
        if counts is None:
            self.connectors.clear()
            return
        for state in CONNECTOR_STATES:
            self.connectors.labels(state=state).set(counts.get(state, 0))

    def render(self) -> bytes:
        """The registry in the text exposition format ``CONTENT_TYPE`` names."""
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Pure ASGI middleware counting every answered request, by route template, and its duration.

    The route is read after the request was served, from the route the router matched (the hot
    authorize route sets it too); a request no route matched counts as ``unmatched``. A request
    cancelled before it was answered is not counted.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self._record = metrics._requests.observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            self._observe(scope, status, started)
            raise
        self._observe(scope, status, started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED
        self._record(scope["method"], template, status, time.perf_counter() - started)
