"""The ``If-Match`` header and the ``validate`` and ``limit`` query parameters, read without the
app: each is validated by the type the endpoint declares it with, and a refusal is listed as the
422 problem lists it (the framework locates a header or query value as ``("header", name)`` or
``("query", name)``). ``tests/connectors`` holds a few of each through the real app."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from app.connectors import router
from app.core import preconditions
from app.core.validation import field_errors


def _refusal(adapter: TypeAdapter[Any], value: str, location: tuple[str, str]) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as refused:
        adapter.validate_python(value)
    return field_errors(refused.value, prefix=location)


# If-Match ---------------------------------------------------------------------------------------

_IF_MATCH = TypeAdapter[Any](
    typing.get_type_hints(preconditions.parse_if_match, include_extras=True)["if_match"]
)
_IF_MATCH_REFUSED = [{"field": "header.If-Match", "reason": 'must be * or a list of entity tags such as "3"'}]


async def _if_match_answer(header: str, version: int) -> tuple[int, list[dict[str, str]]]:
    """What a change of a connector at ``version`` answers for this If-Match header, status and
    errors: 422 for a header that is no list of entity tags; else 412 unless it is ``*`` or names
    that version (the service's check)."""
    try:
        value = _IF_MATCH.validate_python(header)
    except ValidationError as error:
        return 422, field_errors(error, prefix=("header", "If-Match"))
    versions = await preconditions.parse_if_match(value)
    return (200 if versions is None or version in versions else 412), []


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ('"1"', 200),
        ('"7", "1"', 200),
        (' , "7",,"1" ,', 200),
        ("*", 200),
        ('W/"1"', 412),
        ('"7"', 412),
        ('"a"', 412),
        ("1", 422),
        ("null", 422),
        ('"1", *', 422),
        ("", 422),
    ],
)
async def test_if_match_forms(header: str, status: int) -> None:
    answer = await _if_match_answer(header, version=1)
    assert answer == (status, _IF_MATCH_REFUSED if status == 422 else [])


async def test_no_if_match_header_means_any_version() -> None:
    assert await preconditions.parse_if_match(None) is None


# ?validate= -------------------------------------------------------------------------------------

_VALIDATE = TypeAdapter[Any](router.Validate)


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "1", "0", "t", "f", "True", "FALSE", ""])
def test_validate_query_takes_only_true_or_false(value: str) -> None:
    (error,) = _refusal(_VALIDATE, value, ("query", "validate"))
    assert error["field"] == "query.validate"
    assert error["reason"].endswith("must be true or false")
    # Every refused value is answered alike: the answer does not depend on what was sent.
    assert [error] == _refusal(_VALIDATE, "maybe", ("query", "validate"))


@pytest.mark.parametrize(("value", "validate"), [("true", True), ("false", False)])
def test_validate_query_true_and_false(value: str, validate: bool) -> None:
    assert _VALIDATE.validate_python(value) is validate


# ?limit= ----------------------------------------------------------------------------------------

_LIMIT = TypeAdapter[Any](router.HistoryLimit)


@pytest.mark.parametrize(("value", "limit"), [("1", 1), ("100", 100), ("1000", 1000)])
def test_history_limit_from_one_to_a_thousand(value: str, limit: int) -> None:
    assert _LIMIT.validate_python(value) == limit


@pytest.mark.parametrize("value", ["0", "-1", "1001", "x", "", "1.5"])
def test_history_limit_out_of_range_is_refused(value: str) -> None:
    (error,) = _refusal(_LIMIT, value, ("query", "limit"))
    assert error["field"] == "query.limit"
