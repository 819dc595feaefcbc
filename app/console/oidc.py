"""Signing in to the console with OpenID Connect (authorization code with PKCE).

The operator's identity provider is ``CONNECTORS_CONSOLE_OIDC_ISSUER``, found by discovery
(``/.well-known/openid-configuration``, whose ``issuer`` must be that same URL); the console is
its client ``CONNECTORS_CONSOLE_OIDC_CLIENT_ID`` with ``..._CLIENT_SECRET`` (sent as HTTP Basic),
and its redirect URI is ``<CONNECTORS_PUBLIC_URL>/console/oidc/callback``.

A sign-in keeps its state, nonce and PKCE verifier in a cookie of its own, encrypted with the key
ring (so any replica can finish it) and good for 10 minutes. At the callback, the state must be the
cookie's; the code is exchanged with the verifier; the ID token's signature is checked with the
provider's JWKS, and its ``iss``, ``aud`` (the client id; ``azp`` too when there are several),
``exp`` (with ``CONNECTORS_JWT_LEEWAY_SECONDS``) and ``nonce``. The organization is the claim
``CONNECTORS_JWT_ORG_CLAIM``; ``connectors:write`` among its scopes (``scope`` or ``scp``, as for
caller tokens) lets the admin change things, ``connectors:read`` alone only see them, neither
nothing. Requests to the provider go through the outbound client (its deadline, size caps and
destination policy).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final
from urllib.parse import urlencode

import jwt

from app.core.auth.claims import SCOPE_READ, SCOPE_WRITE, _scopes, _valid_organization_id, _valid_subject
from app.core.clock import Clock
from app.core.config import Settings
from app.core.crypto import DecryptionError, KeyRing
from app.core.errors import AppError
from app.core.outbound import OutboundClient
from app.tokens.consent import Pkce, new_state
from app.tokens.oauth import client_basic_header

__all__ = ["COOKIE", "Identity", "OidcClient", "SignInRefused"]

COOKIE: Final = "connectors_console_login"
_AAD: Final = b"connectors console oidc login"
LOGIN_TTL: Final = 600
_ALGORITHMS: Final = ["RS256", "PS256", "ES256"]


_NOT_STARTED: Final = "This sign-in was not started here, or is more than 10 minutes old. Sign in again."
_UNREACHABLE: Final = "The identity provider could not be reached. Try again in a moment."
_UNVERIFIED: Final = "The identity provider's answer could not be verified."
_REFUSED: Final = "The identity provider refused the sign-in (check the console's client settings)."
_MISCONFIGURED: Final = "The identity provider's configuration is not usable (its issuer or endpoints)."
_ENDPOINTS: Final = ("authorization_endpoint", "token_endpoint", "jwks_uri")


class SignInRefused(Exception):
    """Why a sign-in did not happen, in words an admin understands (never a token or code)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    organization_id: str
    subject: str
    read_only: bool


