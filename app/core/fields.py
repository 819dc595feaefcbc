"""Field types every package's input models share: strict models, endpoint URLs, the rule of
fields that may be left out but not sent as null, and the character checks behind them.

Each type carries its rule twice: the validator decides, and the document states it as a pattern
(``app.core.patterns``; tests keep the two in agreement).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from app.core import patterns
from app.core.urls import URLRuleError, normalise_endpoint_url

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
