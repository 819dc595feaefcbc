"""Request bodies refused by their models, without the app: such a body is a 422 before the
service, or the database, sees it. ``tests/connectors`` holds a few through the real app."""

from __future__ import annotations

from typing import Any

import pytest

from app.connectors.schemas import AuthorizeRequest
from tests.unit.refusals import refusal


@pytest.mark.parametrize(
    "value", ["yes", "true", "false", 1, 0, "1", "0", None, [], {}], ids=lambda value: repr(value)
)
def test_force_refresh_is_a_json_boolean(value: Any) -> None:
    errors = refusal(AuthorizeRequest, {"force_refresh": value}, as_json=True)
    assert errors == [{"field": "force_refresh", "reason": "Input should be a valid boolean"}]
    if isinstance(value, str) and len(value) > 1:
        assert value not in repr(errors)


@pytest.mark.parametrize("accepted", [True, False])
def test_force_refresh_takes_true_and_false(accepted: bool) -> None:
    body = AuthorizeRequest.model_validate_json(f'{{"force_refresh": {str(accepted).lower()}}}')
    assert body.force_refresh is accepted


def test_an_empty_authorize_body_asks_for_the_base_url_without_a_refresh() -> None:
    body = AuthorizeRequest.model_validate_json("{}")
    assert (body.path, body.force_refresh) == (None, False)
