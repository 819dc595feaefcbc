"""Merging a PATCH of ``auth`` with what is stored, whatever the connector's kind.

The stored public fields and decrypted secrets, overlaid with the fields sent, are validated by
the kind's own model. A change of ``type`` or of the kind's variant needs the whole new ``auth``;
fields carried over from storage that the merged model does not take (the secret of a
client-authentication method given up, a derived value) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from app.connectors import schemas
from app.connectors.kinds import Kind, fill_defaults, kind_for, kind_of
from app.connectors.models import Connector
from app.core.errors import InvalidRequest
from app.core.validation import field_errors

_AUTH_ADAPTER: TypeAdapter[Any] = TypeAdapter(schemas.AuthIn)

# Opens a row's stored secrets (``SecretSealer.open_row``).
Opener = Callable[[Connector], dict[str, SecretStr]]


@dataclass(frozen=True, slots=True)
class MergedAuth:
    """The auth after a patch: its kind, public fields, all secrets, and the secrets sent.

    ``secrets`` is None when the patch leaves the auth as stored: nothing is decrypted for a
    change that does not need them (a rename works even when the key ring cannot open them).
    """

    kind: Kind
    public: dict[str, Any]
    secrets: dict[str, SecretStr] | None
    sent_secrets: set[str]


def merge_auth(row: Connector, patch: BaseModel | None, open_secrets: Opener) -> MergedAuth:
    """The auth after ``patch``; ``InvalidRequest`` naming the fields that do not fit."""
    current = kind_of(row.auth_type, row.grant_type)
    if patch is None:
        return MergedAuth(current, dict(row.auth_config), None, set())
    raw = _raw_fields(patch)
    sent_secrets = _secret_names(patch)
    if _restates(row, current, raw, sent_secrets):
        return MergedAuth(current, dict(row.auth_config), None, set())
    new_type = raw.get("type", row.auth_type)
    field = current.variant_field
    new_variant = raw.get(field, row.grant_type) if field is not None else None
    if new_type != row.auth_type or new_variant != row.grant_type:
        # A change of kind needs the whole new auth object: nothing is carried over.
        auth = _validate_auth(fill_defaults({**raw, "type": new_type}))
        kind = kind_for(auth)
        public, secrets = kind.split(auth)
        return MergedAuth(kind, public, secrets, set(secrets))
    stored = open_secrets(row)
    merged: dict[str, Any] = {
        **row.auth_config,
        **{name: value.get_secret_value() for name, value in stored.items()},
    }
    merged.update(raw)
    merged.update(current.tags())
    # Null removes a field: the kind's model then applies its default, or says it is required.
    merged = {name: value for name, value in merged.items() if value is not None}
    auth = _validate_auth(merged, carried=set(merged) - set(raw))
    public, secrets = current.split(auth)
    return MergedAuth(current, public, secrets, {name for name in sent_secrets if name in secrets})


def sent_fields(model: BaseModel) -> dict[str, Any]:
    """The fields a request sent, by their wire names."""
    fields = type(model).model_fields
    return {fields[name].alias or name: getattr(model, name) for name in model.model_fields_set}


def _raw_fields(patch: BaseModel) -> dict[str, Any]:
    return {
        name: value.get_secret_value() if isinstance(value, SecretStr) else value
        for name, value in sent_fields(patch).items()
    }


def _secret_names(patch: BaseModel) -> set[str]:
    return {name for name, value in sent_fields(patch).items() if isinstance(value, SecretStr)}


def _restates(row: Connector, kind: Kind, raw: Mapping[str, Any], secrets: Collection[str]) -> bool:
    """True when an auth patch sends no secret and only values equal to the stored ones."""
    stored = {**row.auth_config, **kind.tags()}
    return all(
        name not in secrets and name in stored and stored[name] == value for name, value in raw.items()
    )


def _validate_auth(raw: dict[str, Any], *, carried: Collection[str] = ()) -> BaseModel:
    """Validate a whole ``auth``. Fields ``carried`` over from storage that the resulting model
    does not take (the secret of a client-authentication method given up, a derived value) are
    left out; a field the caller sent is never dropped."""
    try:
        auth: BaseModel = _AUTH_ADAPTER.validate_python(raw)
    except ValidationError as error:
        extra = {
            str(item["loc"][-1])
            for item in error.errors()
            if item["type"] == "extra_forbidden" and item["loc"] and str(item["loc"][-1]) in carried
        }
        if extra:
            return _validate_auth({k: v for k, v in raw.items() if k not in extra})
        raise InvalidRequest(errors=field_errors(error, prefix=("auth",), rules=schemas.LOCATIONS)) from None
    return auth
