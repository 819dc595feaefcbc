"""OAuth 2.0 client credentials grant (RFC 6749 §4.4), the default grant."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.connectors.fields import Strict
from app.connectors.kinds.example import BodyExample
from app.connectors.kinds.oauth2 import OAuth2Kind, build_models


class _GrantIn(Strict):
    grant_type: Literal["client_credentials"] = "client_credentials"


class _GrantOut(BaseModel):
    grant_type: Literal["client_credentials"]


_INPUT, _OUTPUT = build_models("ClientCredentials", _GrantIn, _GrantOut, "OAuth 2.0 client credentials grant")


class ClientCredentialsKind(OAuth2Kind):
    variant = "client_credentials"
    example = BodyExample(
        "oauth2ClientCredentials",
        "OAuth 2.0, client credentials grant",
        {
            "name": "CRM",
            "resource_domain_url": "https://crm.example.com/api",
            "auth": {
                "type": "oauth2",
                "grant_type": "client_credentials",
                "client_id": "abc",
                "client_secret": "s3cret",
                "token_url": "https://idp.example.com/oauth/token",
                "scope": "read write",
                "client_auth_method": "client_secret_post",
                "audience": "https://crm.example.com/",
            },
        },
    )
    input_model = _INPUT
    output_model = _OUTPUT


KIND = ClientCredentialsKind()
