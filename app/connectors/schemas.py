"""The connector's wire shapes.

``auth`` is a discriminated union: on ``type`` (basic | oauth2), then for OAuth 2.0 on
``grant_type`` (client_credentials | password). Secrets are ``SecretStr`` and write-only: read
models carry ``has_password`` / ``has_client_secret`` instead. Adding a kind of credentials is one
new input model, one read model, and one entry in ``app.connectors.kinds``.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypeAliasType

from app.connectors import patterns
from app.connectors.urls import URLRuleError, normalise_base_url, normalise_endpoint_url
from app.core.validation import LocationRules
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _name(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 100:
        raise ValueError("must be 1-100 characters after trimming")
    # Control characters, and the invisible ones (format, line and paragraph separators, bidi
    # overrides) that make two names look alike or reorder what an admin reads.
    if _CONTROL.search(value) or any(
        unicodedata.category(c) in ("Cc", "Cs", "Cf", "Zl", "Zp") for c in value
    ):
        raise ValueError("may not contain control or invisible characters")
    return value


def name_key(name: str) -> str:
    """What names are compared by: compatibility-normalised and case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def _base_url(value: str) -> str:
    try:
        return normalise_base_url(value)
    except URLRuleError as error:
        raise ValueError(str(error)) from None


def _endpoint_url(value: str) -> str:
    try:
        return normalise_endpoint_url(value)
    except URLRuleError as error:
        raise ValueError(str(error)) from None


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("may not contain control characters")
    return value


def _utf8(value: str) -> bool:
    # JSON can carry a lone surrogate (\ud800), which no UTF-8 store accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not 1 <= len(raw) <= 1024:
        raise ValueError("must be 1-1024 characters")
    if "\x00" in raw or not _utf8(raw):
        raise ValueError("may not contain NUL or unpaired surrogates")
    return value


# The document states each rule as a pattern (app.connectors.patterns); the validators decide.
ConnectorName = Annotated[
    str,
    AfterValidator(_name),
    Field(
        description=(
            "1-100 characters once leading and trailing white space is trimmed (it is), with no control or "
            "invisible character; unique in the organization, compared case-insensitively"
        ),
        examples=["Contact Center Connector"],
        json_schema_extra={"pattern": patterns.NAME},
    ),
]
BaseURL = Annotated[
    str,
    StringConstraints(max_length=2048),
    AfterValidator(_base_url),
    Field(
        description=(
            "`https://host[:port][/base/path]`: no user name, query or fragment, no dot segment or encoded "
            "slash in the path; stored normalised (lower-case host, no default port, no trailing slash)"
        ),
        examples=["https://api.example.com"],
        json_schema_extra={"pattern": patterns.BASE_URL, "format": "uri"},
    ),
]
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
    AfterValidator(_no_control),
    Field(json_schema_extra={"pattern": patterns.NO_CONTROL}),
]
Username = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(_no_control),
    Field(json_schema_extra={"pattern": patterns.NO_CONTROL}),
]
Scope = Annotated[
    str,
    StringConstraints(max_length=1024),
    AfterValidator(_no_control),
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
# Named, so the document (and a client generated from it) has one of each, not one per model.
ClientAuthMethod = TypeAliasType("ClientAuthMethod", Literal["client_secret_basic", "client_secret_post"])
TokenLifetime = Annotated[int, Field(ge=1, le=86_400 * 30)]
# What the document says of extra_token_params; ``_OAuth2Common._check_params`` enforces it.
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
ExtraTokenParams = TypeAliasType(
    "ExtraTokenParams", Annotated[dict[str, str], Field(json_schema_extra=_TOKEN_PARAMS_SCHEMA)]
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class _OAuth2Common(_Strict):
    type: Literal["oauth2"]
    client_id: Identifier
    client_secret: Secret
    token_url: EndpointURL
    scope: Scope | None = None
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    audience: Audience | None = None
    extra_token_params: ExtraTokenParams = Field(default_factory=dict, max_length=10)
    token_lifetime_seconds: TokenLifetime | None = None

    @field_validator("extra_token_params")
    @classmethod
    def _check_params(cls, value: dict[str, str]) -> dict[str, str]:
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
            if len(item) > 1024 or _CONTROL.search(item) or not _utf8(item):
                raise ValueError("parameter values must be at most 1024 characters, no control characters")
        return value


class BasicAuthIn(_Strict):
    """Basic authentication, checked by ``GET validation_url``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "basic",
                    "username": "svc-user",
                    "password": "s3cret",
                    "validation_url": "https://api.example.com/auth/check",
                }
            ]
        }
    )

    type: Literal["basic"]
    username: Annotated[Username, Field(json_schema_extra={"pattern": patterns.BASIC_USERNAME})]
    password: Secret
    validation_url: EndpointURL

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        # The server splits user-id and password at the first colon (RFC 7617 section 2).
        if ":" in value:
            raise ValueError("a Basic authentication username may not contain ':'")
        return value


class OAuth2ClientCredentialsIn(_OAuth2Common):
    """OAuth 2.0 client credentials grant (the default grant)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "oauth2",
                    "grant_type": "client_credentials",
                    "client_id": "abc",
                    "client_secret": "s3cret",
                    "token_url": "https://idp.example.com/oauth/token",
                    "scope": "read write",
                }
            ]
        }
    )

    grant_type: Literal["client_credentials"] = "client_credentials"


