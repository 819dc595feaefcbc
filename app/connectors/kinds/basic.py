"""Basic authentication (RFC 7617): a username and password, checked by ``GET validation_url``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.connectors.fields import EndpointURL, Secret, Strict, Username
from app.connectors.kinds.base import Public, Secrets, StaticKind
from app.connectors.kinds.example import BodyExample
from app.core import patterns
from app.tokens.basic import basic_header
from app.tokens.types import StaticCredential


class BasicAuthIn(Strict):
    """Basic authentication, checked by ``GET validation_url``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "basic",
                    "username": "svc-user",
                    "password": "s3cret",
                    "validation_url": "https://api.example.com/auth/check",
                }
            ]
        }
    )

    type: Literal["basic"]
    username: Annotated[Username, Field(json_schema_extra={"pattern": patterns.BASIC_USERNAME})]
    password: Secret
    validation_url: EndpointURL

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        # The server splits user-id and password at the first colon (RFC 7617 section 2).
        if ":" in value:
            raise ValueError("a Basic authentication username may not contain ':'")
        return value


class BasicAuthOut(BaseModel):
    type: Literal["basic"]
    username: str
    validation_url: str
    has_password: bool


class BasicKind(StaticKind):
    auth_type = "basic"
    example = BodyExample(
        "basic",
        "Basic authentication, checked by GET validation_url",
        {
            "name": "Contact Center Connector",
            "resource_domain_url": "https://api.example.com",
            "auth": {
                "type": "basic",
                "username": "svc-user",
                "password": "s3cret",
                "validation_url": "https://api.example.com/auth/check",
            },
        },
    )
    schema_prefix = "Basic"
    input_model = BasicAuthIn
    output_model = BasicAuthOut
    guarded_urls = ("validation_url",)

    def credential(self, public: Public, secrets: Secrets) -> StaticCredential:
        return StaticCredential(
            headers={"Authorization": basic_header(public["username"], secrets["password"])}
        )


KIND = BasicKind()
