"""The fields shared by the two client-secret methods (RFC 6749 §2.3.1)."""

from __future__ import annotations

from pydantic import BaseModel

from app.connectors.fields import Secret, Strict


class ClientSecretFields(Strict):
    client_secret: Secret


class ClientSecretOut(BaseModel):
    has_client_secret: bool
