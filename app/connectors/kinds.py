"""The registry of credential kinds.

Each kind says which input and read model it uses, which of its fields are secret, which URL it
calls, and how to turn stored fields into the token layer's configuration. Everything else in the
feature looks a kind up here instead of branching on ``type``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from app.connectors import schemas
from app.tokens.types import BasicConfig, OAuth2Config

TokenConfig = BasicConfig | OAuth2Config


@dataclass(frozen=True, slots=True)
class Kind:
    auth_type: str
    grant_type: str | None
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    secret_fields: tuple[str, ...]
    # URL fields that, when changed, require the secrets to be sent again.
    guarded_urls: tuple[str, ...]
    build_config: Callable[[Mapping[str, Any], Mapping[str, SecretStr]], TokenConfig]

    def split(self, auth: BaseModel) -> tuple[dict[str, Any], dict[str, SecretStr]]:
        """Separate an input model into its public fields and its secrets."""
        public = auth.model_dump(exclude={"type", "grant_type", *self.secret_fields})
        secrets: dict[str, SecretStr] = {name: getattr(auth, name) for name in self.secret_fields}
        return public, secrets

    def read_model(self, public: Mapping[str, Any], stored_secrets: Mapping[str, object]) -> BaseModel:
        flags = {f"has_{name}": name in stored_secrets for name in self.secret_fields}
        extra = {"grant_type": self.grant_type} if self.grant_type else {}
        return self.output_model(type=self.auth_type, **extra, **public, **flags)


def _basic(public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> TokenConfig:
    return BasicConfig(
        username=public["username"], password=secrets["password"], validation_url=public["validation_url"]
    )


def _oauth2(public: Mapping[str, Any], secrets: Mapping[str, SecretStr], grant_type: str) -> OAuth2Config:
    return OAuth2Config(
        grant_type="password" if grant_type == "password" else "client_credentials",
        token_url=public["token_url"],
        client_id=public["client_id"],
        client_secret=secrets["client_secret"],
        scope=public.get("scope"),
        client_auth_method=public.get("client_auth_method", "client_secret_basic"),
        audience=public.get("audience"),
        extra_token_params=dict(public.get("extra_token_params") or {}),
        token_lifetime_seconds=public.get("token_lifetime_seconds"),
        username=public.get("username"),
        password=secrets.get("password"),
    )


KINDS: dict[tuple[str, str | None], Kind] = {
    ("basic", None): Kind(
        auth_type="basic",
        grant_type=None,
        input_model=schemas.BasicAuthIn,
        output_model=schemas.BasicAuthOut,
        secret_fields=("password",),
        guarded_urls=("validation_url",),
        build_config=_basic,
    ),
    ("oauth2", "client_credentials"): Kind(
        auth_type="oauth2",
        grant_type="client_credentials",
        input_model=schemas.OAuth2ClientCredentialsIn,
        output_model=schemas.OAuth2ClientCredentialsOut,
        secret_fields=("client_secret",),
        guarded_urls=("token_url",),
        build_config=lambda public, secrets: _oauth2(public, secrets, "client_credentials"),
    ),
    ("oauth2", "password"): Kind(
        auth_type="oauth2",
        grant_type="password",
        input_model=schemas.OAuth2PasswordIn,
        output_model=schemas.OAuth2PasswordOut,
        secret_fields=("client_secret", "password"),
        guarded_urls=("token_url",),
        build_config=lambda public, secrets: _oauth2(public, secrets, "password"),
    ),
}


def kind_of(auth_type: str, grant_type: str | None) -> Kind:
    return KINDS[(auth_type, grant_type if auth_type != "basic" else None)]


def kind_for(auth: BaseModel) -> Kind:
    return kind_of(getattr(auth, "type"), getattr(auth, "grant_type", None))  # noqa: B009
