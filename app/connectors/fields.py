"""Field types of the connector's wire shapes and of every kind's models.

The types every package shares (``Strict``, ``EndpointURL``, ``Omissible``, ...) are
``app.core.fields``; they are re-exported here for the kinds. Each type carries its rule twice: the
validator decides, and the document states it as a pattern (``app.core.patterns``; tests keep the
two in agreement).
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
from app.tokens.consent import RESERVED_AUTHORIZATION_PARAMS
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key

__all__ = [
    "CONTROL",
    "RESERVED_AUTHORIZATION_PARAM",
    "RESERVED_TOKEN_PARAM",
    "Audience",
    "EndpointURL",
    "ExtraAuthorizationParams",
    "ExtraTokenParams",
    "Identifier",
    "Omissible",
    "Scope",
    "Secret",
    "Strict",
    "TokenLifetime",
    "Username",
    "check_authorization_params",
    "check_token_params",
    "no_control",
    "no_null_defaults",
    "not_null",
    "utf8",
]

# A name the token (authorization) request sets itself, in any spelling ``token_param_key`` folds
# together.
RESERVED_TOKEN_PARAM: Final = patterns.any_spelling_of(RESERVED_TOKEN_PARAMS)
RESERVED_AUTHORIZATION_PARAM: Final = patterns.any_spelling_of(RESERVED_AUTHORIZATION_PARAMS)


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


def _params_schema(what: str, request: str, reserved_pattern: str) -> dict[str, Any]:
    """What the document says of extra parameters; ``_params_rule`` enforces it."""
    return {
        "description": (
            f"Extra {what} for the {request}. A name is 1-64 ASCII letters, digits, `_`, `-` or "
            f"`.`, never one the {request} sets itself (in any case, with `.` or `-` for `_`); no two "
            "names may differ only in that way. A value has at most 1024 characters and no control "
            "character."
        ),
        "maxProperties": 10,
        "propertyNames": {"pattern": patterns.TOKEN_PARAM_NAME, "not": {"pattern": reserved_pattern}},
        "additionalProperties": {"type": "string", "maxLength": 1024, "pattern": patterns.NO_CONTROL},
    }


def _params_rule(reserved: frozenset[str], request: str) -> Callable[[dict[str, str]], dict[str, str]]:
    def check(value: dict[str, str]) -> dict[str, str]:
        # ASCII names only, so no space or lookalike character can hide a reserved name; and
        # compared without case, as many providers read parameter names.
        keys: set[str] = set()
        for key, item in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key):
                raise ValueError("parameter names must be 1-64 ASCII letters, digits, '_', '-' or '.'")
            folded = token_param_key(key)
            if folded in reserved:
                raise ValueError(
                    f"a parameter name is reserved for the {request} itself"
                    " (in any case, with '.' or '-' for '_')"
                )
            if folded in keys:
                raise ValueError("two parameter names differ only in case or in '.', '-' and '_'")
            keys.add(folded)
            if len(item) > 1024 or CONTROL.search(item) or not utf8(item):
                raise ValueError("parameter values must be at most 1024 characters, no control characters")
        return value

    return check


# The rules of ``extra_token_params`` and ``extra_authorization_params`` (field validators of the
# models using them).
check_token_params = _params_rule(RESERVED_TOKEN_PARAMS, "token request")
check_authorization_params = _params_rule(RESERVED_AUTHORIZATION_PARAMS, "authorization request")

ExtraTokenParams = TypeAliasType(
    "ExtraTokenParams",
    Annotated[
        dict[str, str],
        Field(json_schema_extra=_params_schema("form fields", "token request", RESERVED_TOKEN_PARAM)),
    ],
)
ExtraAuthorizationParams = TypeAliasType(
    "ExtraAuthorizationParams",
    Annotated[
        dict[str, str],
        Field(
            json_schema_extra=_params_schema(
                "query parameters", "authorization request", RESERVED_AUTHORIZATION_PARAM
            )
        ),
    ],
)