class OAuth2PasswordIn(_OAuth2Common):
    """OAuth 2.0 resource-owner password grant."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "oauth2",
                    "grant_type": "password",
                    "client_id": "abc",
                    "client_secret": "s3cret",
                    "token_url": "https://idp.example.com/oauth/token",
                    "scope": "read",
                    "username": "svc-user",
                    "password": "s3cret",
                }
            ]
        }
    )

    grant_type: Literal["password"]
    username: Username
    password: Secret


# A named alias makes the inner union a schema of its own, so the outer discriminator's mapping
# can reference it (OpenAPI allows only references there).
OAuth2AuthIn = TypeAliasType(
    "OAuth2AuthIn",
    Annotated[OAuth2ClientCredentialsIn | OAuth2PasswordIn, Field(discriminator="grant_type")],
)
AuthIn = Annotated[BasicAuthIn | OAuth2AuthIn, Field(discriminator="type")]


def _default_grant(value: Any) -> Any:
    # grant_type may be omitted: client_credentials is the default grant.
    if isinstance(value, dict) and value.get("type") == "oauth2" and "grant_type" not in value:
        return {**value, "grant_type": "client_credentials"}
    return value


class ConnectorCreate(_Strict):
    name: ConnectorName
    resource_domain_url: BaseURL
    auth: AuthIn

    @model_validator(mode="before")
    @classmethod
    def _grant_default(cls, value: Any) -> Any:
        if isinstance(value, dict) and "auth" in value:
            return {**value, "auth": _default_grant(value["auth"])}
        return value


# A field that may be omitted but not sent as null: ``None`` only stands for "not sent".
Omissible = SkipJsonSchema[None]


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may not be null")
    return value


def _no_null_defaults(schema: dict[str, Any]) -> None:
    # The null default only means "not sent": a field that may not be null shows none.
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None and "anyOf" not in field:
            del field["default"]


class AuthPatch(_Strict):
    """Fields of ``auth`` to change. Omitted secrets keep their stored values.

    The fields must fit the connector's kind once merged with what is stored; a change of
    ``type`` or ``grant_type`` needs the whole new ``auth`` object. ``scope``, ``audience`` and
    ``token_lifetime_seconds`` may be sent as null to remove them; no other field may be null.
    """

    model_config = ConfigDict(json_schema_extra=_no_null_defaults)

    type: Literal["basic", "oauth2"] | Omissible = None
    grant_type: Literal["client_credentials", "password"] | Omissible = None
    username: Username | Omissible = None
    password: Secret | Omissible = None
    validation_url: EndpointURL | Omissible = None
    client_id: Identifier | Omissible = None
    client_secret: Secret | Omissible = None
    token_url: EndpointURL | Omissible = None
    scope: Scope | None = None
    client_auth_method: ClientAuthMethod | Omissible = None
    audience: Audience | None = None
    extra_token_params: ExtraTokenParams | Omissible = None
    token_lifetime_seconds: TokenLifetime | None = None

    _no_nulls = field_validator(
        "type",
        "grant_type",
        "username",
        "password",
        "validation_url",
        "client_id",
        "client_secret",
        "token_url",
        "client_auth_method",
        "extra_token_params",
        mode="before",
    )(_not_null)


class ConnectorPatch(_Strict):
    """Fields of the connector to change; omitted fields keep their values."""

    model_config = ConfigDict(json_schema_extra=_no_null_defaults)

    name: ConnectorName | Omissible = None
    resource_domain_url: BaseURL | Omissible = None
    auth: AuthPatch | None = None

    _no_nulls = field_validator("name", "resource_domain_url", mode="before")(_not_null)


# Read models ----------------------------------------------------------------------------------


class BasicAuthOut(BaseModel):
    type: Literal["basic"]
    username: str
    validation_url: str
    has_password: bool


class _OAuth2OutCommon(BaseModel):
    type: Literal["oauth2"]
    client_id: str
    token_url: str
    scope: str | None = None
    client_auth_method: ClientAuthMethod
    audience: str | None = None
    extra_token_params: ExtraTokenParams = Field(default_factory=dict)
    token_lifetime_seconds: int | None = None
    has_client_secret: bool


class OAuth2ClientCredentialsOut(_OAuth2OutCommon):
    grant_type: Literal["client_credentials"]


class OAuth2PasswordOut(_OAuth2OutCommon):
    grant_type: Literal["password"]
    username: str
    has_password: bool


OAuth2AuthOut = TypeAliasType(
    "OAuth2AuthOut",
    Annotated[OAuth2ClientCredentialsOut | OAuth2PasswordOut, Field(discriminator="grant_type")],
)
AuthOut = Annotated[BasicAuthOut | OAuth2AuthOut, Field(discriminator="type")]

StatusState = Literal["unverified", "authorized", "rejected", "unreachable"]


class ConnectorStatus(BaseModel):
    state: StatusState
    checked_at: datetime | None = None
    detail: str | None = None


class Connector(BaseModel):
    """A connector as read: secrets are never shown, only whether they are set."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "5b0c8f0e-2f7a-4c2e-9d1b-6a1f3c9e8d21",
                    "name": "Contact Center Connector",
                    "resource_domain_url": "https://api.example.com",
                    "auth": {
                        "type": "oauth2",
                        "grant_type": "client_credentials",
                        "client_id": "abc",
                        "token_url": "https://idp.example.com/oauth/token",
                        "scope": "read write",
                        "client_auth_method": "client_secret_basic",
                        "audience": None,
                        "extra_token_params": {},
                        "token_lifetime_seconds": None,
                        "has_client_secret": True,
                    },
                    "status": {"state": "authorized", "checked_at": "2026-11-24T10:00:00Z", "detail": None},
                    "version": 3,
                    "created_at": "2026-11-20T09:30:00Z",
                    "updated_at": "2026-11-24T09:59:58Z",
                }
            ]
        }
    )

    id: UUID
    name: str
    resource_domain_url: str
    auth: AuthOut
    status: ConnectorStatus
    version: int = Field(description="The configuration's version; the ETag is this number in quotes")
    created_at: datetime
    updated_at: datetime


