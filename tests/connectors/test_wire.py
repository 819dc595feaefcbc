"""What the API takes on the wire: connector ids in one spelling, booleans as booleans."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.connectors import payloads
from tests.connectors.test_crud import NO_CHECK, anonymized, assert_problem, create

ClientFor = Callable[..., httpx.AsyncClient]

# Every route that takes a connector id, with a body it would accept.
ID_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "", None),
    ("PATCH", "", {"name": "Renamed"}),
    ("DELETE", "", None),
    ("POST", "/validate", None),
    ("GET", "/history", None),
    ("POST", "/authorize", {}),
]


def other_spellings(connector_id: str) -> dict[str, str]:
    """Spellings of the same UUID that ``uuid.UUID`` reads but this service does not issue."""
    digits = connector_id.replace("-", "")
    spellings = {
        "braces": "{" + connector_id + "}",
        "opening brace": "{" + connector_id,
        "urn": "urn:uuid:" + connector_id,
        "uuid prefix": "uuid:" + connector_id,
        "no hyphens": digits,
        "hyphens elsewhere": "-".join(digits[i : i + 4] for i in range(0, 32, 4)),
        "upper case": connector_id.upper(),
        "mixed case": connector_id[:9] + connector_id[9:].upper(),
        "braced upper case without hyphens": "{" + digits.upper() + "}",
    }
    for spelling in spellings.values():
        # Each is another text for the very same UUID.
        assert spelling != connector_id
        assert uuid.UUID(spelling) == uuid.UUID(connector_id)
    return spellings


@pytest.mark.parametrize(("method", "suffix", "body"), ID_ROUTES, ids=[m + s for m, s, _ in ID_ROUTES])
async def test_an_id_in_another_spelling_is_an_unknown_id(
    client: httpx.AsyncClient, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    # A mixed-case spelling needs a letter among the digits after the first group.
    created = await create(client, payloads.basic())
    while not any(c in "abcdef" for c in created["id"][9:]):
        created = await create(client, payloads.basic(name=f"Basic {uuid.uuid4()}"))
    canonical = created["id"]
    absent = await client.request(method, f"/connectors/{uuid.uuid4()}{suffix}", json=body)
    assert_problem(absent, 404, "connector_not_found")
    for label, spelling in other_spellings(canonical).items():
        response = await client.request(method, f"/connectors/{spelling}{suffix}", json=body)
        assert response.status_code == 404, (label, response.text)
        assert anonymized(response) == anonymized(absent), label
        assert response.headers["content-type"] == absent.headers["content-type"]
    # Nothing reached the connector: not renamed, not deleted, not checked, no event recorded.
    current = await client.get(f"/connectors/{canonical}")
    assert current.status_code == 200
    assert current.json()["version"] == 1
    assert current.json()["name"] == created["name"]
    assert current.json()["status"]["state"] == "unverified"
    history = (await client.get(f"/connectors/{canonical}/history")).json()["items"]
    assert [event["action"] for event in history] == ["create"]
    # The canonical spelling is served.
    assert (await client.post(f"/connectors/{canonical}/authorize", json={})).status_code == 200


# The other values: tests/unit/test_bodies.py.
@pytest.mark.parametrize("value", ["yes", 1], ids=lambda value: repr(value))
async def test_force_refresh_is_a_json_boolean(client: httpx.AsyncClient, value: Any) -> None:
    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}/authorize"
    response = await client.post(url, json={"force_refresh": value})
    problem = assert_problem(response, 422, "invalid_request")
    assert problem["errors"] == [{"field": "force_refresh", "reason": "Input should be a valid boolean"}]
    if isinstance(value, str) and len(value) > 1:
        assert value not in response.text
    for accepted in (True, False):
        assert (await client.post(url, json={"force_refresh": accepted})).status_code == 200


# The other values: tests/unit/test_request_params.py.
@pytest.mark.parametrize("value", ["yes", "1"])
async def test_validate_query_takes_only_true_or_false(client: httpx.AsyncClient, value: str) -> None:
    refused = await client.post("/connectors", json=payloads.basic(), params={"validate": value})
    problem = assert_problem(refused, 422, "invalid_request")
    (error,) = problem["errors"]
    assert error["field"] == "query.validate"
    assert error["reason"].endswith("must be true or false")
    assert (await client.get("/connectors")).json()["items"] == []

    created = await create(client, payloads.basic())
    url = f"/connectors/{created['id']}"
    refused = await client.patch(url, json={"name": "Renamed"}, params={"validate": value})
    maybe = await client.patch(url, json={"name": "Renamed"}, params={"validate": "maybe"})
    assert anonymized(refused) == anonymized(maybe)
    assert_problem(refused, 422, "invalid_request")
    assert (await client.get(url)).json()["version"] == 1


async def test_validate_query_true_and_false(client: httpx.AsyncClient) -> None:
    created = await client.post("/connectors", json=payloads.basic(), params=NO_CHECK)
    assert created.status_code == 201, created.text
    url = f"/connectors/{created.json()['id']}"
    # A rename checks nothing live, so validate=true answers without calling out.
    renamed = await client.patch(url, json={"name": "Renamed"}, params={"validate": "true"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["version"] == 2
