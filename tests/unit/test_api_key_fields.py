"""API-key connectors: the rules of their fields, the credential they hand out, and how a key
is put in a URL (``with_query``). Plain tests, no app and no database."""

from __future__ import annotations

import re
import uuid
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, TypeAdapter, ValidationError

from app.connectors import schemas
from app.connectors.kinds import kind_of
from app.connectors.kinds.api_key import (
    HEADER_NAME,
    KEY,
    KIND,
    QUERY_NAME,
    RESERVED_HEADER,
    RESERVED_HEADER_PREFIXES,
    RESERVED_HEADERS,
    ApiKeyAuthIn,
)
from app.connectors.models import Connector
from app.connectors.service.patching import merge_auth
from app.core.errors import InvalidRequest
from app.core.validation import field_errors
from app.tokens.static import with_query
from tests.conftest import CANARY

_AUTH: TypeAdapter[Any] = TypeAdapter(schemas.AuthIn)
_DRAWS = settings(max_examples=100, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
KEY_VALUE = f"{CANARY}-k3y_!~"


def _auth(**fields: Any) -> dict[str, Any]:
    return {"type": "api_key", "key": KEY_VALUE, "name": "X-API-Key", **fields}


def _refusals(raw: dict[str, Any]) -> list[dict[str, str]]:
    """The problem's ``errors`` for ``raw`` as the service builds them; fails if it is taken."""
    with pytest.raises(ValidationError) as caught:
        _AUTH.validate_python(raw)
    return field_errors(caught.value, prefix=("auth",), rules=schemas.LOCATIONS)


def _only_field(raw: dict[str, Any]) -> tuple[str, str]:
    [error] = _refusals(raw)
    return error["field"], error["reason"]


# The model ----------------------------------------------------------------------------------------


def test_a_header_key_by_default_with_nothing_optional() -> None:
    auth = _AUTH.validate_python(_auth())
    assert isinstance(auth, ApiKeyAuthIn)
    assert (auth.in_, auth.name, auth.prefix, auth.validation_url) == ("header", "X-API-Key", None, None)
    public, secrets = KIND.split(auth)
    # Stored under the wire names: ``in``, not ``in_``.
    assert public == {"in": "header", "name": "X-API-Key", "prefix": None, "validation_url": None}
    assert secrets["key"].get_secret_value() == KEY_VALUE
    assert KIND.read_model(public, {"key": "sealed"}) == {**public, "type": "api_key", "has_key": True}
    assert not KIND.checkable(public)


def test_every_visible_ascii_character_makes_a_key() -> None:
    visible = "".join(chr(code) for code in range(0x21, 0x7F))
    for key in (visible, "k", "x" * 1024):
        auth = _AUTH.validate_python(_auth(key=key))
        assert auth.key.get_secret_value() == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "x" * 1025,
        f"{CANARY} with a space",
        f"{CANARY}\ttab",
        f"{CANARY}\r\nX-Injected: 1",
        f"{CANARY}\x7f",
        f"{CANARY}-é",
        f"{CANARY}\u00a0",
        f"{CANARY}\x00",
    ],
    ids=["empty", "too long", "space", "tab", "line break", "DEL", "non-ASCII", "nbsp", "NUL"],
)
def test_a_key_that_is_not_visible_ascii_is_refused_without_being_echoed(key: str) -> None:
    field, reason = _only_field(_auth(key=key))
    assert field == "auth.key"
    assert reason.startswith("must be 1-1024 visible ASCII characters")
    # Validated on its own, the model prints no input either.
    with pytest.raises(ValidationError) as caught:
        ApiKeyAuthIn.model_validate(_auth(key=key))
    if key:
        assert key not in reason and key not in str(caught.value) and key not in repr(caught.value)


@pytest.mark.parametrize(
    "name",
    ["X-API-Key", "Authorization", "api_key", "x", "Ocp-Apim-Subscription-Key", "!#$%&'*+-.^_`|~", "A" * 64],
)
def test_header_names_are_http_tokens(name: str) -> None:
    assert _AUTH.validate_python(_auth(name=name)).name == name


@pytest.mark.parametrize(
    "name", ["", "A" * 65, "X API Key", "X-Key:", "Key(1)", "Ключ", "x\r\nHost", "a/b", 'a"b', "a@b"]
)
def test_header_names_outside_the_token_characters_are_refused(name: str) -> None:
    field, reason = _only_field(_auth(name=name))
    assert field == "auth.name"
    assert "HTTP token" in reason


def _reserved_spellings() -> list[str]:
    names = sorted(RESERVED_HEADERS) + [prefix + "x" for prefix in RESERVED_HEADER_PREFIXES]
    examples = ["Proxy-Authorization", "Content-Type", "X-Forwarded-For", "Content-Length", "COOKIE", "tE"]
    return [*names, *(name.upper() for name in names), *(name.title() for name in names), *examples]


