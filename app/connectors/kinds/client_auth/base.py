"""What a client-authentication method of OAuth 2.0 connectors is (RFC 6749 §2.3, RFC 7523,
RFC 8705).

A method owns the fields it adds to an OAuth connector's ``auth`` (``fields``, and ``out_fields``
for reads), the values reads derive from them (``facts``), and the ``ClientAuth`` that applies it
to a token request (``build``). Methods that take the same fields share one model, whose
``client_auth_method`` accepts each of their names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, SecretStr

from app.connectors.kinds.example import BodyExample
from app.tokens.types import ClientAuth


class ClientAuthMethod(ABC):
    name: ClassVar[str]
    # The input fields the method adds (besides ``client_auth_method``), and those reads show.
    fields: ClassVar[type[BaseModel]]
    out_fields: ClassVar[type[BaseModel]]
    # Appended to the schema names of the models built with ``fields`` ("" for the client secret).
    schema_suffix: ClassVar[str]
    # The method of an OAuth connector that names none.
    default: ClassVar[bool] = False
    # A create of an OAuth 2.0 connector authenticating this way, for methods with fields of
    # their own (the others are shown by the grants' examples).
    example: ClassVar[BodyExample | None] = None
    # Secret fields holding a private key: the fields' validators check it cheaply, and the
    # service has its numbers checked in full off the event loop (``app.core.keychecks``).
    private_key_fields: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def build(self, public: Mapping[str, Any], secrets: Mapping[str, SecretStr]) -> ClientAuth:
        """The method, with its material, for the token requests of one configuration."""

    def facts(self, auth: BaseModel) -> dict[str, Any]:
        """Values derived from the input that reads show."""
        return {}
