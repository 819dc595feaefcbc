"""What the API would answer for a request body, worked out without the app: the body is validated
by the model the endpoint declares, and a refusal is listed as the 422 ``invalid_request`` problem
lists it (``app.core.validation.field_errors`` with the connectors' location rules)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from app.connectors import schemas
from app.core.validation import field_errors
from tests.conftest import CANARY


def refusal(model: type[BaseModel], body: Any, *, as_json: bool = False) -> list[dict[str, str]]:
    """The ``errors`` of the 422 problem for ``body``; fails the test when the body is taken.

    ``as_json`` validates the body as the JSON text it arrives as (the ``/authorize`` endpoint reads
    its body that way); otherwise it is validated as parsed JSON, as for the other endpoints.
    """
    with pytest.raises(ValidationError) as refused:
        _validate(model, body, as_json=as_json)
    errors = field_errors(refused.value, rules=schemas.LOCATIONS)
    # Like every answer, the list of errors carries no secret.
    assert CANARY not in repr(errors)
    return errors


def _validate(model: type[BaseModel], body: Any, *, as_json: bool) -> BaseModel:
    if as_json:
        return model.model_validate_json(json.dumps(body))
    return model.model_validate(body)


def fields(errors: list[dict[str, str]]) -> list[str]:
    return [error["field"] for error in errors]