class OidcClient:
    def __init__(self, settings: Settings, outbound: OutboundClient, keyring: KeyRing, clock: Clock) -> None:
        assert settings.console_oidc_issuer and settings.console_oidc_client_id
        self._issuer = settings.console_oidc_issuer.rstrip("/")
        self._client_id = settings.console_oidc_client_id
        secret = settings.console_oidc_client_secret
        self._client_secret = secret.get_secret_value() if secret is not None else ""
        self._org_claim = settings.jwt_org_claim
        self._leeway = settings.jwt_leeway_seconds
        self._redirect_uri = f"{settings.effective_public_url}/console/oidc/callback"
        self._outbound = outbound
        self._keyring = keyring
        self._clock = clock
        self._metadata: dict[str, Any] | None = None

    async def start(self) -> tuple[str, str]:
        """The provider's authorization URL, and the value of the sign-in's cookie."""
        metadata = await self._discover()
        state, nonce, pkce = new_state(), new_state(), Pkce.new()
        until = self._clock.now().timestamp() + LOGIN_TTL
        login = {"state": state, "nonce": nonce, "verifier": pkce.verifier, "until": until}
        cookie = self._keyring.encrypt(json.dumps(login), aad=_AAD)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self._client_id,
                "redirect_uri": self._redirect_uri,
                "scope": "openid",
                "state": state,
                "nonce": nonce,
                "code_challenge": pkce.challenge,
                "code_challenge_method": "S256",
            }
        )
        endpoint = str(metadata["authorization_endpoint"])
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", cookie

    async def finish(
        self, *, code: str | None, state: str | None, error: str | None, cookie: str | None
    ) -> Identity:
        login = self._login(cookie)
        if not state or state != login["state"]:
            raise SignInRefused(_NOT_STARTED)
        if error is not None:
            raise SignInRefused("The identity provider did not sign you in.")
        if not code:
            raise SignInRefused("The identity provider's answer was incomplete. Sign in again.")
        metadata = await self._discover()
        id_token = await self._exchange(metadata, code, login["verifier"])
        claims = await self._verify(metadata, id_token, login["nonce"])
        organization_id = claims.get(self._org_claim)
        subject = claims.get("sub")
        if not isinstance(organization_id, str) or not _valid_organization_id(organization_id):
            raise SignInRefused("Your account names no organization this service knows.")
        if not isinstance(subject, str) or not _valid_subject(subject):
            raise SignInRefused(_UNVERIFIED)
        try:
            scopes = _scopes(claims)
        except AppError:
            scopes = frozenset()
        if SCOPE_WRITE in scopes:
            return Identity(organization_id, subject, read_only=False)
        if SCOPE_READ in scopes:
            return Identity(organization_id, subject, read_only=True)
        raise SignInRefused("Your account may not use the connectors console.")

    def _login(self, cookie: str | None) -> dict[str, Any]:
        try:
            login = json.loads(self._keyring.decrypt(cookie or "", aad=_AAD))
        except (DecryptionError, ValueError):
            raise SignInRefused(_NOT_STARTED) from None
        if not isinstance(login, dict) or float(login.get("until", 0)) < self._clock.now().timestamp():
            raise SignInRefused(_NOT_STARTED)
        return login

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._outbound.request(
                "GET", url, headers={"Accept": "application/json"}, kind="token"
            )
            value = json.loads(response.content) if response.status_code == 200 else None
        except (AppError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise SignInRefused(_UNREACHABLE)
        return value

    async def _discover(self) -> dict[str, Any]:
        if self._metadata is None:
            metadata = await self._get_json(f"{self._issuer}/.well-known/openid-configuration")
            endpoints = [
                metadata.get(name) for name in ("authorization_endpoint", "token_endpoint", "jwks_uri")
            ]
            if metadata.get("issuer") != self._issuer or not all(
                isinstance(url, str) and url.startswith("https://") for url in endpoints
            ):
                raise SignInRefused(_MISCONFIGURED)
            self._metadata = metadata
        return self._metadata

    async def _exchange(self, metadata: dict[str, Any], code: str, verifier: str) -> str:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri,
            "code_verifier": verifier,
        }
        headers = {
            "Accept": "application/json",
            "Authorization": client_basic_header(self._client_id, self._client_secret),
        }
        try:
            response = await self._outbound.request(
                "POST", str(metadata["token_endpoint"]), headers=headers, data=form, kind="token"
            )
            body = json.loads(response.content)
        except (AppError, ValueError):
            raise SignInRefused(_UNREACHABLE) from None
        token = body.get("id_token") if isinstance(body, dict) and response.status_code == 200 else None
        if not isinstance(token, str):
            raise SignInRefused(_REFUSED)
        return token

    async def _verify(self, metadata: dict[str, Any], id_token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
            jwks = jwt.PyJWKSet.from_dict(await self._get_json(str(metadata["jwks_uri"])))
            key = next(
                (item for item in jwks.keys if header.get("kid") is None or item.key_id == header.get("kid")),
                None,
            )
            if key is None:
                raise SignInRefused("The identity provider's signature could not be checked.")
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=_ALGORITHMS,
                audience=self._client_id,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError):
            raise SignInRefused(_UNVERIFIED) from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self._client_id:
            raise SignInRefused(_UNVERIFIED)
        if claims.get("nonce") != nonce:
            raise SignInRefused(_UNVERIFIED)
        return claims
