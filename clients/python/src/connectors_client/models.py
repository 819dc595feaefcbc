"""The service's wire shapes, as this client sends and reads them.

Inputs check only their shape here; the service applies the rules (URL forms, lengths, PEM
contents, reserved header names...) and answers a ``422 invalid_request`` naming the failing
fields. Secrets (passwords, client secrets, API keys, private keys in PEM) are given as ``str`` or
``SecretStr`` and kept as ``SecretStr``: printing a model or dumping it to JSON shows
``**********``, and only the client reveals them, when it writes the request body. Reads never
carry a secret, only ``has_<name>: true``. Read models are frozen and ignore members they do not
know, so a newer service does not break them.

``auth`` is a discriminated union on ``type``:

* ``basic``: ``BasicAuthIn`` / ``BasicAuthOut``.
* ``api_key``: ``ApiKeyAuthIn`` / ``ApiKeyAuthOut``; the key goes in a header or, with
  ``in_="query"`` (``"in": "query"`` on the wire), in a query parameter.
* ``oauth2``: then on ``grant_type`` (``client_credentials``, the default, | ``password`` |
  ``authorization_code``), then on ``client_auth_method``, one model per group of methods
  taking the same fields:

  ==========================================  ================================================
  ``client_auth_method``                      models (``...In`` / ``...Out``)
  ==========================================  ================================================
  ``client_secret_basic`` (the default),      ``OAuth2ClientCredentials``, ``OAuth2Password``,
  ``client_secret_post``                      ``OAuth2AuthorizationCode``
  ``private_key_jwt``                         ``OAuth2ClientCredentialsPrivateKeyJWT``,
                                              ``OAuth2PasswordPrivateKeyJWT``,
                                              ``OAuth2AuthorizationCodePrivateKeyJWT``
  ``tls_client_auth``                         ``OAuth2ClientCredentialsTlsClientAuth``,
                                              ``OAuth2PasswordTlsClientAuth``,
                                              ``OAuth2AuthorizationCodeTlsClientAuth``
  ==========================================  ================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, SecretStr, Tag

ClientSecretMethod = Literal["client_secret_basic", "client_secret_post"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"]
SigningAlg = Literal["RS256", "PS256", "ES256"]
ApiKeyLocation = Literal["header", "query"]
StatusState = Literal["unverified", "authorized", "rejected", "unreachable", "consent_required"]
AuditAction = Literal["create", "update", "delete", "validate", "rotate_keys", "consent", "connect", "status"]
GrantType = Literal["client_credentials", "password", "authorization_code"]

if TYPE_CHECKING:
    # What a caller may pass; validation always stores a SecretStr.
    Secret = SecretStr | str
else:
    Secret = SecretStr


class _Input(BaseModel):
    # A misspelt field fails here, before anything is sent, and the error shows no input (the
    # secrets are among them). ``in`` is a Python keyword: its field is ``in_``, which may be set
    # by either name.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, hide_input_in_errors=True)


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


def _tags(field: str, default: str, groups: dict[str, str]) -> Discriminator:
    """A discriminator on ``field`` (of a dict or a model) that also reads an omitted or null
    value as ``default``, as the service does, and maps each value to its group's tag."""

    def tag(value: Any) -> str | None:
        chosen = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        chosen = default if chosen is None else chosen
        return groups.get(chosen) if isinstance(chosen, str) else None

    return Discriminator(
        tag,
        custom_error_type="invalid_tag",
        custom_error_message=f"{field} must be one of: {', '.join(groups)}",
    )


# Inputs ----------------------------------------------------------------------------------------


class BasicAuthIn(_Input):
    """Basic authentication, checked by ``GET validation_url``."""

    type: Literal["basic"] = "basic"
    username: str
    password: Secret
    validation_url: str


class ApiKeyAuthIn(_Input):
    """An API key sent as a request header (``in_="header"``, the default) named ``name``, with
    an optional ``prefix`` (``"Bearer"`` sends ``Bearer <key>``), or as the query parameter
    ``name`` (``in_="query"``, no prefix). Checked by ``GET validation_url`` when there is one;
    without it the connector stays ``unverified``."""

    type: Literal["api_key"] = "api_key"
    key: Secret
    in_: ApiKeyLocation = Field(default="header", alias="in")
    name: str
    prefix: str | None = None
    validation_url: str | None = None


