from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from app.core.errors import (
    CredentialsRejected,
    DestinationNotAllowed,
    InvalidRequest,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.core.outbound import OutboundClient
from app.tokens.basic import basic_header, check_basic
from app.tokens.types import BasicConfig
from tests.support.fixtures import MakeOutbound
from tests.support.servers import Reply, ScriptedServer

PASSWORD = "pässword:with colon CANARY"


def _config(url: str) -> BasicConfig:
    return BasicConfig(username="svc-user", password=SecretStr(PASSWORD), validation_url=url)


def test_basic_header_is_utf8_base64() -> None:
    header = basic_header("jürgen", SecretStr("pa:ss wörd"))

    scheme, _, encoded = header.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode("utf-8") == "jürgen:pa:ss wörd"
    # RFC 7617's own example.
    assert basic_header("Aladdin", SecretStr("open sesame")) == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


def test_username_with_colon_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        basic_header("a:b", SecretStr("x"))


@pytest.mark.parametrize("status", [200, 204, 299])
async def test_2xx_accepts(outbound: OutboundClient, scripted_server: ScriptedServer, status: int) -> None:
    scripted_server.queue(Reply(status=status))

    await check_basic(outbound, _config(scripted_server.url("/auth/check")))

    [request] = scripted_server.requests
    assert request.method == "GET"
    assert request.path == "/auth/check"
    assert request.headers["authorization"] == basic_header("svc-user", SecretStr(PASSWORD))


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_reject(
    outbound: OutboundClient, scripted_server: ScriptedServer, status: int
) -> None:
    scripted_server.queue(Reply.json({"error": "denied", "echo": PASSWORD}, status=status))

    with pytest.raises(CredentialsRejected) as caught:
        await check_basic(outbound, _config(scripted_server.url()))

    assert PASSWORD not in str(caught.value)
    assert scripted_server.count == 1


async def test_redirect_is_not_followed(outbound: OutboundClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply(status=302, headers={"Location": scripted_server.url("/login")}))
    scripted_server.set_default(Reply(status=200))

    with pytest.raises(UpstreamUnreachable, match="redirect"):
        await check_basic(outbound, _config(scripted_server.url("/auth/check")))

    assert [r.path for r in scripted_server.requests] == ["/auth/check"]


@pytest.mark.parametrize("status", [400, 404, 405, 418])
async def test_other_4xx_are_unreachable_not_rejected(
    outbound: OutboundClient, scripted_server: ScriptedServer, status: int
) -> None:
    scripted_server.queue(Reply(status=status))

    with pytest.raises(UpstreamUnreachable, match=f"HTTP {status}"):
        await check_basic(outbound, _config(scripted_server.url()))

    assert scripted_server.count == 1


async def test_5xx_is_retried_then_unreachable(
    outbound: OutboundClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply.html(502))

    with pytest.raises(UpstreamUnreachable, match="HTTP 502"):
        await check_basic(outbound, _config(scripted_server.url()))

    assert scripted_server.count == 3


async def test_5xx_then_success(outbound: OutboundClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply.html(503), Reply(status=200))

    await check_basic(outbound, _config(scripted_server.url()))

    assert scripted_server.count == 2


async def test_timeout(make_outbound: MakeOutbound, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply(status=200, delay=30))

    with pytest.raises(UpstreamTimeout):
        await check_basic(make_outbound(timeout_seconds=0.3), _config(scripted_server.url()))


async def test_private_destination_is_refused(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    client = make_outbound(allow_private_destinations=False)

    with pytest.raises(DestinationNotAllowed):
        await check_basic(client, _config(scripted_server.url()))

    assert scripted_server.count == 0
