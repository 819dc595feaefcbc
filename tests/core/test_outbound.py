from __future__ import annotations

import gzip
import ssl
from collections.abc import Iterable
from datetime import timedelta
from email.utils import format_datetime

import httpcore
import pytest

from app.core.config import Settings
from app.core.errors import (
    AppError,
    DestinationNotAllowed,
    NameNotResolved,
    TokenEndpointTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.core.outbound import (
    OutboundClient,
    build_ssl_context,
    check_url,
    refusal_reason,
    system_resolver,
)
from tests.support.fakes import FakeTime, SequenceResolver, StaticResolver
from tests.support.fixtures import MakeOutbound
from tests.support.servers import Drop, RecordedRequest, Reply, ScriptedServer, unused_port
from tests.support.tls import LocalCA

CANARY = "CANARY-5f2b9d0e-secret"
PUBLIC_V4 = "93.184.215.14"


def _all_text(error: BaseException) -> str:
    """Everything an error could show: message, detail, extras and the whole chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        if isinstance(current, AppError):
            parts += [current.detail, repr(current.extra)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records where the client connects; addresses in ``unreachable`` fail like a dead network."""

    def __init__(self, unreachable: Iterable[str] = ()) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.unreachable = set(unreachable)
        self.connected: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        if host in self.unreachable:
            raise httpcore.ConnectError("network unreachable (simulated)")
        return await self.inner.connect_tcp(host, port, timeout=timeout, socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


# --- TLS, redirects, proxies ---------------------------------------------------------------------


async def test_get_over_verified_tls(outbound: OutboundClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply.json({"ok": True}, headers={"X-Answer": "42"}))

    response = await outbound.request("GET", scripted_server.url("/check"), kind="validation")

    assert response.status_code == 200
    assert response.content == b'{"ok": true}'
    assert response.headers["x-answer"] == "42"
    [request] = scripted_server.requests
    assert request.path == "/check"
    assert request.headers["accept-encoding"] == "identity"


async def test_untrusted_certificate_is_refused_without_retry(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    client = make_outbound(ca_bundle=None)

    with pytest.raises(UpstreamUnreachable, match="could not be verified"):
        await client.request("GET", scripted_server.url(), kind="validation")

    assert scripted_server.count == 0
    assert fake_time.sleeps == []


async def test_certificate_is_checked_against_the_name_in_the_url(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    # Both names lead to the same server; only one is on its certificate.
    resolver = StaticResolver({"api.example.test": ["127.0.0.1"], "evil.example.test": ["127.0.0.1"]})
    client = make_outbound(resolver=resolver)
    scripted_server.set_default(Reply(status=204))

    ok = await client.request("GET", scripted_server.url("/", host="api.example.test"), kind="validation")
    assert ok.status_code == 204
    assert scripted_server.requests[0].headers["host"] == f"api.example.test:{scripted_server.port}"

    with pytest.raises(UpstreamUnreachable, match=r"evil\.example\.test"):
        await client.request("GET", scripted_server.url("/", host="evil.example.test"), kind="validation")
    assert scripted_server.count == 1


def test_ssl_context_always_verifies(local_ca: LocalCA) -> None:
    for context in (build_ssl_context(None), build_ssl_context(local_ca.ca_bundle)):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_redirect_is_returned_not_followed(
    outbound: OutboundClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(Reply(status=302, headers={"Location": scripted_server.url("/elsewhere")}))

    response = await outbound.request("GET", scripted_server.url("/start"), kind="validation")

    assert response.status_code == 302
    assert [r.path for r in scripted_server.requests] == ["/start"]


async def test_proxy_environment_is_ignored(
    outbound: OutboundClient, scripted_server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_proxy = f"http://127.0.0.1:{unused_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    scripted_server.queue(Reply(status=200))

    response = await outbound.request("GET", scripted_server.url(), kind="validation")

    assert response.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/token",
        "ftp://example.com/",
        "https://user:pw@example.com/",
        "https:///nohost",
        "not a url",
    ],
)
async def test_only_plain_https_urls(outbound: OutboundClient, url: str) -> None:
    with pytest.raises(DestinationNotAllowed):
        check_url(url)
    with pytest.raises(DestinationNotAllowed):
        await outbound.request("GET", url, kind="validation")


# --- deadline --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"), [("token", TokenEndpointTimeout), ("validation", UpstreamTimeout)]
)
async def test_slow_answer_hits_the_deadline(
    make_outbound: MakeOutbound,
    scripted_server: ScriptedServer,
    kind: str,
    error: type[AppError],
) -> None:
    client = make_outbound(timeout_seconds=0.3)
    scripted_server.queue(Reply(status=200, delay=30))

    with pytest.raises(error):
        await client.request("GET", scripted_server.url(), kind=kind)  # type: ignore[arg-type]

    assert scripted_server.count == 1


@pytest.mark.parametrize("declare_length", [True, False])
async def test_dripping_body_hits_the_total_deadline(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, declare_length: bool
) -> None:
    # Each byte arrives well within any per-read timeout; only a total deadline stops this.
    client = make_outbound(timeout_seconds=0.3)
    scripted_server.queue(
        Reply(status=200, body=b"x" * 500, drip_interval=0.02, declare_length=declare_length)
    )

    with pytest.raises(TokenEndpointTimeout):
        await client.request("POST", scripted_server.url(), data={"a": "b"}, kind="token")

    assert scripted_server.count == 1


# --- bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("declare_length", [True, False])
async def test_oversized_body_is_refused(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, declare_length: bool
) -> None:
    client = make_outbound(max_response_bytes=1024)
    scripted_server.queue(Reply(status=200, body=b"x" * 5000, declare_length=declare_length))

    with pytest.raises(UpstreamUnreachable, match="larger than 1024 bytes"):
        await client.request("GET", scripted_server.url(), kind="token")


async def test_body_at_the_limit_is_read(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    client = make_outbound(max_response_bytes=1024)
    scripted_server.queue(Reply(status=200, body=b"y" * 1024, declare_length=False))

    response = await client.request("GET", scripted_server.url(), kind="token")

    assert response.content == b"y" * 1024


async def test_compressed_body_is_inflated_within_the_limit(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    client = make_outbound(max_response_bytes=1024)
    small = gzip.compress(b'{"access_token": "abc"}')
    bomb = gzip.compress(b"0" * 1_000_000)
    assert len(bomb) < 1024
    scripted_server.queue(
        Reply(status=200, headers={"Content-Encoding": "gzip"}, body=small),
        Reply(status=200, headers={"Content-Encoding": "gzip"}, body=bomb),
        Reply(status=200, headers={"Content-Encoding": "br"}, body=b"\x0b\x01\x80abc\x03"),
    )

    response = await client.request("GET", scripted_server.url(), kind="token")
    assert response.content == b'{"access_token": "abc"}'
    with pytest.raises(UpstreamUnreachable, match="larger than"):
        await client.request("GET", scripted_server.url(), kind="token")
    with pytest.raises(UpstreamUnreachable, match="encoding"):
        await client.request("GET", scripted_server.url(), kind="token")


# --- retries ---------------------------------------------------------------------------------------


async def test_5xx_then_success_is_retried_with_backoff(
    outbound: OutboundClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.queue(Reply.html(503), Reply.html(502), Reply.json({"ok": True}))

    response = await outbound.request("POST", scripted_server.url(), data={"a": "b"}, kind="token")

    assert response.status_code == 200
    assert scripted_server.count == 3
    # Base 0.1 s doubling, jitter fixed at 0.5 -> 0.75 of nominal.
    assert fake_time.sleeps == pytest.approx([0.075, 0.15])
    assert all(r.form() == {"a": "b"} for r in scripted_server.requests)


async def test_persistent_5xx_returns_the_last_answer_after_max_attempts(
    outbound: OutboundClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.set_default(Reply.html(500))

    response = await outbound.request("GET", scripted_server.url(), kind="validation")

    assert response.status_code == 500
    assert scripted_server.count == 3
    assert len(fake_time.sleeps) == 2


async def test_retry_after_is_honoured_when_it_fits(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    client = make_outbound(timeout_seconds=5)
    scripted_server.queue(Reply(status=429, headers={"Retry-After": "2"}), Reply(status=200))

    response = await client.request("GET", scripted_server.url(), kind="token")

    assert response.status_code == 200
    assert fake_time.sleeps == [2.0]


async def test_retry_after_as_http_date(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    client = make_outbound(timeout_seconds=5)
    when = format_datetime(fake_time.now() + timedelta(seconds=3), usegmt=True)
    scripted_server.queue(Reply(status=503, headers={"Retry-After": when}), Reply(status=200))

    response = await client.request("GET", scripted_server.url(), kind="token")

    assert response.status_code == 200
    assert fake_time.sleeps == [3.0]


async def test_retry_after_beyond_the_deadline_stops_retrying(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    client = make_outbound(timeout_seconds=5)
    scripted_server.set_default(Reply(status=429, headers={"Retry-After": "120"}))

    response = await client.request("GET", scripted_server.url(), kind="token")

    assert response.status_code == 429
    assert scripted_server.count == 1
    assert fake_time.sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_other_4xx_are_not_retried(
    outbound: OutboundClient, scripted_server: ScriptedServer, fake_time: FakeTime, status: int
) -> None:
    scripted_server.set_default(Reply.json({"error": "nope"}, status=status))

    response = await outbound.request("POST", scripted_server.url(), data={"a": "b"}, kind="token")

    assert response.status_code == status
    assert scripted_server.count == 1
    assert fake_time.sleeps == []


async def test_dropped_connection_is_retried(
    outbound: OutboundClient, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    scripted_server.queue(Drop(), Reply(status=200, body=b"ok"))

    response = await outbound.request("GET", scripted_server.url(), kind="validation")

    assert response.content == b"ok"
    assert scripted_server.count == 2
    assert len(fake_time.sleeps) == 1


async def test_refused_connection_is_retried_then_reported(
    outbound: OutboundClient, fake_time: FakeTime
) -> None:
    url = f"https://127.0.0.1:{unused_port()}/token"

    with pytest.raises(UpstreamUnreachable, match=r"could not connect to 127\.0\.0\.1"):
        await outbound.request("POST", url, data={"a": "b"}, kind="token")

    assert len(fake_time.sleeps) == 2


async def test_backoff_that_does_not_fit_the_deadline_ends_retrying(
    make_outbound: MakeOutbound, fake_time: FakeTime
) -> None:
    # 0.2 s deadline: the first wait (0.075 s) fits, the second (0.15 s) no longer does.
    client = make_outbound(timeout_seconds=0.2, max_attempts=5)

    with pytest.raises(UpstreamUnreachable):
        await client.request("GET", f"https://127.0.0.1:{unused_port()}/", kind="validation")

    assert fake_time.sleeps == pytest.approx([0.075])


async def test_unresolvable_host_is_its_own_error(make_outbound: MakeOutbound) -> None:
    resolver = StaticResolver({})
    client = make_outbound(resolver=resolver)

    with pytest.raises(NameNotResolved, match=r"^nowhere\.example\.test could not be resolved$"):
        await client.request("GET", "https://nowhere.example.test/", kind="token")
    # Not retried: a name does not appear within a few hundred milliseconds.
    assert resolver.lookups == ["nowhere.example.test"]


# --- errors say nothing secret ---------------------------------------------------------------------


async def test_errors_never_carry_request_headers_or_body(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    client = make_outbound(timeout_seconds=0.3, max_response_bytes=1024)
    headers = {"Authorization": f"Basic {CANARY}", "X-Api-Key": CANARY}
    data = {"client_secret": CANARY}
    targets = [
        (Reply(status=200, delay=30), scripted_server.url(f"/a?key={CANARY}")),
        (Reply(status=200, body=CANARY.encode() * 200), scripted_server.url()),
        (None, f"https://127.0.0.1:{unused_port()}/?key={CANARY}"),
    ]
    for reply, url in targets:
        if reply is not None:
            scripted_server.queue(reply)
        with pytest.raises(AppError) as caught:
            await client.request("POST", url, headers=headers, data=data, kind="token")
        assert CANARY not in _all_text(caught.value)


# --- destination policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),  # noqa: S104
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("192.0.0.192", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.7", "private"),
        ("198.18.0.1", "private"),
        ("192.0.0.8", "non-global"),  # global to Python 3.11.7, refused by our own table
        ("2001:db8::1", "private"),
        # IPv4 carried inside IPv6 is judged as the IPv4 address it reaches.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a9fe:a9fe::1", "cloud metadata"),
        ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64
        ("2001::1", "private"),  # Teredo
        ("100::1", "reserved"),
        ("fec0::1", "link-local"),
    ],
)
def test_non_global_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal_reason(address) == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_global_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(address) is None


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::1]", "10.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "[fd00:ec2::254]", "0.0.0.0"],  # noqa: S104
)
async def test_literal_private_destinations_are_refused_before_connecting(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, host: str
) -> None:
    backend = RecordingBackend()
    client = make_outbound(allow_private_destinations=False, network_backend=backend)
    url = f"https://{host}:{scripted_server.port}/token"

    with pytest.raises(DestinationNotAllowed):
        await client.check_destination(url)
    with pytest.raises(DestinationNotAllowed) as caught:
        await client.request("POST", url, data={"client_secret": CANARY}, kind="token")

    assert backend.connected == []
    assert scripted_server.count == 0
    assert CANARY not in _all_text(caught.value)


def test_check_url_refuses_literal_addresses_without_resolving() -> None:
    assert check_url("https://api.example.test/x").host == "api.example.test"
    assert check_url("https://10.0.0.1/", allow_private_destinations=True).host == "10.0.0.1"
    assert check_url("https://8.8.8.8/", allow_private_destinations=False).host == "8.8.8.8"
    with pytest.raises(DestinationNotAllowed, match="is a cloud metadata address"):
        check_url("https://169.254.169.254/latest/meta-data", allow_private_destinations=False)
    with pytest.raises(DestinationNotAllowed, match="is a loopback address"):
        check_url("https://[::ffff:127.0.0.1]:8443/", allow_private_destinations=False)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1"])
async def test_odd_spellings_of_loopback_are_refused(make_outbound: MakeOutbound, host: str) -> None:
    client = make_outbound(allow_private_destinations=False, resolver=system_resolver)

    with pytest.raises(DestinationNotAllowed, match="loopback"):
        await client.check_destination(f"https://{host}/")


async def test_name_resolving_to_a_private_address_is_refused_without_naming_it(
    make_outbound: MakeOutbound,
) -> None:
    client = make_outbound(
        allow_private_destinations=False, resolver=StaticResolver({"intranet.example.test": ["10.9.8.7"]})
    )

    with pytest.raises(DestinationNotAllowed) as caught:
        await client.request("GET", "https://intranet.example.test/", kind="validation")

    assert "intranet.example.test" in caught.value.detail
    assert "10.9.8.7" not in _all_text(caught.value)


async def test_one_private_answer_among_public_ones_refuses_the_host(make_outbound: MakeOutbound) -> None:
    backend = RecordingBackend()
    resolver = StaticResolver({"mixed.example.test": [PUBLIC_V4, "127.0.0.1"]})
    client = make_outbound(allow_private_destinations=False, resolver=resolver, network_backend=backend)

    with pytest.raises(DestinationNotAllowed):
        await client.request("GET", "https://mixed.example.test/", kind="validation")

    assert backend.connected == []


async def test_rebinding_dns_never_leads_to_the_private_address(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    # First lookup public (the check passes), later lookups 127.0.0.1, where a server waits.
    resolver = SequenceResolver([PUBLIC_V4], ["127.0.0.1"])
    backend = RecordingBackend(unreachable=[PUBLIC_V4])
    client = make_outbound(allow_private_destinations=False, resolver=resolver, network_backend=backend)
    url = scripted_server.url("/token", host="api.example.test")

    with pytest.raises(DestinationNotAllowed):
        await client.request("POST", url, data={"a": "b"}, kind="token")

    # The connection went to the checked address, never to a name a second lookup could answer;
    # the retry resolved again, and that answer was checked and refused.
    assert backend.connected == [(PUBLIC_V4, scripted_server.port)]
    assert resolver.lookups == ["api.example.test", "api.example.test"]
    assert scripted_server.count == 0


async def test_allowed_private_destination_still_connects_to_the_resolved_address(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    resolver = StaticResolver({"idp.example.test": ["127.0.0.1"]})
    backend = RecordingBackend()
    client = make_outbound(allow_private_destinations=True, resolver=resolver, network_backend=backend)
    scripted_server.set_default(Reply(status=200, body=b"hello"))

    response = await client.request("GET", scripted_server.url("/", host="idp.example.test"), kind="token")

    assert response.content == b"hello"
    assert backend.connected == [("127.0.0.1", scripted_server.port)]
    assert resolver.lookups == ["idp.example.test"]


async def test_next_checked_address_is_tried_when_one_fails(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer, fake_time: FakeTime
) -> None:
    resolver = StaticResolver({"idp.example.test": ["127.0.0.2", "127.0.0.1"]})
    backend = RecordingBackend(unreachable=["127.0.0.2"])
    client = make_outbound(resolver=resolver, network_backend=backend)
    scripted_server.set_default(Reply(status=204))

    response = await client.request("GET", scripted_server.url("/", host="idp.example.test"), kind="token")

    assert response.status_code == 204
    assert [address for address, _ in backend.connected] == ["127.0.0.2", "127.0.0.1"]
    assert fake_time.sleeps == []


async def test_check_destination(make_outbound: MakeOutbound) -> None:
    resolver = StaticResolver({"api.example.test": [PUBLIC_V4], "db.example.test": ["192.168.0.5"]})
    strict = make_outbound(allow_private_destinations=False, resolver=resolver)

    await strict.check_destination("https://api.example.test/v1")
    await strict.check_destination("https://gone.example.test/")  # unresolvable: not refused here
    with pytest.raises(DestinationNotAllowed, match=r"db\.example\.test resolves to a private address"):
        await strict.check_destination("https://db.example.test/")
    with pytest.raises(DestinationNotAllowed):
        await strict.check_destination("http://api.example.test/")

    lenient_resolver = StaticResolver({})
    lenient = make_outbound(allow_private_destinations=True, resolver=lenient_resolver)
    await lenient.check_destination("https://127.0.0.1/")
    await lenient.check_destination("https://db.example.test/")
    assert lenient_resolver.lookups == []


# --- construction ------------------------------------------------------------------------------------


async def test_from_settings(local_ca: LocalCA, scripted_server: ScriptedServer) -> None:
    settings = Settings(
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=True,
        outbound_timeout_seconds=1.5,
        outbound_max_response_bytes=2048,
    )
    scripted_server.set_default(Reply(status=200, body=b"z" * 3000))

    async with OutboundClient.from_settings(settings) as client:
        with pytest.raises(UpstreamUnreachable, match="larger than 2048"):
            await client.request("GET", scripted_server.url(), kind="validation")


async def test_server_sees_no_headers_it_was_not_given(
    outbound: OutboundClient, scripted_server: ScriptedServer
) -> None:
    seen: list[RecordedRequest] = []

    def capture(request: RecordedRequest) -> Reply:
        seen.append(request)
        return Reply(status=204)

    scripted_server.queue(capture)
    await outbound.request("GET", scripted_server.url(), headers={"X-One": "1"}, kind="validation")

    assert set(seen[0].headers) == {"host", "accept", "accept-encoding", "connection", "user-agent", "x-one"}
