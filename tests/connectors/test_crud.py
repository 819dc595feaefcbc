"""The registry's endpoints through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.connectors import payloads

ClientFor = Callable[..., httpx.AsyncClient]
NO_CHECK = {"validate": "false"}


async def create(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/connectors", json=body, params=NO_CHECK)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def anonymized(response: httpx.Response) -> bytes:
    """The body with the request's id taken out: every request has an id of its own, so bodies of
    two requests are compared without it."""
    return response.content.replace(response.headers["x-request-id"].encode(), b"<request id>")


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


async def test_create_basic_shows_no_secret(client: httpx.AsyncClient) -> None:
    response = await client.post("/connectors", json=payloads.basic(name="  Billing API  "), params=NO_CHECK)
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "Billing API"
    assert body["auth"] == {
        "type": "basic",
        "username": "svc-user",
        "validation_url": "https://127.0.0.1:9/auth/check",
        "has_password": True,
    }
    assert body["status"] == {"state": "unverified", "checked_at": None, "detail": None}
    assert body["version"] == 1
    assert response.headers["etag"] == '"1"'
    assert response.headers["location"] == f"/connectors/{body['id']}"


async def test_oauth_grant_defaults_to_client_credentials(client: httpx.AsyncClient) -> None:
    body = payloads.client_credentials()
    del body["auth"]["grant_type"]
    created = await create(client, body)
    assert created["auth"]["grant_type"] == "client_credentials"
    assert created["auth"]["client_auth_method"] == "client_secret_basic"
    assert created["auth"]["has_client_secret"] is True
    assert "client_secret" not in created["auth"]


async def test_password_grant_round_trip(client: httpx.AsyncClient) -> None:
    created = await create(
        client,
        payloads.password_grant(
            audience="https://api.example.com/",
            client_auth_method="client_secret_post",
            extra_token_params={"resource": "contacts"},
            token_lifetime_seconds=900,
        ),
    )
    auth = created["auth"]
    assert auth["grant_type"] == "password"
    assert auth["username"] == "svc-user"
    assert auth["has_password"] is True and auth["has_client_secret"] is True
    assert auth["audience"] == "https://api.example.com/"
    assert auth["extra_token_params"] == {"resource": "contacts"}
    assert auth["token_lifetime_seconds"] == 900
    fetched = await client.get(f"/connectors/{created['id']}")
    assert fetched.json() == created
    assert fetched.headers["etag"] == '"1"'


async def test_urls_are_normalised(client: httpx.AsyncClient) -> None:
    body = payloads.client_credentials(token_url="HTTPS://IdP.Example.COM:443/oauth/token")
    body["resource_domain_url"] = "https://API.example.com:443/v1/"
    created = await create(client, body)
    assert created["resource_domain_url"] == "https://api.example.com/v1"
    assert created["auth"]["token_url"] == "https://idp.example.com/oauth/token"


# The rule's other cases: tests/unit/test_url_rules.py.
@pytest.mark.parametrize("url", ["http://api.example.com", "https://api.example.com/a/../b"])
async def test_bad_resource_domain_urls_are_refused(client: httpx.AsyncClient, url: str) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = url
    problem = assert_problem(
        await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request"
    )
    assert [error["field"] for error in problem["errors"]] == ["resource_domain_url"]
    assert (await client.get("/connectors")).json()["items"] == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "   "}, "name"),  # the name rule's other cases: tests/unit/test_names.py
        ({"auth": {"type": "kerberos", "password": "CANARY-tag"}}, "auth"),
        (
            {
                "auth": {
                    "type": "basic",
                    "username": "svc:user",
                    "password": "CANARY-colon",
                    "validation_url": "https://a.example.com/",
                }
            },
            "auth.username",
        ),
        ({"auth": {"type": "CANARY-in-type"}}, "auth"),
    ],
)
async def test_invalid_fields_are_listed_without_values(
    client: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    body = {**payloads.basic(), **change}
    problem = assert_problem(
        await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request"
    )
    assert problem["errors"] and problem["errors"][0]["field"].startswith(field)


async def test_secret_in_the_wrong_field_is_not_echoed(client: httpx.AsyncClient) -> None:
    body = payloads.basic()
    body["auth"]["validation_url"] = body["auth"]["password"]
    body["auth"]["username"] = "svc\x00" + body["auth"]["password"]
    body["resource_domain_url"] = body["auth"]["password"]
    body["auth"]["unexpected"] = body["auth"]["password"]
    problem = assert_problem(
        await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request"
    )
    fields = {error["field"] for error in problem["errors"]}
    assert fields == {"resource_domain_url", "auth.validation_url", "auth.username", "auth.*"}
    assert "unexpected" not in response_text(problem)


def response_text(problem: dict[str, Any]) -> str:
    return repr(problem)


async def test_error_locations_name_fields_not_input(client: httpx.AsyncClient) -> None:
    body = payloads.password_grant(extra_token_params={"SECRETKEY": 7})
    body["auth"]["SECRETNAME"] = 1
    del body["auth"]["client_id"]
    problem = assert_problem(
        await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request"
    )
    assert {e["field"] for e in problem["errors"]} == {
        "auth.client_id",
        "auth.extra_token_params.*",
        "auth.*",
    }
    assert "SECRET" not in repr(problem)
    broken = await client.post(
        "/connectors", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert [e["field"] for e in assert_problem(broken, 422, "invalid_request")["errors"]] == ["body"]


async def test_malformed_json_is_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/connectors", content=b'{"name": "CANARY', headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "invalid_request")


async def test_list_is_ordered_by_name_and_shows_the_limit(client: httpx.AsyncClient) -> None:
    for name in ("charlie", "Alpha", "bravo"):
        await create(client, payloads.basic(name=name))
    listing = (await client.get("/connectors")).json()
    assert [item["name"] for item in listing["items"]] == ["Alpha", "bravo", "charlie"]
    assert listing["limit"] == 5


async def test_names_are_unique_case_insensitively(client: httpx.AsyncClient) -> None:
    await create(client, payloads.basic(name="Billing"))
    response = await client.post("/connectors", json=payloads.basic(name=" BILLING "), params=NO_CHECK)
    assert_problem(response, 409, "name_taken")


async def test_same_name_in_another_organization_is_fine(client_for: ClientFor) -> None:
    await create(client_for("org-a"), payloads.basic(name="Billing"))
    await create(client_for("org-b"), payloads.basic(name="Billing"))


async def test_limit_and_delete_frees_a_place(client: httpx.AsyncClient) -> None:
    ids = [(await create(client, payloads.basic(name=f"c{i}")))["id"] for i in range(5)]
    response = await client.post("/connectors", json=payloads.basic(name="c5"), params=NO_CHECK)
    assert_problem(response, 409, "connector_limit_reached")
    assert (await client.delete(f"/connectors/{ids[0]}")).status_code == 204
    await create(client, payloads.basic(name="c5"))


async def test_concurrent_creates_respect_the_limit(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(client.post("/connectors", json=payloads.basic(name=f"n{i}"), params=NO_CHECK) for i in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 5 + [409] * 15
    assert all(r.json()["code"] == "connector_limit_reached" for r in responses if r.status_code == 409)
    assert len((await client.get("/connectors")).json()["items"]) == 5


async def test_concurrent_creates_with_one_name_make_one_connector(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(
            client.post(
                "/connectors", json=payloads.basic(name=f"Same{'' if i % 2 else ' '}"), params=NO_CHECK
            )
            for i in range(10)
        )
    )
    assert sorted(r.status_code for r in responses) == [201] + [409] * 9
    assert len((await client.get("/connectors")).json()["items"]) == 1


async def test_other_organizations_connector_is_indistinguishable_from_missing(client_for: ClientFor) -> None:
    owner, stranger = client_for("org-a"), client_for("org-b")
    created = await create(owner, payloads.basic())
    missing = "00000000-0000-4000-8000-000000000000"
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"name": "x"}),
        ("DELETE", "", None),
        ("POST", "/validate", None),
        ("POST", "/authorize", {}),
    ]:
        theirs = await stranger.request(method, f"/connectors/{created['id']}{suffix}", json=body)
        absent = await stranger.request(method, f"/connectors/{missing}{suffix}", json=body)
        malformed = await stranger.request(method, f"/connectors/not-a-uuid{suffix}", json=body)
        assert theirs.status_code == absent.status_code == malformed.status_code == 404
        assert anonymized(theirs) == anonymized(absent) == anonymized(malformed)
        assert theirs.headers["content-type"] == absent.headers["content-type"]
    assert (await owner.get(f"/connectors/{created['id']}")).status_code == 200


async def test_patch_name_and_etag(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic(name="Old"))
    url = f"/connectors/{created['id']}"
    response = await client.patch(url, json={"name": "New"}, headers={"If-Match": '"1"'})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "New"
    assert response.json()["version"] == 2
    assert response.headers["etag"] == '"2"'
    stale = await client.patch(url, json={"name": "Newer"}, headers={"If-Match": '"1"'})
    assert_problem(stale, 412, "version_mismatch")
    assert (await client.get(url)).json()["name"] == "New"


async def test_patch_with_nothing_changes_nothing(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic())
    response = await client.patch(f"/connectors/{created['id']}", json={})
    assert response.status_code == 200
    assert response.json()["version"] == 1


async def test_patch_to_a_taken_name(client: httpx.AsyncClient) -> None:
    await create(client, payloads.basic(name="One"))
    second = await create(client, payloads.basic(name="Two"))
    response = await client.patch(f"/connectors/{second['id']}", json={"name": "one"}, params=NO_CHECK)
    assert_problem(response, 409, "name_taken")


async def test_patch_keeps_omitted_secret(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.client_credentials())
    url = f"/connectors/{created['id']}"
    response = await client.patch(url, json={"auth": {"scope": "read"}}, params=NO_CHECK)
    assert response.status_code == 200, response.text
    auth = response.json()["auth"]
    assert auth["scope"] == "read" and auth["has_client_secret"] is True
    assert auth["client_id"] == "client-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"auth": {"token_url": "https://elsewhere.example.com/token"}}, "auth.client_secret"),
        ({"resource_domain_url": "https://elsewhere.example.com"}, "auth.client_secret"),
    ],
)
async def test_moving_a_url_needs_the_secret_again(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    body = copy.deepcopy(body)
    created = await create(client, payloads.client_credentials())
    url = f"/connectors/{created['id']}"
    problem = assert_problem(await client.patch(url, json=body, params=NO_CHECK), 422, "secret_required")
    assert problem["errors"][0]["field"] == field
    assert (await client.get(url)).json() == created
    body.setdefault("auth", {})["client_secret"] = "CANARY-again"
    response = await client.patch(url, json=body, params=NO_CHECK)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2


async def test_moving_the_validation_url_needs_the_password(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    body = {"auth": {"validation_url": "https://other.example.com/check"}}
    assert_problem(await client.patch(url, json=body, params=NO_CHECK), 422, "secret_required")


async def test_changing_kind_needs_the_whole_auth(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    partial = {"auth": {"type": "oauth2", "client_id": "x"}}
    problem = assert_problem(await client.patch(url, json=partial, params=NO_CHECK), 422, "invalid_request")
    assert any(error["field"].endswith("client_secret") for error in problem["errors"])
    whole = {"auth": payloads.client_credentials()["auth"]}
    response = await client.patch(url, json=whole, params=NO_CHECK)
    assert response.status_code == 200, response.text
    assert response.json()["auth"]["type"] == "oauth2"
    assert "has_password" not in response.json()["auth"]


async def test_changing_grant_needs_the_whole_auth(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.client_credentials())
    url = f"/connectors/{created['id']}"
    partial = {"auth": {"grant_type": "password", "username": "u", "password": "CANARY-p"}}
    assert_problem(await client.patch(url, json=partial, params=NO_CHECK), 422, "invalid_request")
    response = await client.patch(url, json={"auth": payloads.password_grant()["auth"]}, params=NO_CHECK)
    assert response.status_code == 200
    assert response.json()["auth"]["grant_type"] == "password"


async def test_null_for_a_required_field_is_refused(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.client_credentials())
    url = f"/connectors/{created['id']}"
    assert_problem(await client.patch(url, json={"name": None}), 422, "invalid_request")
    assert_problem(await client.patch(url, json={"auth": {"client_id": None}}), 422, "invalid_request")


async def test_delete_honours_if_match(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    assert_problem(await client.delete(url, headers={"If-Match": '"7"'}), 412, "version_mismatch")
    assert (await client.delete(url, headers={"If-Match": '"1"'})).status_code == 204
    assert_problem(await client.get(url), 404, "connector_not_found")
    assert_problem(await client.delete(url), 404, "connector_not_found")


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_unknown_route_is_a_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nowhere"), 404, "not_found")
    not_allowed = await client.put("/connectors")
    assert_problem(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["allow"] == "GET, POST"
    on_authorize = await client.get("/connectors/00000000-0000-4000-8000-000000000000/authorize")
    assert on_authorize.headers["allow"] == "POST"
    one = await client.put("/connectors/00000000-0000-4000-8000-000000000000")
    assert one.headers["allow"] == "DELETE, GET, PATCH"


async def test_an_unexpected_failure_is_a_500_problem_that_reveals_nothing(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("CANARY-internal-detail")

    monkeypatch.setattr(app.state.connectors, "list", broken)
    response = await client.get("/connectors")
    problem = assert_problem(response, 500, "internal_error")
    assert problem["detail"] == "an unexpected error occurred"


async def test_one_access_line_per_request_without_secrets(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="connectors.access"):
        await client.post("/connectors", json=payloads.basic(), params=NO_CHECK)
        await client.get("/connectors/not-a-uuid")
    lines = [r for r in caplog.records if r.name == "connectors.access"]
    assert len(lines) == 2
    created, missing = (r.__dict__ for r in lines)
    assert (created["method"], created["route"], created["status"]) == ("POST", "/connectors", 201)
    assert created["organization"] == "org-a"
    assert missing["route"] == "/connectors/{connector_id}"
    assert missing["status"] == 404
    assert all(isinstance(r.__dict__["duration_ms"], float) for r in lines)


@pytest.mark.parametrize(
    "path", ["/connectors", "/connectors/00000000-0000-4000-8000-000000000000/authorize"]
)
async def test_an_oversized_body_is_a_413_problem(client: httpx.AsyncClient, path: str) -> None:
    response = await client.post(path, content=b"{" + b" " * (128 * 1024) + b"}")
    problem = assert_problem(response, 413, "payload_too_large")
    assert "CANARY" not in response.text
    assert problem["status"] == 413


async def test_an_oversized_streamed_body_is_a_413_problem(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post(
        "/connectors", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "payload_too_large")
    assert (await client.get("/connectors")).json()["items"] == []


@pytest.mark.parametrize(
    "raw_auth",
    [
        '"client_secret": "CANARY\\ud800"',
        '"client_secret": "CANARY-ok", "extra_token_params": {"resource": "v\\ud800"}',
    ],
)
async def test_unpaired_surrogates_are_refused_not_a_500(client: httpx.AsyncClient, raw_auth: str) -> None:
    body = (
        '{"name": "s", "resource_domain_url": "https://api.example.com", "auth": {"type": "oauth2",'
        ' "client_id": "c", "token_url": "https://idp.example.com/t", ' + raw_auth + "}}"
    )
    response = await client.post(
        "/connectors", content=body.encode(), params=NO_CHECK, headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "invalid_request")


# The rule's other cases: tests/unit/test_url_rules.py.
@pytest.mark.parametrize(("url", "stored"), [("https://faß.de/x", "https://xn--fa-hia.de/x")])
async def test_international_hosts_are_stored_as_clients_would_encode_them(
    client: httpx.AsyncClient, url: str, stored: str
) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = url
    assert (await create(client, body))["resource_domain_url"] == stored


async def test_invisible_characters_in_a_host_are_refused(client: httpx.AsyncClient) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = "https://exa\u200bmple.com"
    assert_problem(await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request")


# The rule's other cases: tests/unit/test_names.py.
@pytest.mark.parametrize("name", ["alpha\u200b"])
async def test_invisible_characters_in_names_are_refused(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post("/connectors", json=payloads.basic(name=name), params=NO_CHECK)
    assert_problem(response, 422, "invalid_request")


async def test_names_compare_after_compatibility_normalisation(client: httpx.AsyncClient) -> None:
    await create(client, payloads.basic(name="Billing"))
    fullwidth = await client.post(
        "/connectors", json=payloads.basic(name="\uff22\uff49lling"), params=NO_CHECK
    )
    assert_problem(fullwidth, 409, "name_taken")


# The other forms: tests/unit/test_request_params.py.
@pytest.mark.parametrize(("header", "status"), [('"7", "1"', 200), ('W/"1"', 412), ('"1", *', 422)])
async def test_if_match_forms(client: httpx.AsyncClient, header: str, status: int) -> None:
    created = await create(client, payloads.basic())
    response = await client.patch(
        f"/connectors/{created['id']}", json={"name": "renamed"}, headers={"If-Match": header}
    )
    assert response.status_code == status, response.text


# The other spellings: tests/unit/test_token_params.py.
@pytest.mark.parametrize("params", [{"GRANT_TYPE": "implicit"}, {"resource": "urn:a", "RESOURCE": "urn:b"}])
async def test_reserved_token_parameters_are_refused_in_any_case(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    body = payloads.password_grant(extra_token_params=params)
    refused = await client.post("/connectors", json=body, params=NO_CHECK)
    problem = assert_problem(refused, 422, "invalid_request")
    assert [e["field"] for e in problem["errors"]] == ["auth.extra_token_params"]
    assert (await client.get("/connectors")).json()["items"] == []

    created = await create(client, payloads.password_grant(extra_token_params={"tenant": "t1"}))
    url = f"/connectors/{created['id']}"
    patched = await client.patch(url, json={"auth": {"extra_token_params": params}}, params=NO_CHECK)
    problem = assert_problem(patched, 422, "invalid_request")
    assert [e["field"] for e in problem["errors"]] == ["auth.extra_token_params"]
    after = (await client.get(url)).json()
    assert after["version"] == 1
    assert after["auth"]["extra_token_params"] == {"tenant": "t1"}
