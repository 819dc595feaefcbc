"""Every request counted by route template, the build info series, and no ``_created`` series."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import prometheus_client.metrics
import pytest
from sqlalchemy.engine import make_url
from starlette.responses import Response

from app import __version__
from app.core.config import Settings
from app.core.metrics import Metrics
from tests.connectors import payloads
from tests.support.metrics import parse, scrape

ClientFor = Callable[..., httpx.AsyncClient]
REQUESTS = "connectors_http_requests_total"
DURATIONS = "connectors_http_request_duration_seconds_count"


@pytest.fixture
def created_series_on() -> Iterator[None]:
    """The client library's own default, whatever the environment says, put back afterwards."""
    before = prometheus_client.metrics._use_created
    prometheus_client.metrics._use_created = True
    yield
    prometheus_client.metrics._use_created = before


def test_no_series_is_a_created_timestamp(created_series_on: None) -> None:
    metrics = Metrics()
    metrics.observe_authorize("ok", "basic", 0.001)
    metrics.observe_request("GET", "/healthz", 200, 0.001)
    metrics.token_requests.labels(grant_type="client_credentials", outcome="authorized").inc()
    metrics.token_cache_hits.inc()
    metrics.token_single_flight_waits.inc()
    metrics.outbound_duration.labels(kind="token", result="2xx").observe(0.01)
    metrics.redis_errors.labels(operation="get").inc()
    text = metrics.render().decode()
    assert "connectors_http_requests_total{" in text
    assert "_created" not in text


def test_methods_beyond_the_usual_ones_share_one_series() -> None:
    metrics = Metrics()
    for method in ("BREW", "PROPFIND", "X" * 200, "get"):
        metrics.observe_request(method, "unmatched", 405, 0.001)
    metrics.observe_request("DELETE", "/connectors/{connector_id}", 204, 0.001)
    result = parse(metrics.render().decode())
    assert result.value(REQUESTS, method="other", route="unmatched", status="405") == 4
    assert result.value(REQUESTS, method="DELETE", route="/connectors/{connector_id}", status="204") == 1
    assert {labels for name, labels in result.samples if name == REQUESTS} == {
        (("method", "other"), ("route", "unmatched"), ("status", "405")),
        (("method", "DELETE"), ("route", "/connectors/{connector_id}"), ("status", "204")),
    }


async def test_the_build_info_names_version_python_and_database(app: Any, settings: Settings) -> None:
    result = await scrape(app)
    database = make_url(settings.effective_database_url).get_backend_name()
    assert database in ("sqlite", "postgresql")
    info = {
        labels: value for (name, labels), value in result.samples.items() if name == "connectors_build_info"
    }
    assert info == {
        (("database", database), ("python_version", platform.python_version()), ("version", __version__)): 1.0
    }


async def test_requests_are_counted_by_route_template(app: Any, client_for: ClientFor) -> None:
    async def boom() -> Response:
        raise RuntimeError("unexpected")

    app.add_api_route("/boom", boom)
    client = client_for()
    created = await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})
    assert created.status_code == 201
    connector = created.json()["id"]
    missing = "00000000-0000-4000-8000-000000000000"
    for _ in range(2):
        assert (await client.get(f"/connectors/{connector}")).status_code == 200
    assert (await client.get(f"/connectors/{missing}")).status_code == 404
    for _ in range(3):
        assert (await client.post(f"/connectors/{connector}/authorize", json={})).status_code == 200
    assert (await client.post(f"/connectors/{missing}/authorize", json={})).status_code == 404
    for path in ("/nowhere", f"/connectors/{connector}/a/b", "/docs/"):
        assert (await client.get(path)).status_code == 404
    assert (await client.put("/connectors")).status_code == 405
    assert (await client.request("BREW", "/healthz")).status_code == 405
    assert (await client.post("/connectors", content=b"x" * (64 * 1024 + 1))).status_code == 413
    assert (await client.get("/boom")).status_code == 500
    for _ in range(4):
        assert (await client.get("/healthz")).status_code == 200

    result = await scrape(app)
    one, authorize = "/connectors/{connector_id}", "/connectors/{connector_id}/authorize"
    expected = {
        ("POST", "/connectors", "201"): 1,
        ("GET", one, "200"): 2,
        ("GET", one, "404"): 1,
        ("POST", authorize, "200"): 3,
        ("POST", authorize, "404"): 1,
        ("GET", "unmatched", "404"): 3,
        ("PUT", "/connectors", "405"): 1,
        ("other", "/healthz", "405"): 1,
        # Refused before any route was matched.
        ("POST", "unmatched", "413"): 1,
        ("GET", "/boom", "500"): 1,
        ("GET", "/healthz", "200"): 4,
    }
    counted = {
        tuple(dict(labels)[key] for key in ("method", "route", "status")): value
        for (name, labels), value in result.samples.items()
        if name == REQUESTS
    }
    assert counted == expected
    for method, route in {(method, route) for method, route, _ in expected}:
        assert result.value(DURATIONS, method=method, route=route) == sum(
            count for (m, r, _), count in expected.items() if (m, r) == (method, route)
        )
    # Never a path as sent: no id, no unknown path.
    for value in (connector, missing, "nowhere", "/a/b", "BREW"):
        assert value not in result.text
    assert "_created" not in result.text

    # The scrape itself is counted by the next one.
    assert (await scrape(app)).value(REQUESTS, method="GET", route="/metrics", status="200") == 1


def test_durations_fall_in_the_buckets_a_histogram_has() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.003, 20.0):
        metrics.observe_request("GET", "/healthz", 200, seconds)
    result = parse(metrics.render().decode())
    bucket = "connectors_http_request_duration_seconds_bucket"
    labels = {"method": "GET", "route": "/healthz"}
    # A duration equal to a bound is in that bound's bucket; buckets are cumulative.
    assert [result.value(bucket, le=le, **labels) for le in ("0.0005", "0.001", "0.005", "10.0", "+Inf")] == [
        1,
        1,
        2,
        2,
        3,
    ]
    assert result.value(DURATIONS, **labels) == 3
    assert result.value("connectors_http_request_duration_seconds_sum", **labels) == pytest.approx(20.0035)
