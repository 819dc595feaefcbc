"""Field types shared by the connector's wire shapes and by every kind's models.

Each type carries its rule twice: the validator decides, and the document states it as a pattern
(``app.connectors.patterns``; tests keep the two in agreement).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypeAliasType

from app.connectors import patterns
from app.connectors.urls import URLRuleError, normalise_endpoint_url
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Strict(BaseModel):
    """An input model: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def utf8(value: str) -> bool:
    """False for a string no UTF-8 store accepts (JSON can carry a lone surrogate, ``\\ud800``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def no_control(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("may not contain control characters")
    return value


def _secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not 1 <= len(raw) <= 1024:
        raise ValueError("must be 1-1024 characters")
    if "\x00" in raw or not utf8(raw):
        raise ValueError("may not contain NUL or unpaired surrogates")
    return value


def _endpoint_url(value: str) -> str:
    try:
        return normalise_endpoint_url(value)
    except URLRuleError as error:
        raise ValueError(str(error)) from None


EndpointURL = Annotated[
    str,
    StringConstraints(max_length=2048),
    AfterValidator(_endpoint_url),
    Field(
        description="An `https://` URL with no user name or fragment; a query is allowed",
        json_schema_extra={"pattern": patterns.ENDPOINT_URL, "format": "uri"},
    ),
]
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
        "not": {"pattern": patterns.RESERVED_TOKEN_PARAM},
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

# A field that may be omitted but not sent as null: ``None`` only stands for "not sent".
Omissible = SkipJsonSchema[None]


def not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may not be null")
    return value


def no_null_defaults(schema: dict[str, Any]) -> None:
    """The null default only means "not sent": a field that may not be null shows none."""
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None and "anyOf" not in field:
            del field["default"]