class _OAuth2In(_Input):
    type: Literal["oauth2"] = "oauth2"
    client_id: str
    token_url: str
    scope: str | None = None
    audience: str | None = None
    extra_token_params: dict[str, str] | None = None
    token_lifetime_seconds: int | None = None


class _ClientSecretIn(_OAuth2In):
    client_secret: Secret
    # None: the service's default, client_secret_basic.
    client_auth_method: ClientSecretMethod | None = None


class _PrivateKeyJWTIn(_OAuth2In):
    """The client signs a fresh JWT with ``private_key`` for each token request (RFC 7523); the
    provider checks it with the public key, which reads show as ``public_jwk``."""

    client_auth_method: Literal["private_key_jwt"] = "private_key_jwt"
    # An unencrypted PEM private key: RSA of 2048-4096 bits (RS256, PS256) or EC P-256 (ES256).
    private_key: Secret
    private_key_id: str | None = None
    signing_alg: SigningAlg = "RS256"
    # The assertion's ``aud`` when the provider wants another value than the token URL.
    assertion_audience: str | None = None


class _TlsClientAuthIn(_OAuth2In):
    """The connection to the token endpoint presents ``tls_certificate`` (the client's
    certificate, then any intermediates, in PEM) with ``tls_private_key`` (RFC 8705)."""

    client_auth_method: Literal["tls_client_auth"] = "tls_client_auth"
    tls_certificate: str
    tls_private_key: Secret


class _ClientCredentialsGrantIn(_Input):
    grant_type: Literal["client_credentials"] = "client_credentials"


class _PasswordGrantIn(_Input):
    grant_type: Literal["password"] = "password"
    username: str
    password: Secret


class _AuthorizationCodeGrantIn(_Input):
    """An admin connects the account at the provider (``Client.consent``); the connector starts
    ``consent_required``."""

    grant_type: Literal["authorization_code"] = "authorization_code"
    authorization_url: str
    extra_authorization_params: dict[str, str] | None = None
    issuer: str | None = None


class OAuth2ClientCredentialsIn(_ClientCredentialsGrantIn, _ClientSecretIn):
    """OAuth 2.0 client credentials grant (the default grant), the client authenticated with its
    ``client_secret`` (``client_secret_basic``, the default, or ``client_secret_post``)."""


class OAuth2ClientCredentialsPrivateKeyJWTIn(_ClientCredentialsGrantIn, _PrivateKeyJWTIn):
    """OAuth 2.0 client credentials grant, the client authenticated with ``private_key_jwt``."""


class OAuth2ClientCredentialsTlsClientAuthIn(_ClientCredentialsGrantIn, _TlsClientAuthIn):
    """OAuth 2.0 client credentials grant, the client authenticated with ``tls_client_auth``."""


class OAuth2PasswordIn(_PasswordGrantIn, _ClientSecretIn):
    """OAuth 2.0 resource-owner password grant, the client authenticated with its
    ``client_secret`` (``client_secret_basic``, the default, or ``client_secret_post``)."""


class OAuth2PasswordPrivateKeyJWTIn(_PasswordGrantIn, _PrivateKeyJWTIn):
    """OAuth 2.0 resource-owner password grant, the client authenticated with ``private_key_jwt``."""


class OAuth2PasswordTlsClientAuthIn(_PasswordGrantIn, _TlsClientAuthIn):
    """OAuth 2.0 resource-owner password grant, the client authenticated with ``tls_client_auth``."""


class OAuth2AuthorizationCodeIn(_AuthorizationCodeGrantIn, _ClientSecretIn):
    """OAuth 2.0 authorization code grant, the client authenticated with its ``client_secret``."""


class OAuth2AuthorizationCodePrivateKeyJWTIn(_AuthorizationCodeGrantIn, _PrivateKeyJWTIn):
    """OAuth 2.0 authorization code grant, the client authenticated with ``private_key_jwt``."""


class OAuth2AuthorizationCodeTlsClientAuthIn(_AuthorizationCodeGrantIn, _TlsClientAuthIn):
    """OAuth 2.0 authorization code grant, the client authenticated with ``tls_client_auth``."""


# The tag of each ``client_auth_method``: the methods that take the same fields share a model.
_METHOD_GROUPS = {
    "client_secret_basic": "client_secret",
    "client_secret_post": "client_secret",
    "private_key_jwt": "private_key_jwt",
    "tls_client_auth": "tls_client_auth",
}
_input_method = _tags("client_auth_method", "client_secret_basic", _METHOD_GROUPS)