@pytest.mark.parametrize("name", _reserved_spellings())
def test_headers_the_http_stack_or_a_proxy_owns_are_refused_in_any_case(name: str) -> None:
    field, reason = _only_field(_auth(name=name))
    assert field == "auth.name"
    # The message explains itself: it was not replaced for quoting its input.
    assert reason.startswith("that header name is reserved")
    # The same names are fine as query parameters, where they mean nothing to HTTP.
    assert _AUTH.validate_python(_auth(name=name, **{"in": "query"})).name == name


@pytest.mark.parametrize(
    "name", ["Hostname", "X-Host", "Contents", "Proxy", "Cookies", "Via2", "X-Forwarded"]
)
def test_names_that_only_resemble_reserved_ones_are_taken(name: str) -> None:
    assert _AUTH.validate_python(_auth(name=name)).name == name


@pytest.mark.parametrize("name", ["api_key", "apiKey", "X-API-Key", "a.b~c", "0", "k" * 64])
def test_query_parameter_names_are_unreserved_characters(name: str) -> None:
    auth = _AUTH.validate_python(_auth(name=name, **{"in": "query"}))
    assert (auth.in_, auth.name) == ("query", name)


@pytest.mark.parametrize("name", ["", "k" * 65, "a b", "a&b", "a=b", "a+b", "a%20b", "a!b", "a'b", "é"])
def test_query_parameter_names_outside_the_unreserved_characters_are_refused(name: str) -> None:
    field, reason = _only_field(_auth(name=name, **{"in": "query"}))
    assert field == "auth.name"
    assert reason.startswith("a query parameter name must be")


def test_a_prefix_goes_before_the_key_with_one_space() -> None:
    auth = _AUTH.validate_python(_auth(name="Authorization", prefix="Bearer"))
    public, secrets = KIND.split(auth)
    assert KIND.credential(public, secrets).headers == {"Authorization": f"Bearer {KEY_VALUE}"}


@pytest.mark.parametrize("prefix", ["", "Bearer ", "Be arer", "Bearer:", "Ключ", "p" * 65])
def test_a_prefix_is_a_token(prefix: str) -> None:
    field, reason = _only_field(_auth(prefix=prefix))
    assert field == "auth.prefix"
    assert "HTTP token" in reason


def test_a_prefix_is_refused_for_a_query_parameter() -> None:
    field, reason = _only_field(_auth(name="api_key", prefix="Bearer", **{"in": "query"}))
    assert field == "auth.prefix"
    assert "only sent with in: header" in reason
    # null is no prefix.
    assert _AUTH.validate_python(_auth(prefix=None, **{"in": "query"})).prefix is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"in": "cookie"}, "auth.in"),
        ({"in_": "query"}, "auth.*"),
        ({"validation_url": "http://api.example.com/me"}, "auth.validation_url"),
        ({"header": "X-API-Key"}, "auth.*"),
    ],
)
def test_other_refusals_name_their_field(fields: dict[str, Any], field: str) -> None:
    assert _only_field(_auth(**fields))[0] == field


def test_name_and_key_are_required() -> None:
    errors = _refusals({"type": "api_key"})
    assert {error["field"] for error in errors} == {"auth.key", "auth.name"}


# The credential ----------------------------------------------------------------------------------


def test_a_header_credential_and_its_check_carry_the_key() -> None:
    auth = _AUTH.validate_python(_auth(validation_url="https://api.example.com/v1/me"))
    public, secrets = KIND.split(auth)
    credential = KIND.credential(public, secrets)
    assert (dict(credential.headers), tuple(credential.query)) == ({"X-API-Key": KEY_VALUE}, ())
    assert KIND.checkable(public)
    assert KIND.destinations(public) == ["https://api.example.com/v1/me"]
    assert KEY_VALUE not in repr(credential)


def test_a_query_credential_is_one_parameter_and_no_header() -> None:
    auth = _AUTH.validate_python(_auth(name="api_key", **{"in": "query"}))
    public, secrets = KIND.split(auth)
    credential = KIND.credential(public, secrets)
    assert (dict(credential.headers), tuple(credential.query)) == ({}, (("api_key", KEY_VALUE),))


# What the document says is what the model decides --------------------------------------------------

_SCHEMA = ApiKeyAuthIn.model_json_schema()
CASES: list[dict[str, Any]] = [
    _auth(),
    _auth(name="Authorization", prefix="Bearer"),
    _auth(name="Host"),
    _auth(name="host", **{"in": "header"}),
    _auth(name="Host", **{"in": "query"}),
    _auth(name="X!Key"),
    _auth(name="X!Key", **{"in": "query"}),
    _auth(name="api_key", prefix="Bearer", **{"in": "query"}),
    _auth(name="api_key", prefix=None, **{"in": "query"}),
    _auth(prefix="Be arer"),
    _auth(key="a b"),
    _auth(key=""),
    _auth(name="Proxy-Authorization"),
    _auth(name="Content-Type", **{"in": "query"}),
    _auth(validation_url=None),
    _auth(validation_url="https://api.example.com/me?x=1"),
]


@pytest.mark.parametrize("raw", CASES)
def test_the_schema_accepts_exactly_what_the_model_accepts(raw: dict[str, Any]) -> None:
    try:
        ApiKeyAuthIn.model_validate(raw)
        taken = True
    except ValidationError:
        taken = False
    assert jsonschema_rs.is_valid(_SCHEMA, raw) is taken


