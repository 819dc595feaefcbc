"""What the token layer is given and what it hands back.

The token layer knows nothing of connectors or storage: it receives a credential configuration
with the secrets already decrypted (as ``SecretStr``) and returns headers or tokens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import SecretStr

if TYPE_CHECKING:
    from app.core.outbound import ClientCertificate

GrantType = Literal["client_credentials", "password", "authorization_code"]
# What a token request tells of a connector: ``consent_required`` is an authorization code
# connector whose grant is gone (refused, or never given): only an admin's consent mends it.
CheckState = Literal["authorized", "rejected", "unreachable", "consent_required"]


@dataclass(frozen=True, slots=True)
class BasicConfig:
    username: str
    password: SecretStr
    validation_url: str


@dataclass(frozen=True, slots=True)
class StaticCredential:
    """A credential sent as it is with every request: header values and query parameters.

    Basic and API-key connectors hand it out from memory; its values are secrets.
    """

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    query: Sequence[tuple[str, str]] = field(default=(), repr=False)


class ClientAuth(Protocol):
    """How a token request authenticates the client (RFC 6749 §2.3, RFC 7523, RFC 8705).

    One implementation per method (``app.connectors.kinds.client_auth``), holding the material
    it needs, already decrypted. ``apply`` adds what the method sends to the form and headers
    of one request; ``certificate`` is the TLS client certificate the connection presents.
    """

    @property
    def method(self) -> str: ...

    @property
    def certificate(self) -> ClientCertificate | None: ...

    def apply(
        self,
        *,
        client_id: str,
        token_url: str,
        form: MutableMapping[str, str],
        headers: MutableMapping[str, str],
    ) -> None: ...


# Sends one refresh request with the given refresh token (``TokenFetcher`` with ``refresh_token``).
RefreshSender = Callable[[str], Awaitable["TokenGrant"]]


class StoredGrant(Protocol):
    """The grant an admin gave by consent (authorization code connectors), kept by its owner.

    ``renew`` runs a refresh with the stored refresh token through ``send`` and keeps what the
    answer brings (a rotated refresh token), so that no two renewals anywhere send the same
    refresh token. It returns the grant without its refresh token, which the token cache must
    not hold: the owner's copy is the only one. It raises ``ConsentRequired`` when there is no
    grant, or the provider refused it.
    """

    async def renew(self, send: RefreshSender) -> TokenGrant: ...


@dataclass(frozen=True, slots=True)
class OAuth2Config:
    grant_type: GrantType
    token_url: str
    client_id: str
    client_auth: ClientAuth
    scope: str | None = None
    audience: str | None = None
    extra_token_params: Mapping[str, str] = field(default_factory=dict)
    # Lifetime assumed when a token response has no expires_in; None means the service default.
    token_lifetime_seconds: int | None = None
    # Password grant only.
    username: str | None = None
    password: SecretStr | None = None
    # Authorization code grant only: renewals go through the stored grant.
    grant: StoredGrant | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CodeExchange:
    """The authorization code grant's own fields of a token request (RFC 6749 §4.1.3, RFC 7636)."""

    code: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A successful token response, checked and normalised; its printed form shows no token."""

    access_token: str = field(repr=False)
    expires_in: float
    refresh_token: str | None = field(default=None, repr=False)
    # The scope the provider says it granted, when it says (RFC 6749 §5.1).
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """What a caller of the cache receives: a token valid at least until ``expires_at``; its
    printed form shows no token."""

    access_token: str = field(repr=False)
    expires_at: datetime


class RefreshTokenRejected(Exception):
    """The provider refused a refresh token (``invalid_grant``); the original grant must run again.

    Never reaches an HTTP caller: the token cache handles it.
    """


class TokenFetcher(Protocol):
    """Runs one token request (the configured grant, or the refresh grant when given a token).

    Raises ``CredentialsRejected``, ``TokenEndpointError``, ``TokenEndpointTimeout``,
    ``UpstreamUnreachable`` or ``DestinationNotAllowed`` from ``app.core.errors``, and
    ``RefreshTokenRejected`` when a refresh token is refused.
    """

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant: ...


# Loads the configuration (decrypting secrets) only when a token request is needed.
ConfigLoader = Callable[[], Awaitable[OAuth2Config]]


class OutcomeListener(Protocol):
    """Told the result of every token request the cache makes, so the owner can record status."""

    async def __call__(self, key: Hashable, state: CheckState, detail: str | None) -> None: ...
