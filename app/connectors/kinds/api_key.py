"""API keys: a static secret sent as a request header or as a query parameter.

The wire shape follows OpenAPI's ``apiKey`` security scheme: ``in`` says where the key goes
(``header``, the default, or ``query``) and ``name`` under which name. A header key may have a
``prefix``, a scheme written before it with one space (``Authorization: Bearer <key>``).

``in`` defaults to ``header`` because a header is the place for a secret: a query parameter is
part of the URL, which access logs, proxies and error reports keep. A key goes in a query only
when someone asks for it.

Header names that the HTTP client or a proxy sets itself, or that describe the body, are refused
(``RESERVED_HEADERS``, ``RESERVED_HEADER_PREFIXES``): a key there would break the request, be
replaced on the way, or reach a proxy instead of the resource. ``Cookie`` is among them: its
value must be ``name=value`` pairs (RFC 6265 §4.2.1), which a bare key is not, and an HTTP client
with a cookie jar would replace it; OpenAPI's ``in: cookie`` is a location this kind does not
offer.

The live check is a ``GET validation_url`` with the key applied, as for Basic; without a
validation URL there is nothing to check, and the connector stays ``unverified``. Authorize
hands the credential out from memory: the header, or the query parameter added to the URL.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from app.connectors.fields import EndpointURL, Strict
from app.connectors.kinds.base import Public, Secrets, StaticKind
from app.connectors.kinds.example import BodyExample
from app.tokens.types import StaticCredential

__all__ = [
    "HEADER_NAME",
    "KEY",
    "KIND",
    "PREFIX",
    "QUERY_NAME",
    "RESERVED_HEADER",
    "RESERVED_HEADERS",
    "RESERVED_HEADER_PREFIXES",
    "ApiKeyAuthIn",
    "ApiKeyAuthOut",
    "ApiKeyKind",
    "reserved_header",
]

# RFC 9110 §5.6.2: tchar, the characters of a token (header field names, auth schemes).
_TCHAR = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]"
# RFC 3986 §2.3: unreserved, the characters a query parameter name needs no encoding for.
_UNRESERVED = "[A-Za-z0-9\\-._~]"

# The rules as JSON Schema patterns for the document (see ``app.core.patterns``).
KEY: Final = "^[\\x21-\\x7e]*$"
HEADER_NAME: Final = f"^{_TCHAR}{{1,64}}$"
QUERY_NAME: Final = f"^{_UNRESERVED}{{1,64}}$"
PREFIX: Final = f"^{_TCHAR}{{1,64}}$"

# Set by the HTTP client for each connection or message (framing, connection management), by
# proxies on the way (forwarding), or by the cookie handling; compared case-insensitively.
RESERVED_HEADERS: Final = frozenset(
    {
        "connection",
        "content-length",
        "cookie",
        "expect",
        "forwarded",
        "host",
        "keep-alive",
        "max-forwards",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "via",
    }
)
# ``Proxy-*`` is addressed to the next proxy, which consumes it; ``Content-*`` describes the body
# the caller sends; ``X-Forwarded-*`` is rewritten by load balancers.
RESERVED_HEADER_PREFIXES: Final = ("proxy-", "content-", "x-forwarded-")


def _any_case(name: str) -> str:
    # The names hold letters and '-' only; '-' needs no escape outside a class.
    return "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in name)


RESERVED_HEADER: Final = (
    "^(?:"
    + "|".join(
        [_any_case(name) for name in sorted(RESERVED_HEADERS)]
        + [_any_case(prefix) + ".*" for prefix in RESERVED_HEADER_PREFIXES]
    )
    + ")$"
)

_VISIBLE = re.compile(r"[\x21-\x7e]{1,1024}")
_TOKEN = re.compile(f"{_TCHAR}{{1,64}}")
_QUERY_NAME = re.compile(f"{_UNRESERVED}{{1,64}}")

# The messages name the rule, never the value (and contain no reserved name, so that the error
# rendering, which hides a message quoting its input, keeps them).
_KEY_RULE = "must be 1-1024 visible ASCII characters: no space, control or non-ASCII character"
_HEADER_RULE = (
    "a header name must be 1-64 characters of an HTTP token: ASCII letters, digits and !#$%&'*+-.^_`|~"
)
_QUERY_RULE = "a query parameter name must be 1-64 ASCII letters, digits, '-', '.', '_' or '~'"
_RESERVED_RULE = (
    "that header name is reserved: the HTTP client or a proxy sets it itself, or it describes the body"
)
_PREFIX_RULE = "a prefix must be 1-64 characters of an HTTP token: ASCII letters, digits and !#$%&'*+-.^_`|~"
_PREFIX_IN_QUERY = "a prefix is only sent with in: header; send null or leave it out with in: query"


def reserved_header(name: str) -> bool:
    """Whether ``name`` is a header this kind may not send the key in."""
    folded = name.lower()
    return folded in RESERVED_HEADERS or folded.startswith(RESERVED_HEADER_PREFIXES)


def _key(value: SecretStr) -> SecretStr:
    if not _VISIBLE.fullmatch(value.get_secret_value()):
        raise ValueError(_KEY_RULE)
    return value


ApiKeySecret = Annotated[
    SecretStr,
    AfterValidator(_key),
    Field(
        description=(
            "Write-only: never shown again; reads say `has_key: true` instead. 1-1024 visible ASCII "
            "characters (`!` to `~`), as it is sent in a header or a URL"
        ),
        json_schema_extra={"writeOnly": True, "minLength": 1, "maxLength": 1024, "pattern": KEY},
    ),
]
Location = Literal["header", "query"]


class ApiKeyAuthIn(Strict):
    """An API key sent as a request header or a query parameter, checked by `GET validation_url`
    when there is one (without it the connector stays `unverified`)."""

    model_config = ConfigDict(
        # A ValidationError of this model, printed, shows no input (the key among them).
        hide_input_in_errors=True,
        json_schema_extra={
            # What depends on `in`: a query parameter name is narrower, and a prefix goes with
            # a header only; a header name may not be one the HTTP client or a proxy sets.
            "if": {"properties": {"in": {"const": "query"}}, "required": ["in"]},
            "then": {"properties": {"name": {"pattern": QUERY_NAME}, "prefix": {"type": "null"}}},
            "else": {"properties": {"name": {"not": {"pattern": RESERVED_HEADER}}}},
            "examples": [
                {
                    "type": "api_key",
                    "key": "s3cret-key",
                    "in": "header",
                    "name": "X-API-Key",
                    "prefix": None,
                    "validation_url": "https://api.example.com/v1/me",
                }
            ],
        },
    )

    type: Literal["api_key"]
    key: ApiKeySecret
    in_: Location = Field(
        default="header",
        alias="in",
        description="Where the key is sent: a request header (the default) or a query parameter",
    )
    name: Annotated[
        str,
        Field(
            description=(
                "The header's name (an HTTP token, 1-64 characters; not one the HTTP client or a proxy "
                "sets itself: `Host`, `Content-*`, `Transfer-Encoding`, `Connection`, `Keep-Alive`, "
                "`Upgrade`, `TE`, `Trailer`, `Expect`, `Proxy-*`, `Via`, `Forwarded`, `Max-Forwards`, "
                "`X-Forwarded-*`, `Cookie`, in any case), or the query parameter's name (1-64 ASCII "
                "letters, digits, `-`, `.`, `_` or `~`)"
            ),
            examples=["X-API-Key"],
            json_schema_extra={"minLength": 1, "maxLength": 64, "pattern": HEADER_NAME},
        ),
    ]
    prefix: (
        Annotated[
            str,
            Field(
                description=(
                    "With `in: header` only: a scheme written before the key with one space "
                    "(`Bearer` sends `Bearer <key>`); an HTTP token, 1-64 characters"
                ),
                examples=["Bearer"],
                json_schema_extra={"minLength": 1, "maxLength": 64, "pattern": PREFIX},
            ),
        ]
        | None
    ) = None
    validation_url: EndpointURL | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str, info: ValidationInfo) -> str:
        location = info.data.get("in_")
        if location == "query":
            if not _QUERY_NAME.fullmatch(value):
                raise ValueError(_QUERY_RULE)
            return value
        if not _TOKEN.fullmatch(value):
            raise ValueError(_HEADER_RULE)
        if location == "header" and reserved_header(value):
            raise ValueError(_RESERVED_RULE)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("in_") == "query":
            raise ValueError(_PREFIX_IN_QUERY)
        if not _TOKEN.fullmatch(value):
            raise ValueError(_PREFIX_RULE)
        return value


class ApiKeyAuthOut(BaseModel):
    type: Literal["api_key"]
    in_: Location = Field(alias="in")
    name: str
    prefix: str | None = None
    validation_url: str | None = None
    has_key: bool


class ApiKeyKind(StaticKind):
    auth_type = "api_key"
    example = BodyExample(
        "apiKey",
        "An API key in a header, checked by GET validation_url",
        {
            "name": "Billing API",
            "resource_domain_url": "https://billing.example.com",
            "auth": {
                "type": "api_key",
                "key": "s3cret-key",
                "in": "header",
                "name": "X-API-Key",
                "prefix": None,
                "validation_url": "https://billing.example.com/v1/me",
            },
        },
    )
    schema_prefix = "ApiKey"
    input_model = ApiKeyAuthIn
    output_model = ApiKeyAuthOut
    guarded_urls = ("validation_url",)

    def credential(self, public: Public, secrets: Secrets) -> StaticCredential:
        key = secrets["key"].get_secret_value()
        name: str = public["name"]
        if public["in"] == "query":
            return StaticCredential(query=((name, key),))
        prefix = public.get("prefix")
        return StaticCredential(headers={name: f"{prefix} {key}" if prefix else key})


KIND = ApiKeyKind()
