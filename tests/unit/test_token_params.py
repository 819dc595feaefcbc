"""Rules for ``extra_token_params`` without the app: no name the token request sets itself, in any
spelling a provider could read as that name (``app.tokens.oauth.token_param_key``), and no two
names a provider could read as one. ``tests/connectors`` holds a few through the real app, on
create and on change, on both databases."""

from __future__ import annotations

import pytest

from app.connectors.schemas import ConnectorCreate
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key
from tests.connectors import payloads
from tests.unit.refusals import fields, refusal

RESERVED_SPELLINGS = [
    {"GRANT_TYPE": "implicit"},
    {"Client_Secret": "x"},
    {"client_ID": "intruder"},
    {"Scope": "admin"},
    {" scope": "admin"},
    {"scope ": "admin"},
    {"\uff53\uff43\uff4f\uff50\uff45": "admin"},
    {"Refresh_Token": "forged"},
    {"AUDIENCE": "https://evil.example.com"},
    {"grant.type": "implicit"},
    {"client-secret": "x"},
]
SAME_NAME_TWICE = [
    {"resource": "urn:a", "RESOURCE": "urn:b"},
    {"x.region": "eu", "X_Region": "us"},
]


@pytest.mark.parametrize("params", RESERVED_SPELLINGS + SAME_NAME_TWICE)
def test_reserved_token_parameters_are_refused_in_any_case(params: dict[str, str]) -> None:
    body = payloads.password_grant(extra_token_params=params)
    assert fields(refusal(ConnectorCreate, body)) == ["auth.extra_token_params"]


@pytest.mark.parametrize("params", RESERVED_SPELLINGS)
def test_each_refused_name_reads_as_a_reserved_one(params: dict[str, str]) -> None:
    (name,) = params
    assert token_param_key(name) in RESERVED_TOKEN_PARAMS


@pytest.mark.parametrize("params", SAME_NAME_TWICE)
def test_each_refused_pair_reads_as_one_name(params: dict[str, str]) -> None:
    first, second = params
    assert token_param_key(first) == token_param_key(second)
    assert token_param_key(first) not in RESERVED_TOKEN_PARAMS


def test_other_names_are_taken_as_sent() -> None:
    params = {"resource": "urn:contacts", "Tenant-Id": "t1", "x.region": "eu"}
    body = payloads.password_grant(extra_token_params=params)
    created = ConnectorCreate.model_validate(body).model_dump()
    assert created["auth"]["extra_token_params"] == params
