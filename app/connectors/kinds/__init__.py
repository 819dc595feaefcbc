"""The registry of connector kinds.

A kind is one module (``basic``, ``oauth2_client_credentials``, ...) holding a ``Kind``
(``app.connectors.kinds.base``); OAuth 2.0 client-authentication methods are registered the same
way in ``app.connectors.kinds.client_auth``. Everything else (the wire shapes in
``app.connectors.schemas``, the service, the router, the token layer) looks a kind up here and
calls it, and never branches on its name. The README's "Adding a kind" says what a new one takes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.connectors.kinds import (
    api_key,
    basic,
    oauth2_authorization_code,
    oauth2_client_credentials,
    oauth2_password,
)
from app.connectors.kinds.base import CheckTools, Kind, StaticKind, TokenKind
from app.connectors.kinds.client_auth import METHODS
from app.connectors.kinds.example import BodyExample

__all__ = [
    "KINDS",
    "BodyExample",
    "CheckTools",
    "Kind",
    "StaticKind",
    "TokenKind",
    "create_examples",
    "fill_defaults",
    "kind_for",
    "kind_of",
]

# In the order the document lists them; the first variant of a type is its default.
KINDS: tuple[Kind, ...] = (
    basic.KIND,
    oauth2_client_credentials.KIND,
    oauth2_password.KIND,
    oauth2_authorization_code.KIND,
    api_key.KIND,
)
_BY_TAGS = {(kind.auth_type, kind.variant): kind for kind in KINDS}


def kind_of(auth_type: str, variant: str | None) -> Kind:
    """The kind stored as ``auth_type`` and ``grant_type``; KeyError if none is registered."""
    return _BY_TAGS[(auth_type, variant)]


def kind_for(auth: BaseModel) -> Kind:
    """The kind of a validated input model."""
    auth_type = getattr(auth, "type")  # noqa: B009
    first = default_kind(auth_type)
    field = first.variant_field if first is not None else None
    return kind_of(auth_type, getattr(auth, field) if field is not None else None)


def default_kind(auth_type: str) -> Kind | None:
    """The kind an input of ``auth_type`` that names no variant is (the first registered)."""
    return next((kind for kind in KINDS if kind.auth_type == auth_type), None)


def fill_defaults(raw: Any) -> Any:
    """An ``auth`` input with the tags it may leave out filled in (``grant_type`` and
    ``client_auth_method`` of OAuth 2.0), so that the discriminated unions can pick its model."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        return raw
    kind = default_kind(raw["type"])
    if kind is None:
        return raw
    field = kind.variant_field
    if field is not None:
        raw = {field: kind.variant, **raw}
        variant = raw[field]
        kind = _BY_TAGS.get((kind.auth_type, variant)) if isinstance(variant, str) else None
        if kind is None:
            return raw  # an unknown variant: the union says so
    return kind.fill_defaults(raw)


def create_examples() -> list[BodyExample]:
    """The document's examples of a create: one per kind, then one per client-authentication
    method with fields of its own."""
    return [kind.example for kind in KINDS] + [method.example for method in METHODS if method.example]