@_DRAWS
@given(st.from_regex(HEADER_NAME, fullmatch=True))
def test_a_header_name_the_patterns_take_is_taken(name: str) -> None:
    reserved = re.search(RESERVED_HEADER, name) is not None
    assert jsonschema_rs.is_valid(_SCHEMA, _auth(name=name)) is not reserved
    try:
        ApiKeyAuthIn.model_validate(_auth(name=name))
    except ValidationError:
        assert reserved, name
    else:
        assert not reserved, name


@_DRAWS
@given(st.from_regex(QUERY_NAME, fullmatch=True), st.from_regex(KEY, fullmatch=True).filter(bool))
def test_a_query_name_and_key_the_patterns_take_are_taken(name: str, key: str) -> None:
    raw = _auth(name=name, key=key[:1024], **{"in": "query"})
    assert jsonschema_rs.is_valid(_SCHEMA, raw)
    ApiKeyAuthIn.model_validate(raw)


# A PATCH merged with what is stored ------------------------------------------------------------


def _stored(**public: Any) -> Connector:
    return Connector(
        id=uuid.uuid4(),
        organization_id="org-a",
        name="Keys",
        name_key="keys",
        resource_domain_url="https://api.example.com",
        auth_type="api_key",
        grant_type=None,
        auth_config={
            "in": "header",
            "name": "Authorization",
            "prefix": "Bearer",
            "validation_url": None,
            **public,
        },
        secrets={"key": "sealed:key"},
        version=1,
    )


def _patch(**auth: Any) -> Any:
    return schemas.ConnectorPatch.model_validate({"auth": auth}).auth


def _open(row: Connector) -> dict[str, SecretStr]:
    return {"key": SecretStr(KEY_VALUE)}


def test_a_patch_moves_the_key_to_a_query_parameter_by_its_wire_names() -> None:
    merged = merge_auth(_stored(), _patch(**{"in": "query", "name": "api_key", "prefix": None}), _open)
    assert merged.kind is kind_of("api_key", None)
    assert merged.public == {"in": "query", "name": "api_key", "prefix": None, "validation_url": None}
    assert merged.secrets is not None and merged.sent_secrets == set()
    assert KIND.credential(merged.public, merged.secrets).query == (("api_key", KEY_VALUE),)


def test_a_patch_to_a_query_keeping_the_stored_prefix_names_the_prefix() -> None:
    with pytest.raises(InvalidRequest) as caught:
        merge_auth(_stored(), _patch(**{"in": "query"}), _open)
    assert caught.value.extra["errors"] == [
        {
            "field": "auth.prefix",
            "reason": "a prefix is only sent with in: header; send null or leave it out with in: query",
        }
    ]


# with_query ----------------------------------------------------------------------------------


def test_with_query_adds_a_parameter_to_a_url_without_a_query() -> None:
    assert with_query("https://api.example.com/v1/items", [("api_key", "k3y")]) == (
        "https://api.example.com/v1/items?api_key=k3y"
    )
    assert (
        with_query("https://api.example.com", [("api_key", "k3y")]) == "https://api.example.com?api_key=k3y"
    )


def test_with_query_keeps_the_callers_parameters_in_order() -> None:
    url = "https://api.example.com/v1/items?id=7&sort=name&flag"
    assert with_query(url, [("api_key", "k3y")]) == f"{url}&api_key=k3y"


def test_with_query_percent_encodes_a_key_with_reserved_characters() -> None:
    key = "a b&c=d+e/f?g#h%i~j"
    url = with_query("https://api.example.com/x", [("api_key", key)])
    assert url == "https://api.example.com/x?api_key=a%20b%26c%3Dd%2Be%2Ff%3Fg%23h%25i~j"
    # Nothing of the key can end the parameter early or start another.
    query = url.partition("?")[2]
    assert query.count("&") == 0 and query.count("=") == 1 and "#" not in url


@pytest.mark.parametrize(
    ("path_query", "kept"),
    [
        ("api_key=caller", ""),
        ("id=7&api_key=caller&sort=name", "id=7&sort=name&"),
        ("api_key=one&api_key=two&id=7", "id=7&"),
        ("api%5Fkey=encoded&id=7", "id=7&"),
        ("api_key&id=7", "id=7&"),
        ("api_key=&id=7", "id=7&"),
        ("&&id=7&", "id=7&"),
        ("API_KEY=other-case&id=7", "API_KEY=other-case&id=7&"),
        ("api_keys=longer", "api_keys=longer&"),
    ],
)
def test_with_query_replaces_a_parameter_of_the_same_name_from_the_callers_path(
    path_query: str, kept: str
) -> None:
    url = with_query(f"https://api.example.com/v1/items?{path_query}", [("api_key", "k3y")])
    assert url == f"https://api.example.com/v1/items?{kept}api_key=k3y"


def test_with_query_without_pairs_is_the_url_as_given() -> None:
    url = "https://api.example.com/v1/items?api_key=caller"
    assert with_query(url, []) == url
