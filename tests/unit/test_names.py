"""Name rules without the app: what a connector may be called (``schemas._name``), and what two
names are compared by (``schemas.name_key``). ``tests/connectors`` holds a few of each through the
real app, on both databases, where uniqueness is the database's to enforce."""

from __future__ import annotations

import pytest

from app.connectors.schemas import ConnectorCreate, name_key
from tests.connectors import payloads
from tests.unit.refusals import fields, refusal


@pytest.mark.parametrize("name", ["   ", "x" * 101, "bad\x07name"])
def test_invalid_names_are_listed_without_values(name: str) -> None:
    errors = refusal(ConnectorCreate, payloads.basic(name=name))
    assert errors and errors[0]["field"].startswith("name")
    assert name not in repr(errors)


@pytest.mark.parametrize("name", ["alpha\u200b", "a\u202eb", "line\u2028sep", "wo\u2029rd"])
def test_invisible_characters_in_names_are_refused(name: str) -> None:
    assert fields(refusal(ConnectorCreate, payloads.basic(name=name))) == ["name"]


def test_a_name_is_stored_trimmed() -> None:
    assert ConnectorCreate.model_validate(payloads.basic(name="  Billing API  ")).name == "Billing API"


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        (" BILLING ", "Billing"),
        ("billing", "Billing"),
        ("\uff22\uff49lling", "Billing"),
        ("Same ", "Same"),
        ("one", "One"),
    ],
)
def test_names_compare_case_insensitively_after_compatibility_normalisation(name: str, taken: str) -> None:
    stored = ConnectorCreate.model_validate(payloads.basic(name=taken)).name
    sent = ConnectorCreate.model_validate(payloads.basic(name=name)).name
    assert name_key(sent) == name_key(stored)


@pytest.mark.parametrize(("name", "other"), [("Billing", "Bi11ing"), ("Billing", "Billing 2"), ("é", "e")])
def test_other_names_have_other_keys(name: str, other: str) -> None:
    assert name_key(name) != name_key(other)
