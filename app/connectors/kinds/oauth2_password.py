"""OAuth 2.0 resource-owner password grant (RFC 6749 §4.3)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.connectors.fields import Secret, Strict, Username
from app.connectors.kinds.base import Public, Secrets
from app.connectors.kinds.example import BodyExample
from app.connectors.kinds.oauth2 import OAuth2Kind, build_models


class _GrantIn(Strict):
    grant_type: Literal["password"]
    username: Username
    password: Secret


class _GrantOut(BaseModel):
    grant_type: Literal["password"]
    username: str
    has_password: bool


_INPUT, _OUTPUT = build_models("Password", _GrantIn, _GrantOut, "OAuth 2.0 resource-owner password grant")


class PasswordKind(OAuth2Kind):
    variant = "password"
    example = BodyExample(
        "oauth2Password",
        "OAuth 2.0, resource-owner password grant",
        {
            "name": "Ticketing",
            "resource_domain_url": "https://tickets.example.com",
            "auth": {
                "type": "oauth2",
                "grant_type": "password",
                "client_id": "abc",
                "client_secret": "s3cret",
                "token_url": "https://idp.example.com/oauth/token",
                "scope": "read",
                "username": "svc-user",
                "password": "s3cret",
                "extra_token_params": {"resource": "https://tickets.example.com"},
            },
        },
    )
    input_model = _INPUT
    output_model = _OUTPUT

    def grant_fields(self, public: Public, secrets: Secrets) -> dict[str, Any]:
        return {"username": public["username"], "password": secrets["password"]}


KIND = PasswordKind()