class ConnectorList(BaseModel):
    items: list[Connector] = Field(description="Ordered by name")
    limit: int = Field(description="How many connectors the organization may have")


class AuthorizeRequest(_Strict):
    """What the headers are for; the body may be omitted (no path, no forced refresh)."""

    path: (
        Annotated[
            str,
            StringConstraints(max_length=2048),
            Field(
                description=(
                    "Path and query under the resource domain URL's base path, appended as sent. No "
                    "control, space, invisible character, backslash or `#`; refused with 422 "
                    "`path_outside_resource_domain` when it, or any form a server could decode or "
                    "normalise it to, leaves the base path (an absolute URL, `//host`, a dot segment, "
                    "`%2e`, `%2f`, ...)."
                ),
                examples=["/v1/customers?id=7"],
                json_schema_extra={"pattern": patterns.AUTHORIZE_PATH},
            ),
        ]
        | None
    ) = None
    # A JSON boolean only: pydantic would also read "yes", "1" or 1 as true.
    force_refresh: Annotated[
        bool,
        Field(
            strict=True,
            description=(
                "true after the resource refused the token given: that token is dropped and a new one "
                "fetched (a JSON boolean; omit it for false)"
            ),
        ),
    ] = False


class AuthorizeResponse(BaseModel):
    url: str = Field(description="The resource domain URL joined with the path")
    headers: dict[str, str] = Field(
        description="Headers to send with the request, `Authorization` among them"
    )
    resource_origin: str = Field(description="Send the headers only to this origin")
    expires_at: datetime | None = Field(description="When the token expires; null for Basic")


# How validation errors of these models name their fields (app.core.validation).
LOCATIONS = LocationRules(
    tags={
        "auth": {"basic", "oauth2"},
        "oauth2": {"client_credentials", "password"},
    },
    free_keys={"extra_token_params"},
)
