"""``client_secret_basic``: the client id and secret in an HTTP Basic header (the default)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from app.connectors.kinds.client_auth.base import ClientAuthMethod
from app.connectors.kinds.client_auth.client_secret import ClientSecretFields, ClientSecretOut
from app.tokens.oauth import client_basic_header


@dataclass(frozen=True, slots=True)
class ClientSecretBasic:
    client_secret: SecretStr = field(repr=False)
    method = "client_secret_basic"
    certificate = None

    def apply(
        self,
        *,
        client_id: str,
        token_url: str,
        form: MutableMapping[str, str],
        headers: MutableMapping[str, str],
    ) -> None:
        headers["Authorization"] = client_basic_header(client_id, self.client_secret.get_secret_value())


class _Method(ClientAuthMethod):
    name = "client_secret_basic"
    fields = ClientSecretFields
    out_fields = ClientSecretOut
    schema_suffix = ""
    default = True

    def build(self, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> ClientSecretBasic:
        return ClientSecretBasic(secrets["client_secret"])


METHOD = _Method()
