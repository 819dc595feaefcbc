"""Field types of the connector's wire shapes and of every kind's models.

The types every package shares (``Strict``, ``EndpointURL``, ``Omissible``, ...) are
``app.core.fields``; they are re-exported here for the kinds. Each type carries its rule twice: the
validator decides, and the document states it as a pattern (``app.core.patterns``; tests keep the
two in agreement).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from pydantic import AfterValidator, Field, SecretStr, StringConstraints
from typing_extensions import TypeAliasType

from app.core import patterns
from app.core.fields import (
    CONTROL,
    EndpointURL,
    Omissible,
    Strict,
    no_control,
    no_null_defaults,
    not_null,
    utf8,
)
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key

__all__ = [
    "CONTROL",
    "RESERVED_TOKEN_PARAM",
    "Audience",
    "EndpointURL",
    "ExtraTokenParams",
    "Identifier",
    "Omissible",
    "Scope",
    "Secret",
    "Strict",
    "TokenLifetime",
    "Username",
    "check_token_params",
    "no_control",
    "no_null_defaults",
    "not_null",
    "utf8",
]

# A name the token request sets itself, in any spelling ``token_param_key`` folds together.
RESERVED_TOKEN_PARAM: Final = patterns.any_spelling_of(RESERVED_TOKEN_PARAMS)


def _secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not 1 <= len(raw) <= 1024:
        raise ValueError("must be 1-1024 characters")
    if "\x00" in raw or not utf8(raw):
        raise ValueError("may not contain NUL or unpaired surrogates")
    return value


Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(no_control),
    Field(json_schema_extra={"pattern": patterns.NO_CONTROL}),
]
Username = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(no_control),
    Field(json_schema_extra={"pattern": patterns.NO_CONTROL}),
]
Scope = Annotated[
    str,
    StringConstraints(max_length=1024),
    AfterValidator(no_control),
    Field(json_schema_extra={"pattern": patterns.NO_CONTROL}),
]
Secret = Annotated[
    SecretStr,
    AfterValidator(_secret),
    Field(
        description="Write-only: never shown again; reads say `has_...: true` instead",
        json_schema_extra={"writeOnly": True, "minLength": 1, "maxLength": 1024, "pattern": patterns.SECRET},
    ),
]
Audience = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
TokenLifetime = Annotated[int, Field(ge=1, le=86_400 * 30)]

# What the document says of extra_token_params; ``check_token_params`` enforces it.
_TOKEN_PARAMS_SCHEMA: dict[str, Any] = {
    "description": (
        "Extra form fields for the token request. A name is 1-64 ASCII letters, digits, `_`, `-` or `.`, "
        "never one the token request sets itself (in any case, with `.` or `-` for `_`); no two names "
        "may differ only in that way. A value has at most 1024 characters and no control character."
    ),
    "maxProperties": 10,
    "propertyNames": {
        "pattern": patterns.TOKEN_PARAM_NAME,
        "not": {"pattern": RESERVED_TOKEN_PARAM},
    },
    "additionalProperties": {"type": "string", "maxLength": 1024, "pattern": patterns.NO_CONTROL},
}


def check_token_params(value: dict[str, str]) -> dict[str, str]:
    """The rules of ``extra_token_params`` (a field validator of the models using it)."""
    # ASCII names only, so no space or lookalike character can hide a reserved name; and
    # compared without case, as many providers read form names.
    keys: set[str] = set()
    for key, item in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key):
            raise ValueError("parameter names must be 1-64 ASCII letters, digits, '_', '-' or '.'")
        folded = token_param_key(key)
        if folded in RESERVED_TOKEN_PARAMS:
            raise ValueError(
                "a parameter name is reserved for the token request itself"
                " (in any case, with '.' or '-' for '_')"
            )
        if folded in keys:
            raise ValueError("two parameter names differ only in case or in '.', '-' and '_'")
        keys.add(folded)
        if len(item) > 1024 or CONTROL.search(item) or not utf8(item):
            raise ValueError("parameter values must be at most 1024 characters, no control characters")
    return value


ExtraTokenParams = TypeAliasType(
    "ExtraTokenParams", Annotated[dict[str, str], Field(json_schema_extra=_TOKEN_PARAMS_SCHEMA)]
)
