"""The connectors client against the real service: typed CRUD, ETags, and problems as exceptions."""

from __future__ import annotations

import json
import ssl
import uuid

import httpx
import pytest
from connectors_client import (
    AsyncConnectorsClient,
    AuthPatch,
    BadGateway,
    BasicAuthOut,
    ClientProblem,
    Conflict,
    Connector,
    ConnectorNotFound,
    ConnectorPatch,
    ConnectorsClient,
    ConnectorsError,
    CredentialsRejected,
    DatabaseUnavailable,
    Forbidden,
    InvalidRequest,
    NameTaken,
    NotFound,
    OAuth2ClientCredentialsOut,
    PreconditionFailed,
    ProblemError,
    ServerProblem,
    ServiceUnavailable,
    TransportFailure,
    Unauthenticated,
    UnexpectedResponse,
    Unprocessable,
    UpstreamUnreachable,
    VersionMismatch,
)

from tests.client.conftest import Flavour, LiveService, ResourceServer, basic_connector, oauth_connector, run
from tests.support.authserver import AuthorizationServerThread
from tests.support.servers import Reply, ScriptedServer, unused_port
from tests.support.tls import LocalCA


def sent_request_id(error: ProblemError) -> str | None:
    """The request id the service gave, wherever it put it (body member or header)."""
    body = error.response.json()
    value = body.get("request_id", error.response.headers.get("x-request-id"))
    return value if isinstance(value, str) else None


async def test_crud_round_trip_with_typed_models_and_etags(
    flavour: Flavour,
    idp: AuthorizationServerThread,
    resource: ResourceServer,
    client_secret: str,
    basic_password: str,
) -> None:
    api = flavour.connectors
    oauth = await run(api.create(oauth_connector("Orders", idp, client_secret, resource.base_url)))
    assert isinstance(oauth, Connector)
    assert isinstance(oauth.auth, OAuth2ClientCredentialsOut)
    assert oauth.auth.has_client_secret
    assert oauth.status.state == "authorized"  # checked live: the provider issued a token
    assert idp.request_count == 1
    assert (oauth.version, oauth.etag) == (1, '"1"')

    basic = await run(api.create(basic_connector("Billing", resource, basic_password), validate=False))
    assert isinstance(basic.auth, BasicAuthOut)
    assert basic.auth.has_password
    assert basic.status.state == "unverified"
    assert resource.server.count == 0  # validate=False: no check

    listed = await run(api.list())
    assert [c.name for c in listed.items] == ["Billing", "Orders"]
    assert listed.limit == 5

    read = await run(api.get(oauth.id))
    assert read == oauth
    assert read == next(c for c in listed.items if c.id == oauth.id)
    assert read.etag == '"1"'

    renamed = await run(api.update(oauth.id, ConnectorPatch(name="Orders v2"), if_match=read.etag))
    assert (renamed.name, renamed.version, renamed.etag) == ("Orders v2", 2, '"2"')

    # The version read before the rename is stale now: nothing changes.
    with pytest.raises(VersionMismatch) as stale:
        await run(api.update(oauth.id, ConnectorPatch(name="Lost update"), if_match=read.etag))
    assert isinstance(stale.value, PreconditionFailed)
    assert isinstance(stale.value, ClientProblem)
    assert (stale.value.status, stale.value.code) == (412, "version_mismatch")
    assert stale.value.title
    assert stale.value.detail
    assert stale.value.request_id == sent_request_id(stale.value)
    with pytest.raises(VersionMismatch):
        await run(api.delete(oauth.id, if_match=read.etag))
    assert (await run(api.get(oauth.id))).name == "Orders v2"

    # A patch of the Basic password, then a live check through the validation URL.
    patched = await run(
        api.update(basic.id, ConnectorPatch(auth=AuthPatch(password=basic_password)), validate=False)
    )
    assert patched.version == 2
    checked = await run(api.validate(basic.id))
    assert checked.connector.status.state == "authorized"
    assert checked.retry_after is None
    again = await run(api.validate(basic.id))
    assert again.retry_after is not None and again.retry_after > 0  # checked moments ago: no check

    history = await run(api.history(oauth.id))
    assert [(e.action, e.outcome) for e in history.items] == [
        ("delete", "version_mismatch"),
        ("update", "version_mismatch"),
        ("update", "succeeded"),
        ("create", "succeeded"),
    ]
    assert [e.action for e in (await run(api.history(oauth.id, limit=1))).items] == ["delete"]

    await run(api.delete(oauth.id, if_match=renamed.etag))
    with pytest.raises(ConnectorNotFound) as gone:
        await run(api.get(oauth.id))
    assert isinstance(gone.value, NotFound)
    assert (gone.value.status, gone.value.code) == (404, "connector_not_found")
    assert [c.name for c in (await run(api.list())).items] == ["Billing"]


