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
measurement is an increment or an observation, never a label lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONNECTOR_STATES", "CONTENT_TYPE", "Metrics", "status_class"]

# The text exposition format 0.0.4, which every Prometheus server reads. (Recent client versions
# point CONTENT_TYPE_LATEST at format 1.0.0; what ``render`` writes is 0.0.4.)
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

CONNECTOR_STATES: Final = ("unverified", "authorized", "rejected", "unreachable")
UNKNOWN: Final = "unknown"

# From a warm in-process answer (well under a millisecond) to a token request that uses the whole
# outbound deadline (5 s by default).
_AUTHORIZE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_OUTBOUND_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def status_class(status_code: int) -> str:
    """``2xx`` for 200 to 299 and so on; ``other`` outside 100 to 599."""
    return f"{status_code // 100}xx" if 100 <= status_code <= 599 else "other"


class Metrics:
    """The service's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.authorize_requests = Counter(
            "connectors_authorize_requests",
            "Authorize calls by outcome (ok or the error code) and auth type (unknown before the "
            "connector was found).",
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
            "Outbound token and validation requests, retries included, by kind and result "
            "(status class, timeout, refused destination or error).",
            ["kind", "result"],
            buckets=_OUTBOUND_BUCKETS,
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
        self.token_cache_hits = self.token_cache_lookups.labels(result="hit")
        self.token_cache_misses = self.token_cache_lookups.labels(result="miss")
        self._authorize_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

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
