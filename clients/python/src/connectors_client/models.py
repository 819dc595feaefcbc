"""The service's wire shapes, as this client sends and reads them.

Inputs check only their shape here; the service applies the rules (URL forms, lengths, reserved
token parameters...) and answers a ``422 invalid_request`` naming the failing fields. Secrets are
given as ``str`` or ``SecretStr`` and kept as ``SecretStr``: printing a model or dumping it to
JSON shows ``**********``, and only the client reveals them, when it writes the request body. Read models
are frozen and ignore members they do not know, so a newer service does not break them.

``auth`` is a discriminated union: on ``type`` (``basic`` | ``oauth2``), then for OAuth 2.0 on
``grant_type`` (``client_credentials`` | ``password``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
StatusState = Literal["unverified", "authorized", "rejected", "unreachable"]
AuditAction = Literal["create", "update", "delete", "validate", "rotate_keys"]

if TYPE_CHECKING:
    # What a caller may pass; validation always stores a SecretStr.
    Secret = SecretStr | str
else:
    Secret = SecretStr


class _Input(BaseModel):
    # A misspelt field fails here, before anything is sent.
    model_config = ConfigDict(extra="forbid")


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# Inputs ----------------------------------------------------------------------------------------


class BasicAuthIn(_Input):
    """Basic authentication, checked by ``GET validation_url``."""

    type: Literal["basic"] = "basic"
    username: str
    password: Secret
    validation_url: str


class _OAuth2In(_Input):
    type: Literal["oauth2"] = "oauth2"
    client_id: str
    client_secret: Secret
    token_url: str
    scope: str | None = None
    client_auth_method: ClientAuthMethod | None = None
    audience: str | None = None
    extra_token_params: dict[str, str] | None = None
    token_lifetime_seconds: int | None = None


class OAuth2ClientCredentialsIn(_OAuth2In):
    """OAuth 2.0 client credentials grant (the default grant)."""

    grant_type: Literal["client_credentials"] = "client_credentials"


class OAuth2PasswordIn(_OAuth2In):
    """OAuth 2.0 resource-owner password grant."""

    grant_type: Literal["password"] = "password"
    username: str
    password: Secret


OAuth2AuthIn = Annotated[OAuth2ClientCredentialsIn | OAuth2PasswordIn, Field(discriminator="grant_type")]
AuthIn = Annotated[BasicAuthIn | OAuth2AuthIn, Field(discriminator="type")]


class ConnectorCreate(_Input):
    name: str
    resource_domain_url: str
    auth: AuthIn


class AuthPatch(_Input):
    """Fields of ``auth`` to change; an omitted secret keeps its stored value."""

    type: Literal["basic", "oauth2"] | None = None
    grant_type: Literal["client_credentials", "password"] | None = None
    username: str | None = None
    password: Secret | None = None
    validation_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    token_url: str | None = None
    scope: str | None = None
    client_auth_method: ClientAuthMethod | None = None
    audience: str | None = None
    extra_token_params: dict[str, str] | None = None
    token_lifetime_seconds: int | None = None


class ConnectorPatch(_Input):
    """A partial update: only the fields set are sent."""

    name: str | None = None
    resource_domain_url: str | None = None
    auth: AuthPatch | None = None


# Reads -----------------------------------------------------------------------------------------


class BasicAuthOut(_Read):
    type: Literal["basic"]
    username: str
    validation_url: str
    has_password: bool


class _OAuth2Out(_Read):
    type: Literal["oauth2"]
    client_id: str
    token_url: str
    scope: str | None = None
    client_auth_method: ClientAuthMethod
    audience: str | None = None
    extra_token_params: dict[str, str] = Field(default_factory=dict)
    token_lifetime_seconds: int | None = None
    has_client_secret: bool


class OAuth2ClientCredentialsOut(_OAuth2Out):
    grant_type: Literal["client_credentials"]


class OAuth2PasswordOut(_OAuth2Out):
    grant_type: Literal["password"]
    username: str
    has_password: bool


OAuth2AuthOut = Annotated[OAuth2ClientCredentialsOut | OAuth2PasswordOut, Field(discriminator="grant_type")]
AuthOut = Annotated[BasicAuthOut | OAuth2AuthOut, Field(discriminator="type")]


class ConnectorStatus(_Read):
    """Live state recorded by checks and token fetches; it changes without a new version."""

    state: StatusState
    checked_at: datetime | None = None
    detail: str | None = None


class Connector(_Read):
    id: UUID
    name: str
    resource_domain_url: str
    auth: AuthOut
    status: ConnectorStatus
    version: int
    created_at: datetime
    updated_at: datetime

    _etag: str | None = PrivateAttr(default=None)

    @property
    def etag(self) -> str:
        """The ``ETag`` to send as ``if_match``: the one the response carried, else the one the
        service gives this version (its number in quotes)."""
        return self._etag or f'"{self.version}"'


class ConnectorList(_Read):
    items: list[Connector]
    # The organization's maximum number of connectors.
    limit: int


class Authorization(_Read):
    """The headers for one outbound request, and where they may be sent."""

    url: str
    # Left out of repr: they carry the credentials.
    headers: dict[str, str] = Field(repr=False)
    resource_origin: str
    # None for Basic connectors, whose header does not expire.
    expires_at: datetime | None


class AuditEvent(_Read):
    """One recorded change, refused attempt or check of a connector; names fields, never values."""

    action: AuditAction
    actor: str | None = None
    changed_fields: list[str]
    outcome: str
    detail: str | None = None
    created_at: datetime


class AuditEventList(_Read):
    # Newest first.
    items: list[AuditEvent]


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The connector after ``validate``; the outcome is in ``connector.status``.

    ``retry_after`` is set when no check ran for this call (the version was checked less than
    the service's interval ago): the seconds until the next check may run.
    """

    connector: Connector
    retry_after: int | None


def wire(model: BaseModel, *, only_set: bool = False) -> dict[str, Any]:
    """The JSON body for ``model``, secrets revealed; ``only_set`` sends only the fields set."""
    data = model.model_dump(exclude_unset=only_set, exclude_none=not only_set)
    return {key: _reveal(value) for key, value in data.items()}


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    return value
