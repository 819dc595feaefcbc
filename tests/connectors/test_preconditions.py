"""The order a request is judged in: the request itself (body, parameters, If-Match syntax) is a
422 before the connector's state is (404, 412); and a change refuses null where null means nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.connectors import payloads
from tests.connectors.test_crud import assert_problem, create


async def _unchanged(client: httpx.AsyncClient, created: dict[str, Any]) -> None:
    current = (await client.get(f"/connectors/{created['id']}")).json()
    assert current["version"] == created["version"]
    assert current["name"] == created["name"]
    history = (await client.get(f"/connectors/{created['id']}/history")).json()["items"]
    assert [event["action"] for event in history] == ["create"]


@pytest.mark.parametrize("if_match", ['"9"', '"abc"', 'W/"1"', "garbage", "null"])
async def test_a_patch_without_a_body_is_refused_for_its_body_whatever_the_if_match(
    client: httpx.AsyncClient, if_match: str
) -> None:
    created = await create(client, payloads.basic())
    response = await client.patch(f"/connectors/{created['id']}", headers={"If-Match": if_match})
    problem = assert_problem(response, 422, "invalid_request")
    assert {"field": "body", "reason": "Field required"} in problem["errors"]
    await _unchanged(client, created)


@pytest.mark.parametrize("if_match", ["1", "null", '"1", *', "", '"1" "2"', "W/1"])
async def test_if_match_that_is_no_list_of_entity_tags_is_an_invalid_request(
    client: httpx.AsyncClient, if_match: str
) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    for response in (
        await client.patch(url, json={"name": "Renamed"}, headers={"If-Match": if_match}),
        await client.delete(url, headers={"If-Match": if_match}),
    ):
        problem = assert_problem(response, 422, "invalid_request")
        assert problem["errors"] == [
            {"field": "header.If-Match", "reason": 'must be * or a list of entity tags such as "3"'}
        ]
    await _unchanged(client, created)


async def test_a_malformed_request_is_refused_before_its_connector_is_looked_up(
    client: httpx.AsyncClient,
) -> None:
    url = f"/connectors/{uuid.uuid4()}"
    assert_problem(
        await client.patch(url, json={"name": 1}, headers={"If-Match": '"1"'}), 422, "invalid_request"
    )
    assert_problem(await client.delete(url, headers={"If-Match": "1"}), 422, "invalid_request")
    assert_problem(await client.delete(url, headers={"If-Match": '"1"'}), 404, "connector_not_found")


async def test_a_well_formed_if_match_naming_no_version_of_ours_fails_the_precondition(
    client: httpx.AsyncClient,
) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    for if_match in ('"abc"', 'W/"1"', '"2"', '"99999999999999999999999"'):
        assert_problem(await client.delete(url, headers={"If-Match": if_match}), 412, "version_mismatch")
    assert (await client.delete(url, headers={"If-Match": ' , "7",, "1" ,'})).status_code == 204


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"name": None}, "name"),
        ({"resource_domain_url": None}, "resource_domain_url"),
        ({"auth": {"type": None}}, "auth.type"),
        ({"auth": {"grant_type": None}}, "auth.grant_type"),
        ({"auth": {"client_id": None}}, "auth.client_id"),
        ({"auth": {"extra_token_params": None}}, "auth.extra_token_params"),
    ],
)
async def test_a_change_may_not_set_a_field_to_null(
    client: httpx.AsyncClient, patch: dict[str, Any], field: str
) -> None:
    created = await create(client, payloads.client_credentials())
    response = await client.patch(f"/connectors/{created['id']}", json=patch)
    problem = assert_problem(response, 422, "invalid_request")
    assert problem["errors"] == [{"field": field, "reason": "may not be null"}]
    current = (await client.get(f"/connectors/{created['id']}")).json()
    assert current["version"] == created["version"]


async def test_null_removes_an_optional_oauth_field(client: httpx.AsyncClient) -> None:
    created = await create(client, payloads.client_credentials(audience="https://api.example.com/"))
    url = f"/connectors/{created['id']}"
    response = await client.patch(
        url, json={"auth": {"scope": None, "audience": None}}, params={"validate": "false"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["auth"]["scope"] is None
    assert response.json()["auth"]["audience"] is None
