"""Validation errors as a list of fields and reasons that never echo an input value."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Pydantic messages that quote the input (a discriminator tag, for one) get a fixed text instead.
_FIXED_REASONS = {
    "union_tag_invalid": "unknown value for the discriminator field",
    "union_tag_not_found": "the discriminator field is missing",
    "json_invalid": "the body is not valid JSON",
}


def _reason(error: Any) -> str:
    kind = str(error.get("type", ""))
    if kind in _FIXED_REASONS:
        return _FIXED_REASONS[kind]
    message = str(error.get("msg", "invalid value"))
    value = error.get("input")
    # Defensive: a message that contains the value it rejects is replaced, whatever produced it.
    if isinstance(value, str) and len(value) >= 3 and value in message:
        return "invalid value"
    if isinstance(value, (dict, list)) or value is None:
        return message
    if str(value) in message and len(str(value)) >= 3:
        return "invalid value"
    return message


def field_errors(errors: Any, prefix: Sequence[str] = ()) -> list[dict[str, str]]:
    """Turn pydantic's errors (a ``ValidationError`` or its ``errors()``) into safe entries."""
    items: Iterable[Any] = errors.errors() if hasattr(errors, "errors") else errors
    result: list[dict[str, str]] = []
    for error in items:
        location = [str(part) for part in (*prefix, *error.get("loc", ())) if part != "body"]
        # Drop the union member names pydantic inserts ("basic", "oauth2", "client_credentials").
        location = [part for part in location if not part.startswith(("function-", "tagged-union"))]
        result.append({"field": ".".join(location) or "body", "reason": _reason(error)})
    return result