async def test_problems_carry_their_members(
    flavour: Flavour, live: LiveService, resource: ResourceServer, basic_password: str
) -> None:
    api = flavour.connectors
    await run(api.create(basic_connector("Billing", resource, basic_password), validate=False))

    with pytest.raises(NameTaken) as taken:
        await run(api.create(basic_connector("BILLING", resource, basic_password), validate=False))
    assert isinstance(taken.value, Conflict)
    assert (taken.value.status, taken.value.code) == (409, "name_taken")
    assert taken.value.type == "urn:connectors:problem:name_taken"
    assert taken.value.request_id == sent_request_id(taken.value)

    blank = basic_connector(" ", resource, basic_password)
    with pytest.raises(InvalidRequest) as invalid:
        await run(api.create(blank, validate=False))
    assert isinstance(invalid.value, Unprocessable)
    assert invalid.value.status == 422
    assert [e.field for e in invalid.value.errors] == ["name"]
    assert invalid.value.errors[0].reason
    assert "name:" in str(invalid.value)

    with pytest.raises(ConnectorNotFound):
        await run(api.authorize(uuid.uuid4(), "/v1"))

    # Another caller: without the scope, and with a token the service does not accept.
    reader = live.token(scopes=("connectors:read",))
    for token, expected, status in ((reader, Forbidden, 403), ("not-a-jwt", Unauthenticated, 401)):
        if flavour.is_async:
            async with AsyncConnectorsClient(live.base_url, token) as other_async:
                with pytest.raises(expected) as refused:
                    await other_async.create(
                        basic_connector("Other", resource, basic_password), validate=False
                    )
        else:
            with ConnectorsClient(live.base_url, token) as other, pytest.raises(expected) as refused:
                other.create(basic_connector("Other", resource, basic_password), validate=False)
        assert refused.value.status == status
        assert refused.value.code in ("forbidden", "unauthenticated")
    assert [c.name for c in (await run(api.list())).items] == ["Billing"]


async def test_create_checks_live_unless_told_not_to(
    flavour: Flavour, idp: AuthorizationServerThread, resource: ResourceServer
) -> None:
    api = flavour.connectors
    # A secret the provider does not know: refused on save (422), saved without the check.
    wrong = oauth_connector("Wrong secret", idp, "CANARY-wrong", resource.base_url)
    with pytest.raises(CredentialsRejected) as rejected:
        await run(api.create(wrong))
    assert isinstance(rejected.value, Unprocessable)
    assert (rejected.value.status, rejected.value.code) == (422, "credentials_rejected")
    saved = await run(api.create(wrong, validate=False))
    assert saved.status.state == "unverified"

    # The same code at authorize is the upstream's failure (502), still a CredentialsRejected.
    with pytest.raises(CredentialsRejected) as upstream:
        await run(api.authorize(saved.id, "/v1"))
    assert isinstance(upstream.value, BadGateway)
    assert not isinstance(upstream.value, ClientProblem)
    assert upstream.value.status == 502

    nowhere = oauth_connector("Nowhere", idp, "CANARY-x", resource.base_url)
    nowhere = nowhere.model_copy(
        update={"auth": nowhere.auth.model_copy(update={"token_url": f"https://127.0.0.1:{unused_port()}/t"})}
    )
    with pytest.raises(UpstreamUnreachable) as unreachable:
        await run(api.create(nowhere))
    assert isinstance(unreachable.value, ServerProblem)
    assert unreachable.value.status == 502
    assert [c.name for c in (await run(api.list())).items] == ["Wrong secret"]


