"""The connector's wire shapes.

``auth`` is a discriminated union on ``type``, built from the registered kinds
(``app.connectors.kinds``): a kind with variants (the OAuth 2.0 grants) adds a union on its
variant field, and OAuth 2.0 one on ``client_auth_method``. Secrets are ``SecretStr`` and
write-only: read models carry ``has_<name>`` instead. ``AuthPatch``, the fields a PATCH may send
in ``auth``, is every kind's input fields, each optional; the merged result is validated by the
kind's own model.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from typing_extensions import TypeAliasType

from app.connectors.fields import (
    CONTROL,
    Audience,
    EndpointURL,
    ExtraTokenParams,
    Identifier,
    Omissible,
    Scope,
    Secret,
    Strict,
    TokenLifetime,
    Username,
    no_null_defaults,
    not_null,
)
from app.connectors.kinds import KINDS, fill_defaults
from app.connectors.kinds.basic import BasicAuthIn, BasicAuthOut
from app.connectors.kinds.oauth2 import ClientAuthMethod
from app.core import patterns
from app.core.urls import URLRuleError, normalise_base_url
from app.core.validation import LocationRules

__all__ = [
    "LOCATIONS",
    "Audience",
    "AuthIn",
    "AuthOut",
    "AuthPatch",
    "AuthorizeRequest",
    "AuthorizeResponse",
    "BasicAuthIn",
    "BasicAuthOut",
    "ClientAuthMethod",
    "Connector",
    "ConnectorCreate",
    "ConnectorList",
    "ConnectorPatch",
    "ConnectorStatus",
    "EndpointURL",
    "ExtraTokenParams",
    "Identifier",
    "Scope",
    "Secret",
    "TokenLifetime",
    "Username",
    "name_key",
]


def _name(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 100:
        raise ValueError("must be 1-100 characters after trimming")
    # Control characters, and the invisible ones (format, line and paragraph separators, bidi
    # overrides) that make two names look alike or reorder what an admin reads.
    if CONTROL.search(value) or any(unicodedata.category(c) in ("Cc", "Cs", "Cf", "Zl", "Zp") for c in value):
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


# The document states each rule as a pattern (app.core.patterns); the validators decide.
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


# ``auth``, built from the registry ---------------------------------------------------------------


def _type_union(direction: str) -> Any:
    """One member per ``type``: the kind's model, or a named union over its variants."""
    members: list[Any] = []
    by_type: dict[str, list[Any]] = {}
    for kind in KINDS:
        model = kind.input_model if direction == "In" else kind.output_model
        by_type.setdefault(kind.auth_type, []).append(model)
    for auth_type, models in by_type.items():
        kind = next(kind for kind in KINDS if kind.auth_type == auth_type)
        if len(models) == 1:
            members.append(models[0])
        else:
            # A named alias makes the inner union a schema of its own, so the outer discriminator's
            # mapping can reference it (OpenAPI allows only references there).
            members.append(
                TypeAliasType(
                    f"{kind.schema_prefix}Auth{direction}",
                    Annotated[Union[tuple(models)], Field(discriminator=kind.variant_field)],  # noqa: UP007
                )
            )
    return Annotated[Union[tuple(members)], Field(discriminator="type")]  # noqa: UP007


AuthIn: Any = _type_union("In")
AuthOut: Any = _type_union("Out")


class ConnectorCreate(Strict):
    name: ConnectorName
    resource_domain_url: BaseURL
    auth: AuthIn

    @model_validator(mode="before")
    @classmethod
    def _tag_defaults(cls, value: Any) -> Any:
        # grant_type and client_auth_method may be omitted (client_credentials, client_secret_basic).
        if isinstance(value, dict) and "auth" in value:
            return {**value, "auth": fill_defaults(value["auth"])}
        return value


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models of a (possibly named, annotated, nested) union."""
    if isinstance(annotation, TypeAliasType):
        annotation = annotation.__value__
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for member in get_args(annotation):
        yield from _models(member)


def _literals(annotation: Any) -> list[Any]:
    if isinstance(annotation, TypeAliasType):
        annotation = annotation.__value__
    return list(get_args(annotation)) if get_origin(annotation) is Literal else []


def _shape(info: FieldInfo) -> FieldInfo:
    """The field as a kind takes a value: an optional field's type without ``None``."""
    args = get_args(info.annotation)
    if type(None) in args and len(args) == 2:
        return FieldInfo.from_annotation(next(arg for arg in args if arg is not type(None)))
    return info


