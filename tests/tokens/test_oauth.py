from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import unquote, unquote_plus

import pytest
from pydantic import SecretStr

from app.connectors.kinds.client_auth import method_of
from app.core.errors import (
    AppError,
    CredentialsRejected,
    TokenEndpointError,
    TokenEndpointTimeout,
    UpstreamUnreachable,
)
from app.core.outbound import OutboundClient
from app.tokens.oauth import MAX_EXPIRES_IN_SECONDS, OAuth2TokenClient, client_basic_header
from app.tokens.types import ClientAuth, OAuth2Config, RefreshTokenRejected, TokenFetcher
from tests.support.authserver import AuthorizationServerThread, RegisteredClient
from tests.support.fixtures import MakeOutbound
from tests.support.servers import RecordedRequest, Reply, ScriptedServer

CANARY = "CANARY-0c1d-provider-text"
DEFAULT_LIFETIME = 900


def _client_auth(method: str, secret: SecretStr) -> ClientAuth:
    return method_of(method).build({}, {"client_secret": secret})


def _with_client_auth(config: OAuth2Config, changes: dict[str, object]) -> OAuth2Config:
    """``changes`` may name ``client_auth_method`` and ``client_secret`` as a connector does."""
    method = changes.pop("client_auth_method", config.client_auth.method)
    secret = changes.pop("client_secret", None)
    if secret is None:
        secret = getattr(config.client_auth, "client_secret")  # noqa: B009
    assert isinstance(method, str) and isinstance(secret, SecretStr)
    return replace(config, client_auth=_client_auth(method, secret), **changes)  # type: ignore[arg-type]


def _config(token_url: str, **changes: object) -> OAuth2Config:
    base = OAuth2Config(
        grant_type="client_credentials",
        token_url=token_url,
        client_id="svc client",
        client_auth=_client_auth("client_secret_basic", SecretStr("s3cr&t:+/%é")),
        scope="read write",
        audience="https://api.example.test",
        extra_token_params={"resource": "urn:api", "grant_type": "implicit", "client_secret": "x"},
    )
    return _with_client_auth(base, dict(changes))


def _basic_credentials(request: RecordedRequest) -> tuple[str, str]:
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, secret = base64.b64decode(encoded).decode("ascii").partition(":")
    return user, secret


