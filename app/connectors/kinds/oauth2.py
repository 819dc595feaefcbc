"""What the OAuth 2.0 kinds share: the common fields, and models built per grant from the
client-authentication methods (``app.connectors.kinds.client_auth``).

Each grant is a kind of its own (``oauth2_client_credentials``, ``oauth2_password``). Its models
are one per group of methods taking the same fields, discriminated by ``client_auth_method``
(``client_secret_basic`` when omitted).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, cast

from pydantic import BaseModel, Field, create_model, field_validator
from typing_extensions import TypeAliasType

from app.connectors.fields import (
    Audience,
    EndpointURL,
    ExtraTokenParams,
    Identifier,
    Scope,
    Strict,
    TokenLifetime,
    check_token_params,
)
from app.connectors.kinds.base import Public, Secrets, TokenKind
from app.connectors.kinds.client_auth import METHODS, default_method, method_of
from app.connectors.kinds.client_auth.base import ClientAuthMethod as Method
from app.tokens.types import GrantType, OAuth2Config

# Named, so the document (and a client generated from it) has one of each, not one per model.
_METHOD_NAMES: Any = Literal.__getitem__(tuple(method.name for method in METHODS))
ClientAuthMethod: Any = TypeAliasType("ClientAuthMethod", _METHOD_NAMES)


class OAuth2Common(Strict):
    type: Literal["oauth2"]
    client_id: Identifier
    token_url: EndpointURL
    scope: Scope | None = None
    audience: Audience | None = None
    extra_token_params: ExtraTokenParams = Field(default_factory=dict, max_length=10)
    token_lifetime_seconds: TokenLifetime | None = None

    _check_params = field_validator("extra_token_params")(check_token_params)


class OAuth2OutCommon(BaseModel):
    type: Literal["oauth2"]
    client_id: str
    token_url: str
    scope: str | None = None
    audience: str | None = None
    extra_token_params: ExtraTokenParams = Field(default_factory=dict)
    token_lifetime_seconds: int | None = None


def _groups() -> list[list[Method]]:
    groups: dict[type[BaseModel], list[Method]] = {}
    for method in METHODS:
        groups.setdefault(method.fields, []).append(method)
    return list(groups.values())


def _union(name: str, models: list[type[BaseModel]]) -> Any:
    if len(models) == 1:
        return models[0]
    return TypeAliasType(
        name,
        Annotated[Union[tuple(models)], Field(discriminator="client_auth_method")],  # noqa: UP007
    )


def build_models(
    title: str, grant_in: type[BaseModel], grant_out: type[BaseModel], doc: str
) -> tuple[Any, Any]:
    """The input and read models of one grant: one per group of methods with the same fields."""
    inputs: list[type[BaseModel]] = []
    outputs: list[type[BaseModel]] = []
    for methods in _groups():
        names: Any = Literal.__getitem__(tuple(method.name for method in methods))
        default = next((method.name for method in methods if method.default), ...)
        name = f"OAuth2{title}{methods[0].schema_suffix}"
        listed = ", ".join(f"`{method.name}`" for method in methods)
        inputs.append(
            create_model(
                f"{name}In",
                __base__=(grant_in, methods[0].fields, OAuth2Common),
                __doc__=f"{doc}, the client authenticated with {listed}.",
                client_auth_method=(names, default),
            )
        )
        outputs.append(
            create_model(
                f"{name}Out",
                __base__=(grant_out, methods[0].out_fields, OAuth2OutCommon),
                client_auth_method=(names, ...),
            )
        )
    return _union(f"OAuth2{title}AuthIn", inputs), _union(f"OAuth2{title}AuthOut", outputs)


class OAuth2Kind(TokenKind):
    auth_type = "oauth2"
    schema_prefix = "OAuth2"
    variant_field = "grant_type"
    guarded_urls: ClassVar[tuple[str, ...]] = ("token_url",)

    def fill_defaults(self, raw: dict[str, Any]) -> dict[str, Any]:
        if "client_auth_method" not in raw:
            return {**raw, "client_auth_method": default_method().name}
        return raw

    def location_tags(self) -> dict[str, set[str]]:
        assert self.variant is not None
        return {self.variant: {method.name for method in METHODS}}

    def facts(self, auth: BaseModel) -> dict[str, Any]:
        return method_of(getattr(auth, "client_auth_method")).facts(auth)  # noqa: B009

    def private_key_fields(self, public: Public) -> tuple[str, ...]:
        return method_of(public.get("client_auth_method") or default_method().name).private_key_fields

    def grant_fields(self, public: Public, secrets: Secrets) -> dict[str, Any]:
        """The grant's own fields of the token configuration (the password grant's user)."""
        return {}

    def token_config(self, public: Public, secrets: Secrets) -> OAuth2Config:
        method = method_of(public.get("client_auth_method") or default_method().name)
        return OAuth2Config(
            grant_type=cast(GrantType, self.variant),
            token_url=public["token_url"],
            client_id=public["client_id"],
            client_auth=method.build(public, secrets),
            scope=public.get("scope"),
            audience=public.get("audience"),
            extra_token_params=dict(public.get("extra_token_params") or {}),
            token_lifetime_seconds=public.get("token_lifetime_seconds"),
            **self.grant_fields(public, secrets),
        )
