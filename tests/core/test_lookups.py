"""Name lookups: one flight per name, a deadline that ends it, a negative cache, a cap per
organization; and c-ares against a DNS server of the test's own that never answers some names."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from app.core.errors import NameNotResolved
from app.core.metrics import Metrics
from app.core.outbound import CaresResolver, Lookups, on_behalf_of
from tests.support.dns import DNSServer
from tests.support.fakes import FakeTime


class GatedResolver:
    """Answers each name only once its gate is opened; counts and remembers cancellations."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, host: str) -> asyncio.Event:
        return self.gates.setdefault(host, asyncio.Event())

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        try:
            await self.gate(host).wait()
        except asyncio.CancelledError:
            self.cancelled.append(host)
            raise
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return self.table[host]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make(resolver: GatedResolver, fake_time: FakeTime, **options: float) -> Lookups:
    return Lookups(
        resolver,
        timeout_seconds=options.get("timeout", 30.0),
        negative_ttl_seconds=options.get("negative_ttl", 5.0),
        max_per_tenant=int(options.get("max_per_tenant", 8)),
        clock=fake_time,
    )


async def test_concurrent_lookups_of_a_name_share_one_flight(fake_time: FakeTime) -> None:
    resolver = GatedResolver({"idp.example.test": ["192.0.2.10"]})
    lookups = make(resolver, fake_time)
    waiters = [
        asyncio.create_task(lookups(name, 443)) for name in ["idp.example.test", "IDP.example.test"] * 10
    ]
    await settle()
    assert resolver.calls == ["idp.example.test"]
    resolver.gate("idp.example.test").set()
    assert await asyncio.gather(*waiters) == [["192.0.2.10"]] * 20
    assert lookups.in_flight() == 0


async def test_a_waiter_giving_up_leaves_the_lookup_to_the_others(fake_time: FakeTime) -> None:
    resolver = GatedResolver({"idp.example.test": ["192.0.2.10"]})
    lookups = make(resolver, fake_time)
    first = asyncio.create_task(lookups("idp.example.test", 443))
    second = asyncio.create_task(lookups("idp.example.test", 443))
    await settle()
    first.cancel()
    await settle()
    resolver.gate("idp.example.test").set()
    assert await second == ["192.0.2.10"]
    assert first.cancelled()
    assert resolver.cancelled == []


async def test_the_deadline_ends_the_lookup_itself(fake_time: FakeTime) -> None:
    resolver = GatedResolver({})  # never opened: a DNS server that never answers
    lookups = make(resolver, fake_time, timeout=0.05)
    with pytest.raises(NameNotResolved, match=r"^dark\.example\.test could not be resolved: no answer"):
        await lookups("dark.example.test", 443)
    assert resolver.cancelled == ["dark.example.test"]
    assert lookups.in_flight() == 0


async def test_a_failed_name_fails_at_once_until_the_negative_ttl_passes(fake_time: FakeTime) -> None:
    resolver = GatedResolver({})
    lookups = make(resolver, fake_time, negative_ttl=5.0)
    resolver.gate("gone.example.test").set()
    with pytest.raises(NameNotResolved, match=r"^gone\.example\.test could not be resolved$"):
        await lookups("gone.example.test", 443)
    fake_time.advance(4.9)
    with pytest.raises(NameNotResolved, match=r"^gone\.example\.test could not be resolved$"):
        await lookups("gone.example.test", 443)
    assert resolver.calls == ["gone.example.test"]
    fake_time.advance(0.2)
    resolver.table["gone.example.test"] = ["192.0.2.11"]
    assert await lookups("gone.example.test", 443) == ["192.0.2.11"]
    assert resolver.calls == ["gone.example.test"] * 2


async def test_an_empty_answer_is_not_resolved(fake_time: FakeTime) -> None:
    resolver = GatedResolver({"empty.example.test": []})
    resolver.gate("empty.example.test").set()
    lookups = make(resolver, fake_time)
    with pytest.raises(NameNotResolved, match="no addresses"):
        await lookups("empty.example.test", 443)


