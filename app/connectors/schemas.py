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
from typing_extensions import TypeAliasType

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


ConnectorName = Annotated[str, AfterValidator(_name), Field(examples=["Contact Center Connector"])]
BaseURL = Annotated[
    str,
    StringConstraints(max_length=2048),
    AfterValidator(_base_url),
    Field(examples=["https://api.example.com"], json_schema_extra={"pattern": "^https://", "format": "uri"}),
]
EndpointURL = Annotated[
    str,
    StringConstraints(max_length=2048),
    AfterValidator(_endpoint_url),
    Field(json_schema_extra={"pattern": "^https://", "format": "uri"}),
]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_no_control)]
Username = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_no_control)]
Scope = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_no_control)]
Secret = Annotated[
    SecretStr,
    AfterValidator(_secret),
    Field(json_schema_extra={"writeOnly": True, "minLength": 1, "maxLength": 1024}),
]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
TokenLifetime = Annotated[int, Field(ge=1, le=86_400 * 30)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class _OAuth2Common(_Strict):
    type: Literal["oauth2"]
    client_id: Identifier
    client_secret: Secret
    token_url: EndpointURL
    scope: Scope | None = None
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    audience: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    extra_token_params: dict[str, str] = Field(default_factory=dict, max_length=10)
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
                raise ValueError("a parameter name is reserved for the token request itself (in any case)")
            if folded in keys:
                raise ValueError("two parameter names differ only in case")
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
    username: Username
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


class AuthPatch(_Strict):
    """Fields of ``auth`` to change. Omitted secrets keep their stored values."""

    type: Literal["basic", "oauth2"] | None = None
    grant_type: Literal["client_credentials", "password"] | None = None
    username: Username | None = None
    password: Secret | None = None
    validation_url: EndpointURL | None = None
    client_id: Identifier | None = None
    client_secret: Secret | None = None
    token_url: EndpointURL | None = None
    scope: Scope | None = None
    client_auth_method: ClientAuthMethod | None = None
    audience: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    extra_token_params: dict[str, str] | None = None
    token_lifetime_seconds: TokenLifetime | None = None


class ConnectorPatch(_Strict):
    name: ConnectorName | None = None
    resource_domain_url: BaseURL | None = None
    auth: AuthPatch | None = None


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
    extra_token_params: dict[str, str] = Field(default_factory=dict)
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


class ConnectorOut(BaseModel):
    id: UUID
    name: str
    resource_domain_url: str
    auth: AuthOut
    status: ConnectorStatus
    version: int
    created_at: datetime
    updated_at: datetime


class ConnectorList(BaseModel):
    items: list[ConnectorOut]
    limit: int


class AuthorizeRequest(_Strict):
    path: Annotated[str, StringConstraints(max_length=2048)] | None = None
    # A JSON boolean only: pydantic would also read "yes", "1" or 1 as true.
    force_refresh: Annotated[bool, Field(strict=True)] = False


class AuthorizeResponse(BaseModel):
    url: str
    headers: dict[str, str]
    resource_origin: str
    expires_at: datetime | None


# How validation errors of these models name their fields (app.core.validation).
LOCATIONS = LocationRules(
    tags={
        "auth": {"basic", "oauth2"},
        "oauth2": {"client_credentials", "password"},
    },
    free_keys={"extra_token_params"},
)
