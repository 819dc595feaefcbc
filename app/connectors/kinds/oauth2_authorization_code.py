"""OAuth 2.0 authorization code grant (RFC 6749 §4.1) with PKCE (RFC 7636): an admin connects
an account at the provider's consent page, and the service keeps the grant's refresh token.

A connector of this kind starts ``consent_required``: a create calls nothing out, since there is
no grant to check until an admin consents (``POST /connectors/{id}/consent``, then the provider
sends the browser to ``GET /oauth/callback``). The grant itself (refresh token, granted scope,
when it was given) is not part of the configuration: the service keeps it beside the connector
(``app.connectors.grants``), and reads show what it is, never a token. A change of what the grant
was given to (``CONSENT_FIELDS``, or the client authentication) drops it: the admin consents
again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, Field, field_validator

from app.connectors.fields import ExtraAuthorizationParams, Strict, check_authorization_params
from app.connectors.kinds.base import Public
from app.connectors.kinds.example import BodyExample
from app.connectors.kinds.oauth2 import OAuth2Kind, build_models
from app.core.fields import EndpointURL
from app.tokens.consent import RESERVED_AUTHORIZATION_PARAMS
from app.tokens.oauth import token_param_key

# Public fields whose change makes a grant given before worthless.
CONSENT_FIELDS = ("client_id", "authorization_url", "token_url", "scope", "issuer", "client_auth_method")


def _no_reserved_query(url: str) -> str:
    for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if token_param_key(name) in RESERVED_AUTHORIZATION_PARAMS:
            raise ValueError("the query may not set a parameter the authorization request sets itself")
    return url


class _GrantIn(Strict):
    grant_type: Literal["authorization_code"]
    authorization_url: EndpointURL = Field(
        description="The provider's authorization endpoint, where an admin signs in and consents"
    )
    extra_authorization_params: ExtraAuthorizationParams = Field(default_factory=dict, max_length=10)
    issuer: EndpointURL | None = Field(
        default=None,
        description=(
            "The authorization server's issuer identifier: when set, a callback whose `iss` (RFC 9207)"
            " differs is refused; when not, an `iss` must be of the authorization URL's origin"
        ),
    )

    _check_url = field_validator("authorization_url")(_no_reserved_query)
    _check_params = field_validator("extra_authorization_params")(check_authorization_params)


class _GrantOut(BaseModel):
    grant_type: Literal["authorization_code"]
    authorization_url: str
    extra_authorization_params: ExtraAuthorizationParams = Field(default_factory=dict)
    issuer: str | None = None
    redirect_uri: str = Field(
        description="The redirect URI to register at the provider: the service's callback"
    )
    has_refresh_token: bool = Field(description="Whether the service holds a refresh token of the grant")
    connected_at: datetime | None = Field(description="When an admin last connected the account")
    granted_scope: str | None = Field(description="The scope the provider granted, when it said")


_INPUT, _OUTPUT = build_models(
    "AuthorizationCode",
    _GrantIn,
    _GrantOut,
    "OAuth 2.0 authorization code grant, connected by an admin's consent",
)


class AuthorizationCodeKind(OAuth2Kind):
    variant = "authorization_code"
    guarded_urls = ("token_url", "authorization_url")
    needs_consent = True
    example = BodyExample(
        "oauth2AuthorizationCode",
        "OAuth 2.0, authorization code grant (an admin connects the account)",
        {
            "name": "Calendar",
            "resource_domain_url": "https://calendar.example.com/api",
            "auth": {
                "type": "oauth2",
                "grant_type": "authorization_code",
                "client_id": "abc",
                "client_secret": "s3cret",
                "authorization_url": "https://idp.example.com/oauth/authorize",
                "token_url": "https://idp.example.com/oauth/token",
                "scope": "calendar.read offline_access",
                "extra_authorization_params": {"prompt": "consent"},
            },
        },
    )
    input_model = _INPUT
    output_model = _OUTPUT

    def checkable(self, public: Public) -> bool:
        # Nothing to check before an admin consents; the consent itself is the check.
        return False


KIND = AuthorizationCodeKind()
