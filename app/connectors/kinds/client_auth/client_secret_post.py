"""``client_secret_post``: the client id and secret as form fields of the token request."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from app.connectors.kinds.client_auth.base import ClientAuthMethod
from app.connectors.kinds.client_auth.client_secret import ClientSecretFields, ClientSecretOut


@dataclass(frozen=True, slots=True)
class ClientSecretPost:
    client_secret: SecretStr = field(repr=False)
    method = "client_secret_post"
    certificate = None

    def apply(
        self,
        *,
        client_id: str,
        token_url: str,
        form: MutableMapping[str, str],
        headers: MutableMapping[str, str],
    ) -> None:
        form["client_id"] = client_id
        form["client_secret"] = self.client_secret.get_secret_value()


class _Method(ClientAuthMethod):
    name = "client_secret_post"
    fields = ClientSecretFields
    out_fields = ClientSecretOut
    schema_suffix = ""

    def build(self, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> ClientSecretPost:
        return ClientSecretPost(secrets["client_secret"])


METHOD = _Method()
