"""Validation errors as a list of fields and reasons that never echo an input value."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Pydantic messages that quote the input (a discriminator tag, for one) get a fixed text instead.
_FIXED_REASONS = {
    "union_tag_invalid": "unknown value for the discriminator field",
    "union_tag_not_found": "the discriminator field is missing",
    "json_invalid": "the body is not valid JSON",
}


# What pydantic puts before the words of a validator's own ValueError or AssertionError.
_PREFIXES = {"value_error": "Value error, ", "assertion_error": "Assertion failed, "}


def error_message(error: Mapping[str, Any]) -> str:
    """The message of one of pydantic's errors, without the prefix naming the exception type."""
    message = str(error.get("msg") or "invalid value")
    prefix = _PREFIXES.get(str(error.get("type", "")))
    if prefix is not None and message.startswith(prefix):
        message = message[len(prefix) :]
    return message or "invalid value"


def _reason(error: Any) -> str:
    kind = str(error.get("type", ""))
    if kind in _FIXED_REASONS:
        return _FIXED_REASONS[kind]
    message = error_message(error)
    value = error.get("input")
    # Defensive: a message that contains the value it rejects is replaced, whatever produced it.
    if isinstance(value, str) and len(value) >= 3 and value in message:
        return "invalid value"
    if isinstance(value, (dict, list)) or value is None:
        return message
    if str(value) in message and len(str(value)) >= 3:
        return "invalid value"
    return message


@dataclass(frozen=True, slots=True)
class LocationRules:
    """What of pydantic's error locations is structure, and what would echo the input.

    ``tags``: for a field (or tag), the discriminator values pydantic inserts after it, which
    are dropped (``auth.oauth2.password.password`` becomes ``auth.password``). ``free_keys``:
    mapping fields whose keys are the caller's own; a key is shown as ``*``.
    """

    tags: Mapping[str, Collection[str]] = field(default_factory=dict)
    free_keys: Collection[str] = ()


_NO_RULES = LocationRules()


def _null_branch(error: Any, valued: Collection[tuple[Any, ...]]) -> bool:
    loc = tuple(error.get("loc", ()))
    if error.get("type") != "none_required" or not loc or loc[-1] != "none":
        return False
    parent = loc[:-1]
    return any(other[: len(parent)] == parent and other != loc for other in valued)


def field_errors(
    errors: Any, prefix: Sequence[str] = (), rules: LocationRules = _NO_RULES
) -> list[dict[str, str]]:
    """Turn pydantic's errors (a ``ValidationError`` or its ``errors()``) into safe entries."""
    items: list[Any] = list(errors.errors() if hasattr(errors, "errors") else errors)
    # A field that may be omitted but not null (``X | Omissible``) fails both branches of its
    # union; the null branch's error says nothing to a caller who sent a value.
    valued = {tuple(error.get("loc", ())) for error in items if error.get("type") != "none_required"}
    items = [error for error in items if not _null_branch(error, valued)]
    result: list[dict[str, str]] = []
    for error in items:
        kind = str(error.get("type", ""))
        raw = [*prefix, *error.get("loc", ())]
        if kind == "json_invalid":
            raw = [part for part in raw if not isinstance(part, int)]  # a character offset
        location: list[str] = []
        previous: str | None = None
        for part in raw:
            text = str(part)
            if (text == "body" and not location) or text.startswith(("function-", "tagged-union")):
                continue
            if previous is not None and text in rules.tags.get(previous, ()):
                previous = text
                continue
            location.append("*" if previous in rules.free_keys else text)
            previous = text
        reason = _reason(error)
        if kind == "extra_forbidden" and location:
            # The unknown name is the caller's input: name the object it was sent in.
            location[-1] = "*"
            reason = "unknown field"
        result.append({"field": ".".join(location) or "body", "reason": reason})
    return result
