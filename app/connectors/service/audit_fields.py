"""What audit events say: the names of the fields a request set or a change changed (names
only, never values, auth fields in one fixed order) and the detail of a refusal."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel

from app.connectors import schemas
from app.connectors.kinds import Kind
from app.connectors.models import Connector
from app.connectors.service.patching import sent_fields
from app.core.errors import AppError


def detail_of(error: AppError) -> str:
    provider = error.extra.get("provider_error")
    return f"{error.code}: {provider}" if isinstance(provider, str) else error.code


# Audit field names: names only, never values. Auth fields are listed in one fixed order.
_AUTH_FIELD_ORDER = {
    info.alias or name: index for index, (name, info) in enumerate(schemas.AuthPatch.model_fields.items())
}


def _auth_names(names: Collection[str]) -> list[str]:
    ordered = sorted(names, key=lambda name: (_AUTH_FIELD_ORDER.get(name, len(_AUTH_FIELD_ORDER)), name))
    return [f"auth.{name}" for name in ordered]


def fields_set(body: schemas.ConnectorCreate | schemas.ConnectorPatch) -> list[str]:
    """The fields a request sets, whatever their values (those of a refused attempt included)."""
    sent = body.model_fields_set
    names = [name for name in ("name", "resource_domain_url") if name in sent]
    auth: BaseModel | None = body.auth
    return names + (_auth_names(sent_fields(auth)) if auth is not None else [])


def changed_fields(
    row: Connector,
    name: str,
    base_url: str,
    kind: Kind,
    public: Mapping[str, Any],
    sent_secrets: Collection[str],
    secret_names: Collection[str],
) -> list[str]:
    """What an update changed. A secret counts when a new value was sent (or it was dropped)."""
    names = [
        field
        for field, new, old in (
            ("name", name, row.name),
            ("resource_domain_url", base_url, row.resource_domain_url),
        )
        if new != old
    ]
    # An absent field, None and an empty value ({} for extra_token_params) all mean "not set".
    auth = {
        key
        for key in {*public, *row.auth_config}
        if (public.get(key) or None) != (row.auth_config.get(key) or None)
    }
    for tag, value in kind.tags().items():
        if value != {"type": row.auth_type, "grant_type": row.grant_type}.get(tag):
            auth.add(tag)
    auth.update(sent_secrets)
    auth.update(set(row.secrets) - set(secret_names))
    return names + _auth_names(auth)