OAuth2ClientCredentialsAuthIn = Annotated[
    Annotated[OAuth2ClientCredentialsIn, Tag("client_secret")]
    | Annotated[OAuth2ClientCredentialsPrivateKeyJWTIn, Tag("private_key_jwt")]
    | Annotated[OAuth2ClientCredentialsTlsClientAuthIn, Tag("tls_client_auth")],
    _input_method,
]
OAuth2PasswordAuthIn = Annotated[
    Annotated[OAuth2PasswordIn, Tag("client_secret")]
    | Annotated[OAuth2PasswordPrivateKeyJWTIn, Tag("private_key_jwt")]
    | Annotated[OAuth2PasswordTlsClientAuthIn, Tag("tls_client_auth")],
    _input_method,
]
OAuth2AuthorizationCodeAuthIn = Annotated[
    Annotated[OAuth2AuthorizationCodeIn, Tag("client_secret")]
    | Annotated[OAuth2AuthorizationCodePrivateKeyJWTIn, Tag("private_key_jwt")]
    | Annotated[OAuth2AuthorizationCodeTlsClientAuthIn, Tag("tls_client_auth")],
    _input_method,
]
_GRANTS = ("client_credentials", "password", "authorization_code")
OAuth2AuthIn = Annotated[
    Annotated[OAuth2ClientCredentialsAuthIn, Tag("client_credentials")]
    | Annotated[OAuth2PasswordAuthIn, Tag("password")]
    | Annotated[OAuth2AuthorizationCodeAuthIn, Tag("authorization_code")],
    _tags("grant_type", "client_credentials", {grant: grant for grant in _GRANTS}),
]
AuthIn = Annotated[BasicAuthIn | ApiKeyAuthIn | OAuth2AuthIn, Field(discriminator="type")]


class ConnectorCreate(_Input):
    name: str
    resource_domain_url: str
    auth: AuthIn


class AuthPatch(_Input):
    """Fields of ``auth`` to change; an omitted secret keeps its stored value.

    Only the fields set are sent; a field set to ``None`` is sent as null, which removes an
    optional value (``scope``, ``prefix``, ``private_key_id``...). The fields must fit the
    connector's kind once merged with what is stored: a change of ``type`` or ``grant_type``
    needs the whole new ``auth``, and a change of ``client_auth_method`` the new method's secrets.
    """

    type: Literal["basic", "oauth2", "api_key"] | None = None
    grant_type: GrantType | None = None
    client_auth_method: ClientAuthMethod | None = None
    username: str | None = None
    password: Secret | None = None
    validation_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    token_url: str | None = None
    scope: str | None = None
    audience: str | None = None
    extra_token_params: dict[str, str] | None = None
    token_lifetime_seconds: int | None = None
    authorization_url: str | None = None
    extra_authorization_params: dict[str, str] | None = None
    issuer: str | None = None
    private_key: Secret | None = None
    private_key_id: str | None = None
    signing_alg: SigningAlg | None = None
    assertion_audience: str | None = None
    tls_certificate: str | None = None
    tls_private_key: Secret | None = None
    key: Secret | None = None
    in_: ApiKeyLocation | None = Field(default=None, alias="in")
    name: str | None = None
    prefix: str | None = None


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


class ApiKeyAuthOut(_Read):
    type: Literal["api_key"]
    # ``in`` on the wire.
    in_: ApiKeyLocation = Field(alias="in")
    name: str
    prefix: str | None = None
    validation_url: str | None = None
    has_key: bool


class _OAuth2Out(_Read):
    type: Literal["oauth2"]
    client_id: str
    token_url: str
    scope: str | None = None
    audience: str | None = None
    extra_token_params: dict[str, str] = Field(default_factory=dict)
    token_lifetime_seconds: int | None = None


class _ClientSecretOut(_OAuth2Out):
    client_auth_method: ClientSecretMethod
    has_client_secret: bool


class _PrivateKeyJWTOut(_OAuth2Out):
    client_auth_method: Literal["private_key_jwt"]
    has_private_key: bool
    # The public key as a JWK (RFC 7517), to register at the provider: public members only.
    public_jwk: dict[str, str]
    private_key_id: str | None = None
    signing_alg: SigningAlg
    assertion_audience: str | None = None