async def test_one_organization_cannot_hold_more_lookups_than_its_cap(fake_time: FakeTime) -> None:
    resolver = GatedResolver({"idp.a.example.test": ["192.0.2.1"], "shared.example.test": ["192.0.2.2"]})
    lookups = make(resolver, fake_time, max_per_tenant=3)
    with on_behalf_of("org-b"):
        dark = [asyncio.create_task(lookups(f"h{i}.dark.example.test", 443)) for i in range(3)]
        await settle()
        assert lookups.in_flight("org-b") == 3
        # A fourth name is refused at once, naming only that name; nothing is sent for it.
        with pytest.raises(NameNotResolved, match=r"^h3\.dark\.example\.test was not looked up: .* 3 name"):
            await lookups("h3.dark.example.test", 443)
        assert "h3.dark.example.test" not in resolver.calls
        # Joining a lookup already in flight costs no new flight, so it is not refused.
        joined = asyncio.create_task(lookups("h0.dark.example.test", 443))
        await settle()
        assert not joined.done()
    # Another organization is untouched by B's cap, and so is the service's own (no organization).
    with on_behalf_of("org-a"):
        resolver.gate("idp.a.example.test").set()
        assert await lookups("idp.a.example.test", 443) == ["192.0.2.1"]
    resolver.gate("shared.example.test").set()
    assert await lookups("shared.example.test", 443) == ["192.0.2.2"]
    assert lookups.in_flight("org-a") == 0

    # Once B's lookups end, B may look up again.
    for i in range(3):
        resolver.gate(f"h{i}.dark.example.test").set()
    for task in [*dark, joined]:
        with pytest.raises(NameNotResolved):
            await task
    assert lookups.in_flight("org-b") == 0
    resolver.table["h4.dark.example.test"] = ["192.0.2.4"]
    resolver.gate("h4.dark.example.test").set()
    with on_behalf_of("org-b"):
        assert await lookups("h4.dark.example.test", 443) == ["192.0.2.4"]


async def test_lookups_are_counted_by_result(fake_time: FakeTime) -> None:
    resolver = GatedResolver({"idp.example.test": ["192.0.2.10"]})
    metrics = Metrics()
    lookups = Lookups(resolver, timeout_seconds=30, clock=fake_time, metrics=metrics)
    resolver.gate("idp.example.test").set()
    resolver.gate("gone.example.test").set()
    await asyncio.gather(lookups("idp.example.test", 443), lookups("idp.example.test", 443))
    for _ in range(2):
        with pytest.raises(NameNotResolved):
            await lookups("gone.example.test", 443)
    counted = {
        sample.labels["result"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "connectors_dns_lookups"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {"resolved": 1, "shared": 1, "not_found": 1, "cached_failure": 1}


# c-ares against a real DNS server -------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(
        {"idp.example.test": ["127.0.0.1"], "v6.example.test": ["::1"]}, silent=["dark.example.test"]
    ) as server:
        yield server


async def test_c_ares_resolves_from_the_configured_server(dns_server: DNSServer) -> None:
    resolver = CaresResolver(timeout_seconds=2.0, nameservers=[dns_server.address])
    try:
        assert await resolver("idp.example.test", 443) == ["127.0.0.1"]
        assert await resolver("v6.example.test", 443) == ["::1"]
        lookups = Lookups(resolver, timeout_seconds=2.0)
        with pytest.raises(
            NameNotResolved, match=r"^nowhere\.example\.test could not be resolved: no such name$"
        ):
            await lookups("nowhere.example.test", 443)
    finally:
        await resolver.aclose()
    # Looked up as written: no search domain appended.
    assert set(dns_server.questions) == {"idp.example.test", "v6.example.test", "nowhere.example.test"}


async def test_unanswered_lookups_hold_up_nothing_else(dns_server: DNSServer) -> None:
    """A hundred names that are never answered: c-ares keeps them as datagrams, not threads, so
    a good name, and the loop's own getaddrinfo (database and Redis connections), answer at once."""
    deadline = 10.0
    lookups = Lookups(
        CaresResolver(timeout_seconds=deadline, nameservers=[dns_server.address]),
        timeout_seconds=deadline,
        max_per_tenant=1000,
    )
    loop = asyncio.get_running_loop()
    try:
        with on_behalf_of("org-b"):
            dark = [asyncio.create_task(lookups(f"h{i}.dark.example.test", 443)) for i in range(100)]
        while sum(dns_server.asked(f"h{i}.dark.example.test") for i in range(100)) < 100:
            await asyncio.sleep(0.01)
        with on_behalf_of("org-a"):
            assert await lookups("idp.example.test", 443) == ["127.0.0.1"]
        await loop.getaddrinfo("localhost", 5432)
        # Both answered while every unanswered lookup was still waiting on its deadline.
        assert not any(task.done() for task in dark)
    finally:
        await lookups.aclose()
        await asyncio.gather(*dark, return_exceptions=True)


async def test_c_ares_ends_an_unanswered_lookup_by_itself(dns_server: DNSServer) -> None:
    resolver = CaresResolver(timeout_seconds=0.3, nameservers=[dns_server.address])
    try:
        with pytest.raises(TimeoutError):
            await resolver("h.dark.example.test", 443)
    finally:
        await resolver.aclose()
    # c-ares gave up by itself (no deadline of ours around it), after asking at least once.
    assert dns_server.asked("h.dark.example.test") >= 1
