"""The audit trail's wire shapes. An event names fields; it never carries a field's value."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ``consent``: an admin started connecting an authorization code connector; ``connect``: the
# provider's answer came back (its outcome: ``succeeded`` or why not); ``status``: a token renewal
# found the grant gone (``consent_required``).
AuditAction = Literal["create", "update", "delete", "validate", "rotate_keys", "consent", "connect", "status"]

# The outcome of a change that was made; a refused attempt records its error code instead.
SUCCEEDED = "succeeded"


class AuditEvent(BaseModel):
    """One recorded change, refused attempt or check of a connector."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "action": "update",
                    "actor": "user-42",
                    "changed_fields": ["auth.token_url", "auth.client_secret"],
                    "outcome": "succeeded",
                    "detail": None,
                    "created_at": "2026-11-25T10:00:00Z",
                }
            ]
        },
    )

    action: AuditAction
    actor: str | None = Field(
        description="The caller's subject (the JWT `sub`), or the command that acted (`rotate-keys`)"
    )
    changed_fields: list[str] = Field(
        description=(
            "Names of the fields a change set, such as `name` or `auth.token_url`; a secret is listed "
            "when a new value was sent. For a refused attempt, the fields the request tried to set."
        )
    )
    outcome: str = Field(
        description=(
            "`succeeded`, or the error code of a refused attempt (`credentials_rejected`, "
            "`version_mismatch`, ...); for `validate`, the resulting status state"
        )
    )
    detail: str | None = Field(description="A short code-like note, such as a provider's error code")
    created_at: datetime


class AuditEventList(BaseModel):
    items: list[AuditEvent] = Field(description="Newest first")
