"""What a connector kind and a client-authentication method are, for the code that uses them.

A kind owns everything particular to one sort of credentials: its input and read models, which
of its fields are secret (the ``SecretStr`` ones), the URLs it calls, the values derived from its
input that reads show (``facts``), its live check, and what authorize hands out: a static
credential (Basic, API keys) or a token configuration (OAuth 2.0). The service, the router and
the token layer only ever call these methods; ``app.connectors.kinds`` registers the kinds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, SecretStr

from app.connectors.kinds.example import BodyExample
from app.tokens.types import OAuth2Config, StaticCredential, TokenGrant


class CheckTools(Protocol):
    """What a live check may do (``app.tokens.check.LiveChecker``)."""

    async def static(self, url: str, credential: StaticCredential) -> None: ...

    async def token(self, config: OAuth2Config) -> TokenGrant: ...


Public = Mapping[str, Any]
Secrets = Mapping[str, SecretStr]


class Kind(ABC):
    """One kind of credentials: the ``type`` tag of ``auth`` and, for kinds with variants (the
    OAuth 2.0 grants), the second tag (``variant_field``, stored as ``grant_type``)."""

    auth_type: ClassVar[str]
    # The prefix of the schema names of this type's unions (``OAuth2`` for ``OAuth2AuthIn``).
    schema_prefix: ClassVar[str]
    variant_field: ClassVar[str | None] = None
    variant: ClassVar[str | None] = None
    # A model, or an annotated union of models, for ``auth`` in creates and as merged by a patch.
    input_model: ClassVar[Any]
    output_model: ClassVar[Any]
    # URL fields: each is a destination checked on save, and a change of one needs the secrets again.
    guarded_urls: ClassVar[tuple[str, ...]] = ()
    # True: authorize asks the token cache with ``token_config``; False: it hands out ``credential``.
    issues_tokens: ClassVar[bool]
    # True: a connector of this kind works only once an admin consented at the provider (the
    # authorization code grant); it starts ``consent_required`` and its tokens come from that grant.
    needs_consent: ClassVar[bool] = False
    # A create of a connector of this kind, as the API document shows it.
    example: ClassVar[BodyExample]

    def tags(self) -> dict[str, str]:
        tags = {"type": self.auth_type}
        if self.variant_field is not None and self.variant is not None:
            tags[self.variant_field] = self.variant
        return tags

    def fill_defaults(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with the fields an input may leave out and that choose a model filled in."""
        return raw

    def location_tags(self) -> dict[str, set[str]]:
        """Discriminator values pydantic inserts into error locations below this kind's tags."""
        return {}

    def split(self, auth: BaseModel) -> tuple[dict[str, Any], dict[str, SecretStr]]:
        """Separate a validated input into what is stored in clear (its facts included) and its
        secrets (every ``SecretStr`` field)."""
        dumped = auth.model_dump(by_alias=True, exclude=set(self.tags()))
        public = {name: value for name, value in dumped.items() if not isinstance(value, SecretStr)}
        secrets = {name: value for name, value in dumped.items() if isinstance(value, SecretStr)}
        public.update(self.facts(auth))
        return public, secrets

    def facts(self, auth: BaseModel) -> dict[str, Any]:
        """Values derived from the input that reads show (a public key, a certificate's expiry)."""
        return {}

    def read_model(self, public: Public, stored_secrets: Mapping[str, object]) -> dict[str, Any]:
        """``auth`` as read: the public fields and facts, and ``has_<name>`` for each secret."""
        flags = {f"has_{name}": True for name in stored_secrets}
        return {**public, **flags, **self.tags()}

    def private_key_fields(self, public: Public) -> tuple[str, ...]:
        """The secret fields of this configuration that hold a private key, to check in full."""
        return ()

    def destinations(self, public: Public) -> list[str]:
        """The URLs this kind calls, checked against the destination policy on save."""
        return [public[name] for name in self.guarded_urls if public.get(name)]

    @abstractmethod
    def checkable(self, public: Public) -> bool:
        """Whether there is anything to check live (an API key may have no validation URL)."""

    @abstractmethod
    async def check(self, tools: CheckTools, public: Public, secrets: Secrets) -> TokenGrant | None:
        """Check the credentials live; the token an OAuth check obtained, else None."""

    def credential(self, public: Public, secrets: Secrets) -> StaticCredential:
        """What authorize hands out for a kind that issues no tokens."""
        raise NotImplementedError(f"{self.auth_type} connectors are authorized with tokens")

    def token_config(self, public: Public, secrets: Secrets) -> OAuth2Config:
        """The token request's configuration, for a kind that issues tokens."""
        raise NotImplementedError(f"{self.auth_type} connectors issue no tokens")


class StaticKind(Kind):
    """Credentials sent as they are; checked by a GET of the validation URL, when there is one."""

    issues_tokens = False

    def validation_url(self, public: Public) -> str | None:
        url = public.get("validation_url")
        return url if isinstance(url, str) else None

    def checkable(self, public: Public) -> bool:
        return self.validation_url(public) is not None

    @abstractmethod
    def credential(self, public: Public, secrets: Secrets) -> StaticCredential: ...

    async def check(self, tools: CheckTools, public: Public, secrets: Secrets) -> TokenGrant | None:
        url = self.validation_url(public)
        if url is not None:
            await tools.static(url, self.credential(public, secrets))
        return None


class TokenKind(Kind):
    """Credentials exchanged for tokens; checked by fetching one (kept for the first authorize)."""

    issues_tokens = True

    def checkable(self, public: Public) -> bool:
        return True

    @abstractmethod
    def token_config(self, public: Public, secrets: Secrets) -> OAuth2Config: ...

    async def check(self, tools: CheckTools, public: Public, secrets: Secrets) -> TokenGrant | None:
        return await tools.token(self.token_config(public, secrets))
