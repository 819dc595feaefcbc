"""The metrics registry and what each measured part counts, without the application around it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import prometheus_client
import pytest
from pydantic import SecretStr

from app.connectors.kinds.client_auth.client_secret_basic import ClientSecretBasic
from app.core.errors import AppError, CredentialsRejected, DestinationNotAllowed
from app.core.metrics import CONNECTOR_STATES, CONTENT_TYPE, Metrics, status_class
from app.core.outbound import OutboundClient
from app.tokens.cache import TokenCache
from app.tokens.oauth import OAuth2TokenClient
from app.tokens.types import OAuth2Config, RefreshTokenRejected
from tests.support.fakes import FakeTime
from tests.support.metrics import Scrape, parse
from tests.support.servers import Reply, ScriptedServer, unused_port
from tests.support.tls import LocalCA
from tests.tokens.test_cache import KEY, FakeClock, FakeFetcher, Loader, settle

OUTBOUND = "connectors_outbound_request_duration_seconds_count"


def scraped(metrics: Metrics) -> Scrape:
    return parse(metrics.render().decode())


def test_status_classes() -> None:
    assert [status_class(code) for code in (100, 200, 204, 302, 404, 503, 599)] == [
        "1xx",
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "5xx",
    ]
    assert status_class(99) == status_class(600) == "other"
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_each_metrics_object_has_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.observe_authorize("ok", "basic", 0.002)
    first.observe_authorize("ok", "basic", 0.004)
    first.observe_authorize("connector_not_found", None, 0.001)
    first.redis_errors.labels(operation="get").inc()
    one, other = scraped(first), scraped(second)
    assert one.value("connectors_authorize_requests_total", outcome="ok", auth_type="basic") == 2
    assert one.value("connectors_authorize_duration_seconds_sum", auth_type="basic") == pytest.approx(0.006)
    assert (
        one.value("connectors_authorize_requests_total", outcome="connector_not_found", auth_type="unknown")
        == 1
    )
    assert one.value("connectors_redis_errors_total", operation="get") == 1
    assert other.total("connectors_authorize_requests_total") == 0
    assert other.total("connectors_redis_errors_total") == 0
    # Nothing lands in the library's process-wide registry.
    assert not [name for name in prometheus_client.REGISTRY._names_to_collectors if "connectors" in name]


def test_the_connectors_gauge_has_every_state_or_none() -> None:
    metrics = Metrics()
    metrics.set_connector_states({"authorized": 3, "rejected": 1})
    result = scraped(metrics)
    assert {state: result.value("connectors_stored", state=state) for state in CONNECTOR_STATES} == {
        "unverified": 0,
        "authorized": 3,
        "rejected": 1,
        "unreachable": 0,
        "consent_required": 0,
    }
    metrics.set_connector_states(None)
    assert scraped(metrics).total("connectors_stored") == 0
    assert "connectors_stored{" not in metrics.render().decode()


# Outbound requests ------------------------------------------------------------------------------


@pytest.fixture
async def measured(local_ca: LocalCA, fake_time: FakeTime) -> AsyncIterator[tuple[Metrics, OutboundClient]]:
    metrics = Metrics()
    client = OutboundClient(
        timeout_seconds=0.5,
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=True,
        max_response_bytes=64 * 1024,
        clock=fake_time,
        sleep=fake_time.sleep,
        jitter=lambda: 0.5,
        metrics=metrics,
    )
    yield metrics, client
    await client.aclose()


async def test_outbound_requests_are_counted_by_kind_and_result(
    measured: tuple[Metrics, OutboundClient], scripted_server: ScriptedServer
) -> None:
    metrics, client = measured
    scripted_server.queue(
        Reply(status=200),
        Reply(status=404),
        Reply.html(503),
        Reply.html(503),
        Reply.html(503),
        Reply(status=200, delay=2.0),
    )
    url = scripted_server.url("/x")
    assert (await client.request("POST", url, kind="token")).status_code == 200
    assert (await client.request("GET", url, kind="validation")).status_code == 404
    # Three attempts, one operation: counted once, with the final answer.
    assert (await client.request("POST", url, kind="token")).status_code == 503
    with pytest.raises(AppError) as timeout:
        await client.request("POST", url, kind="token")
    assert timeout.value.code == "token_endpoint_timeout"
    with pytest.raises(AppError) as unreachable:
        await client.request("GET", f"https://127.0.0.1:{unused_port()}/", kind="validation")
    assert unreachable.value.code == "upstream_unreachable"

    result = scraped(metrics)
    assert result.value(OUTBOUND, kind="token", result="2xx") == 1
    assert result.value(OUTBOUND, kind="validation", result="4xx") == 1
    assert result.value(OUTBOUND, kind="token", result="5xx") == 1
    assert result.value(OUTBOUND, kind="token", result="timeout") == 1
    assert result.value(OUTBOUND, kind="validation", result="error") == 1
    assert result.total(OUTBOUND) == 5
    assert "127.0.0.1" not in result.text


async def test_a_refused_destination_is_counted_as_refused(local_ca: LocalCA) -> None:
    metrics = Metrics()
    async with OutboundClient(
        timeout_seconds=0.5,
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=False,
        max_response_bytes=1024,
        metrics=metrics,
    ) as client:
        with pytest.raises(DestinationNotAllowed):
            await client.request("GET", "https://127.0.0.1:9/", kind="validation")
    assert scraped(metrics).value(OUTBOUND, kind="validation", result="refused") == 1


# Token requests ---------------------------------------------------------------------------------


def _config(token_url: str) -> OAuth2Config:
    return OAuth2Config(
        grant_type="client_credentials",
        token_url=token_url,
        client_id="client",
        client_auth=ClientSecretBasic(SecretStr("CANARY-metrics-secret")),
    )


async def test_token_requests_are_counted_by_grant_and_outcome(
    measured: tuple[Metrics, OutboundClient], scripted_server: ScriptedServer
) -> None:
    metrics, outbound = measured
    fetcher = OAuth2TokenClient(outbound, default_token_lifetime_seconds=600, metrics=metrics)
    scripted_server.queue(
        Reply.json({"access_token": "a", "token_type": "Bearer", "expires_in": 60}),
        Reply.json({"error": "invalid_client"}, status=401),
        Reply.json({"error": "invalid_grant"}, status=400),
        Reply.json({"error": "invalid_scope"}, status=400),
    )
    config = _config(scripted_server.url("/token"))
    await fetcher(config)
    with pytest.raises(CredentialsRejected):
        await fetcher(config)
    with pytest.raises(RefreshTokenRejected):
        await fetcher(config, refresh_token="r-1")
    with pytest.raises(AppError):
        await fetcher(config)

    result = scraped(metrics)
    name = "connectors_token_requests_total"
    assert result.value(name, grant_type="client_credentials", outcome="authorized") == 1
    assert result.value(name, grant_type="client_credentials", outcome="rejected") == 1
    assert result.value(name, grant_type="refresh_token", outcome="rejected") == 1
    assert result.value(name, grant_type="client_credentials", outcome="unreachable") == 1
    assert result.total(name) == 4
    assert "CANARY" not in result.text
    assert "invalid_" not in result.text


# The token cache --------------------------------------------------------------------------------


async def test_cache_hits_misses_and_single_flight_waits() -> None:
    clock = FakeClock()
    fetcher = FakeFetcher(clock)
    load = Loader()
    metrics = Metrics()
    cache = TokenCache(fetcher, clock=clock, metrics=metrics)
    lookups, waits = "connectors_token_cache_lookups_total", "connectors_token_single_flight_waits_total"
    try:
        gate = fetcher.block()
        cold = [asyncio.create_task(cache.get(KEY, load)) for _ in range(5)]
        await settle()
        gate.set()
        await asyncio.gather(*cold)
        result = scraped(metrics)
        assert (result.value(lookups, result="miss"), result.value(lookups, result="hit")) == (5, 0)
        assert result.value(waits) == 4

        fetcher.gate = None
        await cache.get(KEY, load)
        # Past the refresh point the cached token is still handed out at once: a hit.
        clock.advance(3300.0)
        await cache.get(KEY, load)
        await settle()
        result = scraped(metrics)
        assert (result.value(lookups, result="miss"), result.value(lookups, result="hit")) == (5, 2)

        # A caller reporting the token refused (old enough to be dropped) waits for a new one: a miss.
        current = await cache.get(KEY, load)
        clock.advance(10.0)
        await cache.get(KEY, load, stale_token=current.access_token)
        result = scraped(metrics)
        assert (result.value(lookups, result="miss"), result.value(lookups, result="hit")) == (6, 3)
        assert result.value(waits) == 4
    finally:
        await cache.aclose()
