"""The connector form: what an admin typed, turned into the API's wire shapes, and back.

The form follows the model product's order: Name, Authentication type (Basic first, then OAuth
2.0, then API key), Resource domain URL, then the fields of the type chosen; for OAuth 2.0 the
Grant type (client credentials first, then password, then authorization code) and the client
authentication. Every field of every type is in the page (plain HTML works without JavaScript);
only the chosen type's fields are read. Secrets are never sent back to the browser: a refused
form is shown again with what was typed, secrets left blank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

AUTH_TYPES: Final = (("basic", "Basic authentication"), ("oauth2", "OAuth 2.0"), ("api_key", "API key"))
GRANT_TYPES: Final = (
    ("client_credentials", "Client credentials"),
    ("password", "Password grant"),
    ("authorization_code", "Authorization code (an admin connects the account)"),
)
CLIENT_AUTH_METHODS: Final = (
    ("client_secret_basic", "Client secret, in a Basic header"),
    ("client_secret_post", "Client secret, in the request body"),
    ("private_key_jwt", "Private key JWT (a signed assertion)"),
    ("tls_client_auth", "TLS client certificate"),
)
SIGNING_ALGS: Final = (("RS256", "RS256"), ("PS256", "PS256"), ("ES256", "ES256"))
API_KEY_PLACES: Final = (("header", "A header"), ("query", "A query parameter"))

# Form field names of secrets: never echoed into a page.
SECRET_FIELDS: Final = frozenset(
    {"password", "client_secret", "oauth_password", "key", "private_key", "tls_private_key"}
)
TEXT_FIELDS: Final = (
    "name",
    "type",
    "resource_domain_url",
    "username",
    "validation_url",
    "grant_type",
    "client_auth_method",
    "client_id",
    "token_url",
    "scope",
    "oauth_username",
    "authorization_url",
    "signing_alg",
    "private_key_id",
    "assertion_audience",
    "tls_certificate",
    "key_in",
    "key_name",
    "key_prefix",
    "key_validation_url",
)


@dataclasses.dataclass
class ConnectorForm:
    """The values of the form, and the messages to show beside its fields (by field name)."""

    values: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # A message about the whole save (a refused check, a limit), in words.
    problem: str | None = None

    def value(self, name: str) -> str:
        return "" if name in SECRET_FIELDS else self.values.get(name, "")

    @classmethod
    def posted(cls, data: Mapping[str, str]) -> ConnectorForm:
        return cls(values={name: data.get(name, "") for name in (*TEXT_FIELDS, *SECRET_FIELDS)})

    @classmethod
    def of_connector(cls, connector: Mapping[str, Any]) -> ConnectorForm:
        """An edit form filled from a connector as read (its secrets left blank)."""
        auth = connector["auth"]
        values = {
            "name": connector["name"],
            "type": auth["type"],
            "resource_domain_url": connector["resource_domain_url"],
        }
        if auth["type"] == "basic":
            values.update(username=auth["username"], validation_url=auth["validation_url"])
        elif auth["type"] == "oauth2":
            values.update(
                grant_type=auth["grant_type"],
                client_auth_method=auth.get("client_auth_method", ""),
                client_id=auth["client_id"],
                token_url=auth["token_url"],
                scope=auth.get("scope") or "",
                oauth_username=auth.get("username", ""),
                authorization_url=auth.get("authorization_url", ""),
                signing_alg=auth.get("signing_alg", ""),
                private_key_id=auth.get("private_key_id") or "",
                assertion_audience=auth.get("assertion_audience") or "",
                tls_certificate=auth.get("tls_certificate", ""),
            )
        else:
            values.update(
                key_in=auth["in"],
                key_name=auth["name"],
                key_prefix=auth.get("prefix") or "",
                key_validation_url=auth.get("validation_url") or "",
            )
        return cls(values=values)

    def create_body(self) -> dict[str, Any]:
        """``POST /connectors``'s body: every field of the chosen type (blank ones left out, so
        that a missing one is reported as missing)."""
        return {
            "name": self.values.get("name", ""),
            "resource_domain_url": self.values.get("resource_domain_url", ""),
            "auth": self._auth(keep_blank_secrets=False),
        }

    def patch_body(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """``PATCH``'s body against the connector as read: a blank secret keeps the stored one;
        another type or grant sends the whole new ``auth``."""
        auth = self._auth(keep_blank_secrets=True)
        same_kind = auth.get("type") == stored["auth"]["type"] and auth.get("grant_type") == stored[
            "auth"
        ].get("grant_type")
        if not same_kind:
            auth = self._auth(keep_blank_secrets=False)
        return {
            "name": self.values.get("name", ""),
            "resource_domain_url": self.values.get("resource_domain_url", ""),
            "auth": auth,
        }

    def _auth(self, *, keep_blank_secrets: bool) -> dict[str, Any]:
        v = self.values
        kind = v.get("type", "")

        def pick(*fields: str) -> dict[str, Any]:
            # Each is "wire name=form name", or one name for both. Blank: left out (a blank
            # optional field is "not set"; a blank secret keeps the stored one on an edit, and is
            # reported missing on a create).
            pairs = [field.partition("=")[::2] for field in fields]
            return {wire: v[name or wire] for wire, name in pairs if v.get(name or wire, "") != ""}

        if kind == "basic":
            return {
                "type": "basic",
                **pick("username", "password", "validation_url"),
            }
        if kind == "oauth2":
            grant = v.get("grant_type") or "client_credentials"
            auth: dict[str, Any] = {
                "type": "oauth2",
                "grant_type": grant,
                **pick("client_auth_method", "client_id", "token_url", "scope"),
            }
            method = v.get("client_auth_method") or "client_secret_basic"
            if method == "private_key_jwt":
                auth.update(pick("private_key", "signing_alg", "private_key_id", "assertion_audience"))
            elif method == "tls_client_auth":
                auth.update(pick("tls_certificate", "tls_private_key"))
            else:
                auth.update(pick("client_secret"))
            if grant == "password":
                auth.update(pick("username=oauth_username", "password=oauth_password"))
            if grant == "authorization_code":
                auth.update(pick("authorization_url"))
            return auth
        if kind == "api_key":
            return {
                "type": "api_key",
                **pick(
                    "key",
                    "in=key_in",
                    "name=key_name",
                    "prefix=key_prefix",
                    "validation_url=key_validation_url",
                ),
            }
        return {"type": kind}

    def place_errors(self, errors: Sequence[Mapping[str, object]]) -> None:
        """Put the problem's ``errors`` beside the fields they name (the rest above the form)."""
        kind = self.values.get("type", "")
        for error in errors:
            name = _form_field(str(error.get("field", "")), kind, self.values.get("grant_type", ""))
            self.errors.setdefault(name, []).append(str(error.get("reason", "")))


def _form_field(location: str, kind: str, grant: str) -> str:
    """The form field an API error location names (``auth.password`` is ``oauth_password`` in
    the password grant's fieldset); ``""`` for the form as a whole."""
    if location in ("name", "resource_domain_url"):
        return location
    if not location.startswith("auth"):
        return ""
    field = location.removeprefix("auth").lstrip(".").split(".")[0]
    if field in ("", "type"):
        return "type"
    if kind == "oauth2" and grant == "password" and field in ("username", "password"):
        return f"oauth_{field}"
    if kind == "api_key":
        return {"key": "key", "in": "key_in", "name": "key_name", "prefix": "key_prefix"}.get(
            field, "key_validation_url" if field == "validation_url" else field
        )
    return field