async def test_token_function_is_called_for_every_request(live: LiveService) -> None:
    calls: list[str] = []

    def token() -> str:
        calls.append("sync")
        return live.token()

    async def async_token() -> str:
        calls.append("async")
        return live.token()

    with ConnectorsClient(live.base_url, token) as api:
        api.list()
        api.list()
    async with AsyncConnectorsClient(live.base_url, async_token) as aapi:
        await aapi.list()
    assert calls == ["sync", "sync", "async"]
    # A coroutine function cannot serve a blocking client.
    with ConnectorsClient(live.base_url, async_token) as api, pytest.raises(TypeError):  # type: ignore[arg-type]
        api.list()


def test_the_etag_is_the_one_the_response_carried() -> None:
    connector_id = str(uuid.uuid4())
    connector = {
        "id": connector_id,
        "name": "Tagged",
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "basic",
            "username": "svc-user",
            "validation_url": "https://api.example.com/check",
            "has_password": True,
        },
        "status": {"state": "unverified"},
        "version": 1,
        "created_at": "2026-11-24T10:00:00Z",
        "updated_at": "2026-11-24T10:00:00Z",
    }
    tags = iter(['"1"', '"v1-abc"'])

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"etag": next(tags)}, json=connector)

    served = httpx.Client(transport=httpx.MockTransport(answer))
    with ConnectorsClient("http://service.test", "t", http_client=served) as api:
        assert api.get(connector_id).etag == '"1"'
        assert api.get(connector_id).etag == '"v1-abc"'
    served.close()


def test_failures_that_are_not_problems(scripted_server: ScriptedServer, local_ca: LocalCA) -> None:
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(local_ca.ca_bundle)))
    api = ConnectorsClient(scripted_server.url(""), "token", http_client=trusting)
    # A proxy's error page.
    scripted_server.queue(Reply.html(502))
    with pytest.raises(UnexpectedResponse) as page:
        api.list()
    assert page.value.status == 502
    assert page.value.content_type == "text/html"
    assert not isinstance(page.value, ProblemError)
    # A success whose body is not the documented shape; the message names where, not what.
    scripted_server.queue(Reply.json({"items": [{"id": "CANARY-not-an-id"}], "limit": 5}))
    with pytest.raises(UnexpectedResponse) as shape:
        api.list()
    assert "ConnectorList" in str(shape.value)
    assert "CANARY" not in str(shape.value)
    trusting.close()
    # Nothing listening.
    nobody = ConnectorsClient(f"http://127.0.0.1:{unused_port()}", "token")
    with nobody, pytest.raises(TransportFailure) as down:
        nobody.list()
    assert isinstance(down.value, ConnectorsError)
    assert isinstance(down.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("request_id", "header", "expected"),
    [("req-1", "other", "req-1"), (None, "req-2", "req-2"), (None, None, None)],
)
def test_problem_members_are_read_from_the_answer(
    request_id: str | None, header: str | None, expected: str | None
) -> None:
    body = {
        "type": "urn:connectors:problem:database_unavailable",
        "title": "The database is unavailable",
        "status": 503,
        "detail": "try again",
        "code": "database_unavailable",
        "errors": [{"field": "name", "reason": "too long"}],
        "hint": "an extension member",
    }
    if request_id is not None:
        body["request_id"] = request_id
    headers = {"content-type": "application/problem+json", "retry-after": "5"}
    if header is not None:
        headers["x-request-id"] = header
    answer = httpx.MockTransport(lambda _: httpx.Response(503, headers=headers, content=json.dumps(body)))
    api = ConnectorsClient("http://service.test", "t", http_client=httpx.Client(transport=answer))
    with pytest.raises(DatabaseUnavailable) as raised:
        api.list()
    error = raised.value
    assert isinstance(error, ServiceUnavailable)
    assert (error.status, error.code, error.title, error.detail, error.type) == (
        503,
        "database_unavailable",
        "The database is unavailable",
        "try again",
        "urn:connectors:problem:database_unavailable",
    )
    assert [(e.field, e.reason) for e in error.errors] == [("name", "too long")]
    assert error.extensions == {"hint": "an extension member"}
    assert error.retry_after == 5
    assert error.request_id == expected