def _patch_fields() -> dict[str, Any]:
    """Every kind's input fields, optional. A field that is optional in some kind may be sent as
    null (it removes the value); a field kinds define differently is checked by the kind only."""
    seen: dict[str, list[FieldInfo]] = {}
    for kind in KINDS:
        for model in _models(kind.input_model):
            for name, info in model.model_fields.items():
                seen.setdefault(info.alias or name, []).append(info)
    fields: dict[str, Any] = {}
    # The tags first (type, grant_type, client_auth_method), then fields in the kinds' order.
    ordered = sorted(seen.items(), key=lambda item: not any(_literals(info.annotation) for info in item[1]))
    for name, infos in ordered:
        tags = [value for info in infos for value in _literals(info.annotation)]
        nullable = any(not info.is_required() and info.default is None for info in infos)
        shapes = [_shape(info) for info in infos]
        first = shapes[0]
        same = all(
            (info.annotation, repr(info.metadata), info.json_schema_extra)
            == (first.annotation, repr(first.metadata), first.json_schema_extra)
            for info in shapes
        )
        if name == "client_auth_method":
            inner: Any = ClientAuthMethod
        elif tags:
            inner = Literal.__getitem__(tuple(dict.fromkeys(tags)))
        elif same:
            inner = Annotated[
                first.annotation,
                *first.metadata,
                Field(description=first.description, json_schema_extra=first.json_schema_extra),
            ]
        else:
            inner = first.annotation
        annotation = inner | None if nullable else inner | Omissible
        alias = infos[0].alias
        fields[name.replace("-", "_") if alias is None else f"{alias}_"] = (
            annotation,
            Field(default=None, alias=alias),
        )
    return fields


_PATCH_FIELDS = _patch_fields()


AuthPatch: type[BaseModel] = create_model(
    "AuthPatch",
    __base__=Strict,
    __doc__=(
        "Fields of `auth` to change. Omitted secrets keep their stored values.\n\n"
        "The fields must fit the connector's kind once merged with what is stored; a change of `type` or "
        "`grant_type` needs the whole new `auth` object, and a change of `client_auth_method` the new "
        "method's secrets. Fields that are optional in the connector's kind may be sent as null to remove "
        "them; no other field may be null."
    ),
    __validators__={
        "_no_nulls": field_validator(
            *[
                name
                for name, (annotation, _) in _PATCH_FIELDS.items()
                if type(None) not in get_args(annotation) or Omissible in get_args(annotation)
            ],
            mode="before",
        )(not_null)
    },
    **_PATCH_FIELDS,
)
AuthPatch.model_config["json_schema_extra"] = no_null_defaults
AuthPatch.model_rebuild(force=True)


class ConnectorPatch(Strict):
    """Fields of the connector to change; omitted fields keep their values."""

    model_config = ConfigDict(json_schema_extra=no_null_defaults)

    name: ConnectorName | Omissible = None
    resource_domain_url: BaseURL | Omissible = None
    auth: AuthPatch | None = None

    _no_nulls = field_validator("name", "resource_domain_url", mode="before")(not_null)


# Read models ----------------------------------------------------------------------------------

StatusState = Literal["unverified", "authorized", "rejected", "unreachable", "consent_required"]


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


class AuthorizeRequest(Strict):
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
    url: str = Field(
        description=(
            "The resource domain URL joined with the path; for an API key sent as a query parameter, "
            "with the key added"
        )
    )
    headers: dict[str, str] = Field(
        description="Headers to send with the request (none for an API key sent in the query)"
    )
    resource_origin: str = Field(description="Send the headers only to this origin")
    expires_at: datetime | None = Field(description="When the token expires; null for Basic and API keys")


def _location_tags() -> dict[str, set[str]]:
    tags: dict[str, set[str]] = {"auth": {kind.auth_type for kind in KINDS}}
    for kind in KINDS:
        if kind.variant is not None:
            tags.setdefault(kind.auth_type, set()).add(kind.variant)
        for key, values in kind.location_tags().items():
            tags.setdefault(key, set()).update(values)
    return tags


# How validation errors of these models name their fields (app.core.validation).
LOCATIONS = LocationRules(tags=_location_tags(), free_keys={"extra_token_params"})


# Consent ---------------------------------------------------------------------------------------


def _return_url(value: str) -> str:
    # Visible ASCII only: it becomes a Location header (a URL with other characters is sent
    # percent-encoded, as a browser would send it).
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("must be visible ASCII (percent-encode other characters)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ValueError("must be an absolute http(s) URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment or parts.username:
        raise ValueError("must be an absolute http(s) URL without credentials or fragment")
    return value


class ConsentStartRequest(Strict):
    return_url: (
        Annotated[
            str,
            StringConstraints(max_length=2048),
            AfterValidator(_return_url),
            Field(
                description=(
                    "Where the browser goes once the consent ended, with `connector_id` and `result` "
                    "(`connected`, or `error` and `error`) added to its query. Its origin must be the "
                    "service's own or one of `CONNECTORS_CONSENT_RETURN_ORIGINS`. Without it, the "
                    "callback answers a page saying how it ended."
                ),
                json_schema_extra={"format": "uri"},
            ),
        ]
        | Omissible
    ) = None

    _no_nulls = field_validator("return_url", mode="before")(not_null)


class ConsentStart(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "authorization_url": (
                        "https://idp.example.com/oauth/authorize?response_type=code&client_id=abc"
                        "&redirect_uri=https%3A%2F%2Fconnectors.example.com%2Foauth%2Fcallback"
                        "&scope=calendar.read&state=...&code_challenge=...&code_challenge_method=S256"
                    ),
                    "expires_at": "2026-12-07T10:10:00Z",
                }
            ]
        }
    )

    authorization_url: str = Field(description="The provider's consent page, for the admin's browser")
    expires_at: datetime = Field(description="The consent must be finished before this")