def _all_text(error: BaseException) -> str:
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        if isinstance(current, AppError):
            parts += [current.detail, repr(current.extra)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


@pytest.fixture
def fetch(outbound: OutboundClient) -> OAuth2TokenClient:
    return OAuth2TokenClient(outbound, default_token_lifetime_seconds=DEFAULT_LIFETIME)


def _ok(**fields: object) -> Reply:
    return Reply.json({"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600, **fields})


def test_implements_the_token_fetcher_protocol(fetch: OAuth2TokenClient) -> None:
    fetcher: TokenFetcher = fetch
    assert callable(fetcher)


# --- what is sent ----------------------------------------------------------------------------------


async def test_client_credentials_with_basic_auth(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(_ok())

    grant = await fetch(_config(scripted_server.url("/oauth/token")))

    assert grant.access_token == "at-1"
    assert grant.expires_in == 3600
    assert grant.refresh_token is None
    [request] = scripted_server.requests
    assert request.method == "POST"
    assert request.path == "/oauth/token"
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    # Each part is form-encoded before Basic; decoding gives the originals back.
    user, secret = _basic_credentials(request)
    assert (unquote_plus(user), unquote_plus(secret)) == ("svc client", "s3cr&t:+/%é")
    assert (unquote(user), unquote(secret)) == ("svc client", "s3cr&t:+/%é")
    assert ":" not in secret
    # Extras never replace core fields, and the secret is in one place only.
    assert request.form() == {
        "grant_type": "client_credentials",
        "scope": "read write",
        "audience": "https://api.example.test",
        "resource": "urn:api",
    }


async def test_client_credentials_with_post_auth(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(_ok())

    await fetch(_config(scripted_server.url(), client_auth_method="client_secret_post"))

    [request] = scripted_server.requests
    assert "authorization" not in request.headers
    assert request.form() == {
        "grant_type": "client_credentials",
        "scope": "read write",
        "audience": "https://api.example.test",
        "resource": "urn:api",
        "client_id": "svc client",
        "client_secret": "s3cr&t:+/%é",
    }


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_extras_never_replace_a_field_whatever_their_case(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, method: str
) -> None:
    # A configuration stored before names were compared without case may still hold these.
    scripted_server.queue(_ok())
    extras = {
        "GRANT_TYPE": "implicit",
        "Client_Secret": "x",
        "CLIENT_ID": "intruder",
        " scope ": "admin",
        "\uff53\uff43\uff4f\uff50\uff45": "admin",
        "Audience": "https://evil.example.test",
        "grant.type": "implicit",
        "Refresh-Token": "forged",
        "resource": "urn:api",
        "RESOURCE": "urn:other",
    }

    await fetch(_config(scripted_server.url(), client_auth_method=method, extra_token_params=extras))

    form = scripted_server.requests[0].form()
    sent = {key.casefold() for key in form}
    assert len(sent) == len(form), "a field was sent twice under two cases"
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "read write"
    assert form["audience"] == "https://api.example.test"
    assert form["resource"] == "urn:api"
    assert sent <= {"grant_type", "scope", "audience", "resource", "client_id", "client_secret"}
    if method == "client_secret_post":
        assert (form["client_id"], form["client_secret"]) == ("svc client", "s3cr&t:+/%é")


async def test_password_grant(fetch: OAuth2TokenClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(_ok(refresh_token="rt-1"))
    config = _config(
        scripted_server.url(),
        grant_type="password",
        username="svc-user",
        password=SecretStr("pw&1 2"),
        extra_token_params={"username": "intruder", "password": "x", "tenant": "t1"},
    )

    grant = await fetch(config)

    assert grant.refresh_token == "rt-1"
    form = scripted_server.requests[0].form()
    assert form["grant_type"] == "password"
    assert (form["username"], form["password"]) == ("svc-user", "pw&1 2")
    assert form["tenant"] == "t1"


async def test_refresh_sends_scope_audience_and_extras(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(_ok(access_token="at-2"))
    config = _config(
        scripted_server.url(),
        grant_type="password",
        username="svc-user",
        password=SecretStr("pw"),
        extra_token_params={"refresh_token": "forged", "resource": "urn:api"},
    )

    grant = await fetch(config, refresh_token="rt-1")

    assert grant.access_token == "at-2"
    assert grant.refresh_token is None  # the cache keeps the old one
    form = scripted_server.requests[0].form()
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "scope": "read write",
        "audience": "https://api.example.test",
        "resource": "urn:api",
    }


def test_client_basic_header_escapes_reserved_characters() -> None:
    header = client_basic_header("a:b c", "p+q%r")
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert decoded == "a%3Ab%20c:p%2Bq%25r"


# --- successful answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(3600, 3600.0), (59.5, 59.5), ("3600", 3600.0), (" 120 ", 120.0), (10**9, MAX_EXPIRES_IN_SECONDS)],
)
async def test_expires_in_forms(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, expires_in: object, expected: float
) -> None:
    scripted_server.queue(_ok(expires_in=expires_in))

    grant = await fetch(_config(scripted_server.url()))

    assert grant.expires_in == expected


async def test_missing_expires_in_uses_the_configured_lifetime_then_the_default(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    answer = Reply.json({"access_token": "at", "token_type": "Bearer"})
    scripted_server.queue(answer, answer)

    configured = await fetch(_config(scripted_server.url(), token_lifetime_seconds=120))
    default = await fetch(_config(scripted_server.url()))

    assert configured.expires_in == 120
    assert default.expires_in == DEFAULT_LIFETIME


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "Bearer", None])
async def test_bearer_token_types(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, token_type: str | None
) -> None:
    body: dict[str, object] = {"access_token": "at", "expires_in": 60}
    if token_type is not None:
        body["token_type"] = token_type
    scripted_server.queue(Reply.json(body))

    grant = await fetch(_config(scripted_server.url()))

    assert grant.access_token == "at"


# --- answers that are not tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Reply.json({"token_type": "Bearer", "expires_in": 3600}),
        Reply.json({"access_token": 12345, "token_type": "Bearer"}),
        Reply.json({"access_token": "", "token_type": "Bearer"}),
        Reply.json({"access_token": "two words", "token_type": "Bearer"}),
        Reply.json({"access_token": "at\r\nX-Injected: 1", "token_type": "Bearer"}),
        Reply.json({"access_token": "at", "token_type": "mac"}),
        Reply.json({"access_token": "at", "token_type": "DPoP"}),
        Reply.json({"access_token": "at", "token_type": 7}),
        Reply.json({"access_token": "at", "expires_in": -5}),
        Reply.json({"access_token": "at", "expires_in": 0}),
        Reply.json({"access_token": "at", "expires_in": "soon"}),
        Reply.json({"access_token": "at", "expires_in": "1e400"}),
        Reply.json({"access_token": "at", "expires_in": True}),
        Reply.json({"access_token": "at", "expires_in": [3600]}),
        Reply(
            status=200,
            headers={"Content-Type": "application/json"},
            body=b'{"access_token": "at", "expires_in": NaN}',
        ),
        Reply(
            status=200,
            headers={"Content-Type": "application/json"},
            body=b'{"access_token": "at", "expires_in": 1e999}',
        ),
        Reply.json({"access_token": "at", "refresh_token": 5}),
        Reply.json(["access_token", "at"]),
        Reply.html(200, "<html><body>Login</body></html>"),
        Reply(status=200, body=b"\xff\xfe\x00garbage"),
        Reply(status=200, body=b"[" * 100_00),
        Reply(status=200, body=b""),
    ],
)
async def test_unusable_200_answers(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, reply: Reply
) -> None:
    scripted_server.queue(reply)

    with pytest.raises(TokenEndpointError) as caught:
        await fetch(_config(scripted_server.url()))

    assert "provider_error" not in caught.value.extra


async def test_200_with_an_error_member_is_an_error(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(Reply.json({"error": "invalid_client", "error_description": CANARY}))

    with pytest.raises(CredentialsRejected) as caught:
        await fetch(_config(scripted_server.url()))

    assert caught.value.extra == {"provider_error": "invalid_client"}


async def test_html_500_is_retried_then_reported(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.set_default(Reply.html(500, f"<html>{CANARY}</html>"))

    with pytest.raises(TokenEndpointError, match="HTTP 500") as caught:
        await fetch(_config(scripted_server.url()))

    assert scripted_server.count == 3
    assert caught.value.extra == {}
    assert CANARY not in _all_text(caught.value)


async def test_5xx_then_token(fetch: OAuth2TokenClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply.html(503), _ok())

    grant = await fetch(_config(scripted_server.url()))

    assert grant.access_token == "at-1"
    assert scripted_server.count == 2


async def test_redirect_is_not_followed(fetch: OAuth2TokenClient, scripted_server: ScriptedServer) -> None:
    scripted_server.queue(Reply(status=307, headers={"Location": scripted_server.url("/elsewhere")}))
    scripted_server.set_default(_ok())

    with pytest.raises(TokenEndpointError, match="redirect"):
        await fetch(_config(scripted_server.url("/token")))

    assert [r.path for r in scripted_server.requests] == ["/token"]


async def test_timeout_is_a_token_endpoint_timeout(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    fetch = OAuth2TokenClient(make_outbound(timeout_seconds=0.3), DEFAULT_LIFETIME)
    scripted_server.queue(Reply(status=200, delay=30))

    with pytest.raises(TokenEndpointTimeout):
        await fetch(_config(scripted_server.url()))


async def test_oversized_answer_is_unreachable(
    make_outbound: MakeOutbound, scripted_server: ScriptedServer
) -> None:
    fetch = OAuth2TokenClient(make_outbound(max_response_bytes=1024), DEFAULT_LIFETIME)
    scripted_server.queue(_ok(padding="p" * 5000))

    with pytest.raises(UpstreamUnreachable):
        await fetch(_config(scripted_server.url()))


# --- RFC 6749 error responses ----------------------------------------------------------------------


def _error_reply(code: object, status: int = 400) -> Reply:
    return Reply.json(
        {
            "error": code,
            "error_description": f"client secret {CANARY} is wrong",
            "error_uri": f"https://idp.example.test/help?{CANARY}",
        },
        status=status,
    )


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("invalid_client", 401, CredentialsRejected),
        ("invalid_client", 400, CredentialsRejected),
        ("invalid_grant", 400, CredentialsRejected),
        ("unauthorized_client", 400, CredentialsRejected),
        ("invalid_scope", 400, TokenEndpointError),
        ("invalid_request", 400, TokenEndpointError),
        ("unsupported_grant_type", 400, TokenEndpointError),
        ("temporarily_unavailable", 503, TokenEndpointError),
        ("some_vendor.code-2", 400, TokenEndpointError),
    ],
)
async def test_error_codes(
    fetch: OAuth2TokenClient,
    scripted_server: ScriptedServer,
    code: str,
    status: int,
    error: type[AppError],
) -> None:
    scripted_server.set_default(_error_reply(code, status))

    with pytest.raises(error) as caught:
        await fetch(_config(scripted_server.url()))

    assert type(caught.value) is error
    # Registered codes pass as they are; any other well-formed code is reported as "other".
    assert caught.value.extra == {"provider_error": "other" if code.startswith("some_vendor") else code}
    assert CANARY not in _all_text(caught.value)


@pytest.mark.parametrize(
    "code",
    ["<script>alert(1)</script>", "has space", "x" * 65, f"leak_{CANARY}!", 42, None, ["invalid_client"]],
)
async def test_unsafe_error_codes_are_left_out(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, code: object
) -> None:
    scripted_server.queue(_error_reply(code))

    with pytest.raises(TokenEndpointError) as caught:
        await fetch(_config(scripted_server.url()))

    assert caught.value.extra == {}
    assert CANARY not in _all_text(caught.value)


@pytest.mark.parametrize(
    "reply", [Reply(status=401), Reply.html(401), Reply.json({"message": "no"}, status=401)]
)
async def test_401_without_a_readable_error_is_rejected(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, reply: Reply
) -> None:
    scripted_server.queue(reply)

    with pytest.raises(CredentialsRejected) as caught:
        await fetch(_config(scripted_server.url()))

    assert caught.value.extra == {}


@pytest.mark.parametrize("code", ["invalid_grant", "unauthorized_client", "unsupported_grant_type"])
async def test_refused_refresh_raises_refresh_token_rejected(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer, code: str
) -> None:
    scripted_server.queue(_error_reply(code))

    with pytest.raises(RefreshTokenRejected) as caught:
        await fetch(_config(scripted_server.url()), refresh_token="rt-old")

    assert CANARY not in str(caught.value)
    assert "rt-old" not in str(caught.value)


async def test_refresh_with_a_rejected_client_is_credentials_rejected(
    fetch: OAuth2TokenClient, scripted_server: ScriptedServer
) -> None:
    scripted_server.queue(_error_reply("invalid_client", 401))

    with pytest.raises(CredentialsRejected):
        await fetch(_config(scripted_server.url()), refresh_token="rt-old")


# --- against Authlib -------------------------------------------------------------------------------


@pytest.fixture
def registered(auth_server: AuthorizationServerThread) -> Mapping[str, RegisteredClient]:
    clients = {
        "basic": RegisteredClient("basic-client", "basic secret:+%", auth_method="client_secret_basic"),
        "post": RegisteredClient("post-client", "post-secret&=", auth_method="client_secret_post"),
        "cc-only": RegisteredClient("cc-client", "cc-secret", grant_types=("client_credentials",)),
    }
    auth_server.add_clients(clients.values())
    auth_server.store.add_user("svc-user", "user pass&1")
    return clients


def _authlib_config(
    server: AuthorizationServerThread, client: RegisteredClient, **changes: object
) -> OAuth2Config:
    config = OAuth2Config(
        grant_type="client_credentials",
        token_url=server.token_url,
        client_id=client.client_id,
        client_auth=_client_auth(client.auth_method, SecretStr(client.client_secret)),
        scope="read",
    )
    return _with_client_auth(config, dict(changes))


@pytest.mark.parametrize("client_name", ["basic", "post"])
async def test_authlib_client_credentials(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
    client_name: str,
) -> None:
    client = registered[client_name]

    grant = await fetch(_authlib_config(auth_server, client))

    issued = auth_server.store.find_access_token(grant.access_token)
    assert issued is not None
    assert issued.client_id == client.client_id
    assert issued.scope == "read"
    assert grant.expires_in == 3600
    assert grant.refresh_token is None


@pytest.mark.parametrize("client_name", ["basic", "post"])
async def test_authlib_password_grant_refresh_and_rotation(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
    client_name: str,
) -> None:
    config = _authlib_config(
        auth_server,
        registered[client_name],
        grant_type="password",
        username="svc-user",
        password=SecretStr("user pass&1"),
    )

    first = await fetch(config)
    assert first.refresh_token is not None
    issued = auth_server.store.find_access_token(first.access_token)
    assert issued is not None and issued.user == "svc-user"

    second = await fetch(config, refresh_token=first.refresh_token)
    assert second.access_token != first.access_token
    assert second.refresh_token not in (None, first.refresh_token)

    # The used refresh token was revoked by rotation.
    with pytest.raises(RefreshTokenRejected):
        await fetch(config, refresh_token=first.refresh_token)
    assert second.refresh_token is not None
    third = await fetch(config, refresh_token=second.refresh_token)
    assert third.access_token not in (first.access_token, second.access_token)


@pytest.mark.parametrize("client_name", ["basic", "post"])
async def test_authlib_wrong_client_secret_is_rejected(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
    client_name: str,
) -> None:
    config = _authlib_config(auth_server, registered[client_name], client_secret=SecretStr("wrong"))

    with pytest.raises(CredentialsRejected) as caught:
        await fetch(config)

    assert caught.value.extra == {"provider_error": "invalid_client"}
    assert auth_server.request_count == 1


async def test_authlib_wrong_user_password_is_rejected(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
) -> None:
    config = _authlib_config(
        auth_server,
        registered["basic"],
        grant_type="password",
        username="svc-user",
        password=SecretStr("bad"),
    )

    with pytest.raises(CredentialsRejected) as caught:
        await fetch(config)

    assert caught.value.extra == {"provider_error": "invalid_grant"}


async def test_authlib_client_authenticating_the_wrong_way_is_rejected(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
) -> None:
    # Registered for client_secret_post, sent with HTTP Basic.
    config = _authlib_config(auth_server, registered["post"], client_auth_method="client_secret_basic")

    with pytest.raises(CredentialsRejected):
        await fetch(config)


async def test_authlib_grant_not_allowed_for_client(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
) -> None:
    config = _authlib_config(
        auth_server,
        registered["cc-only"],
        grant_type="password",
        username="svc-user",
        password=SecretStr("x"),
    )

    with pytest.raises(CredentialsRejected) as caught:
        await fetch(config)

    assert caught.value.extra == {"provider_error": "unauthorized_client"}


async def test_authlib_unknown_refresh_token(
    fetch: OAuth2TokenClient,
    auth_server: AuthorizationServerThread,
    registered: Mapping[str, RegisteredClient],
) -> None:
    with pytest.raises(RefreshTokenRejected):
        await fetch(_authlib_config(auth_server, registered["basic"]), refresh_token="never-issued")
