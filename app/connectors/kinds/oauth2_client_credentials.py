"""OAuth 2.0 client credentials grant (RFC 6749 §4.4), the default grant."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.connectors.fields import Strict
from app.connectors.kinds.oauth2 import OAuth2Kind, build_models


class _GrantIn(Strict):
    grant_type: Literal["client_credentials"] = "client_credentials"


class _GrantOut(BaseModel):
    grant_type: Literal["client_credentials"]


_INPUT, _OUTPUT = build_models("ClientCredentials", _GrantIn, _GrantOut, "OAuth 2.0 client credentials grant")


class ClientCredentialsKind(OAuth2Kind):
    variant = "client_credentials"
    input_model = _INPUT
    output_model = _OUTPUT


KIND = ClientCredentialsKind()
