"""Validation messages say what is wrong in the validator's own words, in answers and at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel, ValidationError, field_validator

from app.core.validation import error_message, field_errors
from tests.connectors import payloads


class _Checked(BaseModel):
    word: str
    count: int

    @field_validator("word")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > 3:
            raise ValueError("must be at most 3 characters")
        return value

    @field_validator("count")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            # What a plain ``assert`` raises (pytest rewrites asserts in this module's text).
            raise AssertionError("must be positive")
        return value


def test_field_errors_drop_the_exception_prefix() -> None:
    with pytest.raises(ValidationError) as caught:
        _Checked(word="long", count=0)
    assert field_errors(caught.value) == [
        {"field": "word", "reason": "must be at most 3 characters"},
        {"field": "count", "reason": "must be positive"},
    ]


def test_error_message_strips_only_the_prefix_of_its_type() -> None:
    assert (
        error_message({"type": "int_parsing", "msg": "Value error, as written"}) == "Value error, as written"
    )
    assert error_message({"type": "value_error", "msg": "Value error, "}) == "invalid value"
    assert error_message({"type": "assertion_error", "msg": "Assertion failed, "}) == "invalid value"


async def test_a_field_validators_reason_in_a_422_has_no_prefix(client: httpx.AsyncClient) -> None:
    body = payloads.basic(name="   ")
    body["auth"]["username"] = "svc:user"
    response = await client.post("/connectors", json=body, params={"validate": "false"})
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [
        {"field": "name", "reason": "must be 1-100 characters after trimming"},
        {"field": "auth.username", "reason": "a Basic authentication username may not contain ':'"},
    ]
    assert "error," not in response.text.lower()


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"CONNECTORS_DATABASE_URL": "mysql://x"},
            "connectors: CONNECTORS_DATABASE_URL: must start with sqlite+aiosqlite:// or postgresql+asyncpg://",
        ),
        (
            {"CONNECTORS_ENCRYPTION_KEYS": "k1"},
            "connectors: CONNECTORS_ENCRYPTION_KEYS: each key must be written as id:base64key",
        ),
        (
            {"CONNECTORS_MAX_STALENESS_SECONDS": "1"},
            "connectors: settings: CONNECTORS_MAX_STALENESS_SECONDS must exceed twice"
            " CONNECTORS_CHANGE_POLL_INTERVAL_SECONDS",
        ),
    ],
    ids=["database_url", "encryption_keys", "between_settings"],
)
def test_a_malformed_settings_start_up_line_has_no_prefix(
    tmp_path: Path, variables: dict[str, str], line: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTORS_")}
    env |= {"CONNECTORS_DATA_DIR": str(tmp_path), **variables}
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Value error" not in result.stderr