class _TlsClientAuthOut(_OAuth2Out):
    client_auth_method: Literal["tls_client_auth"]
    # The certificate chain in PEM, leaf first, as the service stores it.
    tls_certificate: str
    has_tls_private_key: bool
    # The leaf's subject (RFC 4514) and the end of its validity.
    tls_certificate_subject: str
    tls_certificate_expires_at: datetime


class _ClientCredentialsGrantOut(_Read):
    grant_type: Literal["client_credentials"]


class _PasswordGrantOut(_Read):
    grant_type: Literal["password"]
    username: str
    has_password: bool


class _AuthorizationCodeGrantOut(_Read):
    grant_type: Literal["authorization_code"]
    authorization_url: str
    extra_authorization_params: dict[str, str] = Field(default_factory=dict)
    issuer: str | None = None
    # The redirect URI to register at the provider: the service's callback.
    redirect_uri: str
    # What the service holds of the grant an admin gave; never a token.
    has_refresh_token: bool
    connected_at: datetime | None = None
    granted_scope: str | None = None


class OAuth2ClientCredentialsOut(_ClientCredentialsGrantOut, _ClientSecretOut):
    pass


class OAuth2ClientCredentialsPrivateKeyJWTOut(_ClientCredentialsGrantOut, _PrivateKeyJWTOut):
    pass


class OAuth2ClientCredentialsTlsClientAuthOut(_ClientCredentialsGrantOut, _TlsClientAuthOut):
    pass


class OAuth2PasswordOut(_PasswordGrantOut, _ClientSecretOut):
    pass


class OAuth2PasswordPrivateKeyJWTOut(_PasswordGrantOut, _PrivateKeyJWTOut):
    pass


class OAuth2PasswordTlsClientAuthOut(_PasswordGrantOut, _TlsClientAuthOut):
    pass


class OAuth2AuthorizationCodeOut(_AuthorizationCodeGrantOut, _ClientSecretOut):
    pass


class OAuth2AuthorizationCodePrivateKeyJWTOut(_AuthorizationCodeGrantOut, _PrivateKeyJWTOut):
    pass


class OAuth2AuthorizationCodeTlsClientAuthOut(_AuthorizationCodeGrantOut, _TlsClientAuthOut):
    pass


OAuth2ClientCredentialsAuthOut = Annotated[
    OAuth2ClientCredentialsOut
    | OAuth2ClientCredentialsPrivateKeyJWTOut
    | OAuth2ClientCredentialsTlsClientAuthOut,
    Field(discriminator="client_auth_method"),
]
OAuth2PasswordAuthOut = Annotated[
    OAuth2PasswordOut | OAuth2PasswordPrivateKeyJWTOut | OAuth2PasswordTlsClientAuthOut,
    Field(discriminator="client_auth_method"),
]
OAuth2AuthorizationCodeAuthOut = Annotated[
    OAuth2AuthorizationCodeOut
    | OAuth2AuthorizationCodePrivateKeyJWTOut
    | OAuth2AuthorizationCodeTlsClientAuthOut,
    Field(discriminator="client_auth_method"),
]
OAuth2AuthOut = Annotated[
    OAuth2ClientCredentialsAuthOut | OAuth2PasswordAuthOut | OAuth2AuthorizationCodeAuthOut,
    Field(discriminator="grant_type"),
]
AuthOut = Annotated[BasicAuthOut | ApiKeyAuthOut | OAuth2AuthOut, Field(discriminator="type")]


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
    """The URL and headers for one outbound request, and where they may be sent.

    The credentials are in ``headers``, except for an API key sent as a query parameter: the
    service has added it to ``url`` already (replacing a parameter of that name in the path
    asked for), so the request goes to ``url`` as it is.
    """

    # Left out of repr, as the headers are: they may carry the credentials.
    url: str = Field(repr=False)
    headers: dict[str, str] = Field(repr=False)
    resource_origin: str
    # None for Basic and API-key connectors, whose credentials do not expire.
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


class ConsentStart(_Read):
    """Open ``authorization_url`` in the admin's browser before ``expires_at``; the provider
    sends it back to the service, which keeps the grant (``Client.consent``)."""

    # Left out of repr: it holds the consent's state, which finishes the consent.
    authorization_url: str = Field(repr=False)
    expires_at: datetime


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
    data = model.model_dump(by_alias=True, exclude_unset=only_set, exclude_none=not only_set)
    return {key: _reveal(value) for key, value in data.items()}


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    return value
