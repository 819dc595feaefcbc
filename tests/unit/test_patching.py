"""Merging a PATCH of ``auth`` with what is stored: plain tests, no app and no database."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from app.connectors import schemas
from app.connectors.kinds import kind_of
from app.connectors.models import Connector
from app.connectors.service.audit_fields import changed_fields, fields_set
from app.connectors.service.patching import merge_auth
from app.core.errors import InvalidRequest
from app.core.validation import field_errors

STORED_SECRETS = {"client_secret": "stored-secret", "password": "stored-password"}


def _row(auth_type: str, grant_type: str | None, config: dict[str, Any], secrets: list[str]) -> Connector:
    return Connector(
        id=uuid.uuid4(),
        organization_id="org-a",
        name="Orders",
        name_key="orders",
        resource_domain_url="https://api.example.com",
        auth_type=auth_type,
        grant_type=grant_type,
        auth_config=config,
        secrets={name: f"sealed:{name}" for name in secrets},
        version=3,
    )


def _oauth_row(**config: Any) -> Connector:
    public = {
        "client_id": "abc",
        "token_url": "https://idp.example.com/token",
        "scope": "read",
        "audience": None,
        "extra_token_params": {},
        "token_lifetime_seconds": None,
        "client_auth_method": "client_secret_basic",
        **config,
    }
    return _row("oauth2", "client_credentials", public, ["client_secret"])


def _basic_row() -> Connector:
    public = {"username": "svc", "validation_url": "https://api.example.com/check"}
    return _row("basic", None, public, ["password"])


class Opener:
    """Stands in for the key ring: counts the rows whose secrets were opened."""

    def __init__(self) -> None:
        self.opened = 0

    def __call__(self, row: Connector) -> dict[str, SecretStr]:
        self.opened += 1
        return {name: SecretStr(STORED_SECRETS[name]) for name in row.secrets}


def _patch(**auth: Any) -> Any:
    return schemas.ConnectorPatch.model_validate({"auth": auth}).auth


def _errors(excinfo: pytest.ExceptionInfo[InvalidRequest]) -> list[dict[str, str]]:
    errors = excinfo.value.extra["errors"]
    assert isinstance(errors, list)
    return errors


def test_no_auth_patch_keeps_everything_and_opens_nothing() -> None:
    opener = Opener()
    merged = merge_auth(_oauth_row(), None, opener)
    assert merged.kind is kind_of("oauth2", "client_credentials")
    assert merged.secrets is None and merged.sent_secrets == set() and opener.opened == 0


def test_restating_stored_values_opens_nothing() -> None:
    opener = Opener()
    merged = merge_auth(_oauth_row(), _patch(client_id="abc", scope="read", type="oauth2"), opener)
    assert merged.secrets is None and opener.opened == 0


def test_a_new_secret_is_sent_and_the_rest_is_carried_over() -> None:
    merged = merge_auth(_oauth_row(), _patch(client_secret="rotated"), Opener())
    assert merged.secrets is not None
    assert merged.secrets["client_secret"].get_secret_value() == "rotated"
    assert merged.sent_secrets == {"client_secret"}
    assert merged.public["client_id"] == "abc" and merged.public["scope"] == "read"


def test_a_changed_public_field_keeps_the_stored_secret() -> None:
    merged = merge_auth(_oauth_row(), _patch(client_auth_method="client_secret_post"), Opener())
    assert merged.public["client_auth_method"] == "client_secret_post"
    assert merged.secrets is not None
    assert merged.secrets["client_secret"].get_secret_value() == "stored-secret"
    assert merged.sent_secrets == set()


def test_null_removes_an_optional_field() -> None:
    merged = merge_auth(_oauth_row(), _patch(scope=None), Opener())
    assert merged.public["scope"] is None


@pytest.mark.parametrize("field", ["client_id", "token_url", "client_secret", "type", "grant_type"])
def test_null_is_refused_where_it_cannot_mean_remove(field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        _patch(**{field: None})
    assert excinfo.value.errors()[0]["loc"] == ("auth", field)


def test_a_field_of_another_kind_is_refused() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        merge_auth(_oauth_row(), _patch(validation_url="https://api.example.com/check"), Opener())
    assert _errors(excinfo) == [{"field": "auth.*", "reason": "unknown field"}]


def test_a_stored_field_the_kind_no_longer_takes_is_left_out() -> None:
    row = _oauth_row(retired_fact={"kty": "RSA"})
    merged = merge_auth(row, _patch(scope="write"), Opener())
    assert "retired_fact" not in merged.public and merged.public["scope"] == "write"


def test_a_change_of_type_needs_the_whole_new_auth() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        merge_auth(_oauth_row(), _patch(type="basic", username="svc"), Opener())
    fields = {error["field"] for error in _errors(excinfo)}
    assert fields == {"auth.password", "auth.validation_url"}


def test_a_change_of_type_with_the_whole_auth_takes_nothing_stored() -> None:
    opener = Opener()
    patch = _patch(type="basic", username="svc", password="new", validation_url="https://api.example.com/c")
    merged = merge_auth(_oauth_row(), patch, opener)
    assert merged.kind is kind_of("basic", None)
    assert merged.sent_secrets == {"password"} and opener.opened == 0
    assert "client_id" not in merged.public


def test_a_change_of_grant_defaults_and_needs_its_own_fields() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        merge_auth(_oauth_row(), _patch(grant_type="password"), Opener())
    fields = {error["field"] for error in _errors(excinfo)}
    assert {"auth.username", "auth.password", "auth.client_id"} <= fields


def test_an_oauth_type_without_a_grant_becomes_client_credentials() -> None:
    patch = _patch(type="oauth2", client_id="c", client_secret="s", token_url="https://idp.example.com/t")
    merged = merge_auth(_basic_row(), patch, Opener())
    assert merged.kind is kind_of("oauth2", "client_credentials")
    assert merged.public["client_auth_method"] == "client_secret_basic"


def test_audit_names_follow_one_fixed_order_and_never_values() -> None:
    row = _oauth_row()
    merged = merge_auth(
        row, _patch(client_secret="rotated", token_url="https://idp.example.com/t2"), Opener()
    )
    assert merged.secrets is not None
    names = changed_fields(
        row,
        "Orders 2",
        row.resource_domain_url,
        merged.kind,
        merged.public,
        merged.sent_secrets,
        set(merged.secrets),
    )
    assert names == ["name", "auth.token_url", "auth.client_secret"]


def test_a_dropped_secret_is_named_as_changed() -> None:
    row = _row(
        "oauth2",
        "password",
        {
            "client_id": "abc",
            "token_url": "https://idp.example.com/token",
            "username": "u",
            "client_auth_method": "client_secret_basic",
        },
        ["client_secret", "password"],
    )
    patch = _patch(
        grant_type="client_credentials",
        client_id="abc",
        client_secret="s",
        token_url=row.auth_config["token_url"],
    )
    merged = merge_auth(row, patch, Opener())
    assert merged.secrets is not None
    names = changed_fields(
        row,
        row.name,
        row.resource_domain_url,
        merged.kind,
        merged.public,
        merged.sent_secrets,
        set(merged.secrets),
    )
    assert "auth.password" in names and "auth.grant_type" in names and "auth.username" in names


def test_fields_set_names_what_was_sent_whatever_its_value() -> None:
    body = schemas.ConnectorPatch.model_validate({"name": "x", "auth": {"scope": None, "client_secret": "s"}})
    assert fields_set(body) == ["name", "auth.scope", "auth.client_secret"]


def test_a_refused_value_is_one_error_without_the_null_branch() -> None:
    with pytest.raises(ValidationError) as excinfo:
        schemas.ConnectorPatch.model_validate({"name": "a\u202eb", "auth": {"client_id": "a\x01"}})
    assert field_errors(excinfo.value, rules=schemas.LOCATIONS) == [
        {"field": "name", "reason": "may not contain control or invisible characters"},
        {"field": "auth.client_id", "reason": "may not contain control characters"},
    ]
