"""Connecting an authorization code connector: starting a consent and finishing it at the callback.

``start_consent`` stores a consent (its state's SHA-256, the PKCE verifier sealed, the connector's
version, where to send the browser back) and answers the provider's authorization URL.
``finish_consent`` takes that consent out by the state the provider sent back (so a state
finishes one consent at most, on whichever replica the browser reaches), checks it, exchanges
the code, and only then replaces the grant and marks the connector ``authorized``: any failure on
the way changes nothing stored (a reconnect keeps the old grant). Neither the code nor the state
is ever logged, recorded or put in an error.

A part of ``ConnectorService`` (``Consenting``): what it needs of the rest of the service is
``_Service``.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.schemas import SUCCEEDED, AuditAction
from app.connectors.events import EventRecorder
from app.connectors.grants import ConsentRepository, GrantRepository, seal_grant
from app.connectors.kinds import kind_of
from app.connectors.models import Connector, ConsentRequest
from app.connectors.renewals import GrantKeeper
from app.connectors.repository import ConnectorRepository
from app.connectors.sealing import SecretSealer
from app.connectors.service.payloads import status_data
from app.core.clock import Clock
from app.core.db import Database
from app.core.errors import AppError, CredentialsRejected, InvalidRequest, WrongGrantType
from app.core.urls import URLRuleError, normalise_endpoint_url, origin_of, web_origin
from app.tokens.consent import Pkce, authorization_request_url, new_state, state_digest
from app.tokens.types import CodeExchange, OAuth2Config, TokenGrant

if TYPE_CHECKING:
    from app.connectors.service.core import Tokens

__all__ = ["CONSENT_TTL", "OUTCOME_WORDS", "CodeExchanger", "ConsentOutcome", "ConsentStart", "Consenting"]

log = logging.getLogger("app.connectors.service")

# Exchanges an authorization code for tokens (``OAuth2TokenClient.exchange_code``).
CodeExchanger = Callable[[OAuth2Config, CodeExchange], Awaitable[TokenGrant]]

# How long a started consent may be finished.
CONSENT_TTL: Final = timedelta(minutes=10)
# Consents of one connector open at once; more are refused until some finish or expire.
MAX_OPEN_CONSENTS: Final = 20

# Why a callback did not connect, in words an admin understands; the keys are the ``error``
# the browser is sent back with.
OUTCOME_WORDS: Final = {
    "invalid_request": "The provider's answer was incomplete. Start connecting again.",
    "other_browser": (
        "This consent was started in another browser. Start connecting again from the connector's page."
    ),
    "unknown_state": (
        "This sign-in link is unknown or was already used. Start connecting again from the connector."
    ),
    "expired_state": "More than 10 minutes passed since connecting started. Start connecting again.",
    "access_denied": "Access was not granted at the provider. Nothing changed.",
    "provider_error": "The provider reported an error and granted nothing. Start connecting again.",
    "wrong_issuer": (
        "The answer came from another authorization server than the connector's. Nothing changed."
    ),
    "connector_changed": ("The connector was changed or deleted while connecting. Start connecting again."),
    "code_rejected": (
        "The provider refused to exchange the sign-in for tokens (check the client id, the client "
        "authentication and the redirect URI registered at the provider)."
    ),
    "upstream_failed": "The provider's token endpoint could not be reached. Try again.",
    "database_unavailable": "The service's database is unavailable. Try again in a moment.",
}


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentStart:
    authorization_url: str
    expires_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentOutcome:
    """Where the browser goes: ``error`` None means connected."""

    error: str | None
    connector_id: uuid.UUID | None = None
    return_url: str | None = None

    @property
    def words(self) -> str:
        if self.error is None:
            return "The account is connected. You can close this tab."
        return OUTCOME_WORDS.get(self.error, OUTCOME_WORDS["provider_error"])


class _Service(Protocol):
    db: Database
    clock: Clock
    sealer: SecretSealer
    tokens: Tokens
    exchange_code: CodeExchanger
    grants: GrantKeeper
    record_event: EventRecorder
    callback_url: str
    return_origins: frozenset[str]

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector: ...

    async def _audit(
        self,
        session: AsyncSession,
        organization_id: str,
        connector_id: uuid.UUID,
        action: AuditAction,
        actor: str | None,
        changed_fields: Sequence[str],
        outcome: str,
        *,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None: ...

    def _changed_here(self, row: Connector) -> None: ...

    def _return_url_allowed(self, url: str) -> bool: ...

    async def _exchange(self, row: Connector, code: str, verifier: str) -> TokenGrant: ...

    async def _connect(
        self, request: ConsentRequest, row: Connector, answer: TokenGrant, sent_at: float
    ) -> ConsentOutcome: ...

    async def _record_outcome(self, request: ConsentRequest, error: str) -> None: ...


class Consenting:
    async def start_consent(
        self: _Service,
        organization_id: str,
        connector_id: uuid.UUID,
        *,
        return_url: str | None,
        actor: str | None = None,
        binding: str | None = None,
    ) -> ConsentStart:
        """``binding``: a value the starting browser keeps (a cookie) and the callback must bring."""
        if return_url is not None and not self._return_url_allowed(return_url):
            raise InvalidRequest(
                errors=[
                    {"field": "return_url", "reason": "its origin is not among the allowed return origins"}
                ]
            )
        now = self.clock.now()
        expires_at = now + CONSENT_TTL
        async with self.db.write() as session:
            row = await self._require(ConnectorRepository(session), organization_id, connector_id)
            kind = kind_of(row.auth_type, row.grant_type)
            if not kind.needs_consent:
                raise WrongGrantType("only authorization code connectors are connected by consent")
            consents = ConsentRepository(session)
            # Consents nobody finished are dropped once expired (of every connector: they are few).
            await consents.prune(now)
            if await consents.count_open(organization_id, connector_id, now) >= MAX_OPEN_CONSENTS:
                raise InvalidRequest(
                    f"at most {MAX_OPEN_CONSENTS} consents of a connector may be open at once"
                )
            state, pkce = new_state(), Pkce.new()
            sealed = self.sealer.seal(
                organization_id, connector_id, {"code_verifier": SecretStr(pkce.verifier)}
            )
            consents.add(
                ConsentRequest(
                    state_hash=state_digest(state),
                    organization_id=organization_id,
                    connector_id=connector_id,
                    connector_version=row.version,
                    code_verifier=sealed["code_verifier"],
                    key_id=self.sealer.keyring.primary_key_id,
                    return_url=return_url,
                    actor=actor,
                    binding_hash=state_digest(binding) if binding is not None else None,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            await self._audit(session, organization_id, connector_id, "consent", actor, [], SUCCEEDED, at=now)
        url = authorization_request_url(
            row.auth_config["authorization_url"],
            client_id=row.auth_config["client_id"],
            redirect_uri=self.callback_url,
            scope=row.auth_config.get("scope"),
            state=state,
            code_challenge=pkce.challenge,
            extra=row.auth_config.get("extra_authorization_params") or {},
        )
        return ConsentStart(authorization_url=url, expires_at=expires_at)

    def _return_url_allowed(self: _Service, url: str) -> bool:
        try:
            origin = web_origin(url)
        except ValueError:
            return False
        return origin in self.return_origins

    async def finish_consent(
        self: _Service,
        *,
        state: str | None,
        code: str | None,
        error: str | None,
        issuer: str | None,
        binding: str | None = None,
    ) -> ConsentOutcome:
        """The callback's answer; never raises for what the browser brought."""
        if not state:
            return ConsentOutcome("invalid_request")
        now = self.clock.now()
        try:
            async with self.db.write() as session:
                request = await ConsentRepository(session).take(state_digest(state))
                row = None
                if request is not None:
                    row = await ConnectorRepository(session).get(
                        request.organization_id, request.connector_id
                    )
        except AppError:
            return ConsentOutcome("database_unavailable")
        if request is None:
            return ConsentOutcome("unknown_state")
        failure = _failure(request, row, now, code=code, error=error, issuer=issuer)
        if (
            failure is None
            and request.binding_hash is not None
            and (binding is None or not hmac.compare_digest(state_digest(binding), request.binding_hash))
        ):
            # Started in one browser, finished in another: a consent link sent to (or stolen
            # from) someone else connects nothing.
            failure = "other_browser"
        if failure is not None:
            await self._record_outcome(request, failure)
            return ConsentOutcome(failure, request.connector_id, request.return_url)
        assert row is not None and code is not None
        try:
            verifier = self.sealer.open(
                request.organization_id, request.connector_id, {"code_verifier": request.code_verifier}
            )
        except AppError:
            await self._record_outcome(request, "unknown_state")
            return ConsentOutcome("unknown_state", request.connector_id, request.return_url)
        sent_at = self.clock.monotonic()
        try:
            answer = await self._exchange(row, code, verifier["code_verifier"].get_secret_value())
        except CredentialsRejected:
            await self._record_outcome(request, "code_rejected")
            return ConsentOutcome("code_rejected", request.connector_id, request.return_url)
        except AppError as failed:
            log.warning(
                "a consent's code exchange failed",
                extra={"connector": str(request.connector_id), "error": failed.code},
            )
            await self._record_outcome(request, "upstream_failed")
            return ConsentOutcome("upstream_failed", request.connector_id, request.return_url)
        return await self._connect(request, row, answer, sent_at)

    async def _exchange(self: _Service, row: Connector, code: str, verifier: str) -> TokenGrant:
        kind = kind_of(row.auth_type, row.grant_type)
        secrets = self.sealer.open_row(row)
        config = kind.token_config(row.auth_config, secrets)
        return await self.exchange_code(
            config, CodeExchange(code=code, code_verifier=verifier, redirect_uri=self.callback_url)
        )

    async def _connect(
        self: _Service, request: ConsentRequest, row: Connector, answer: TokenGrant, sent_at: float
    ) -> ConsentOutcome:
        organization_id, connector_id = request.organization_id, request.connector_id
        now = self.clock.now()
        grant = seal_grant(self.sealer, organization_id, connector_id, answer, scope=answer.scope, now=now)
        try:
            async with self.db.write() as session:
                repo = ConnectorRepository(session)
                # Only the version the consent was started for: a change since then, made while
                # the code was exchanged or before, means the grant is for what the connector was.
                # A new grant is a new version: every replica's tokens of the old one go (their
                # cache is keyed by version), a renewal of the old grant can report nothing about
                # the new one, and a write prepared against the old version is refused.
                applied = await repo.update(
                    organization_id,
                    connector_id,
                    request.connector_version,
                    {
                        "version": request.connector_version + 1,
                        "status_state": "authorized",
                        "status_detail": None,
                        "status_checked_at": now,
                        "updated_at": now,
                    },
                )
                failure: str | None = None if applied else "connector_changed"
                if applied:
                    await GrantRepository(session).replace(grant)
                    updated = await self._require(repo, organization_id, connector_id)
                    await self._audit(
                        session,
                        organization_id,
                        connector_id,
                        "connect",
                        request.actor,
                        [],
                        SUCCEEDED,
                        at=now,
                    )
                    if row.status_state != "authorized":
                        status = status_data(updated, row.status_state, None, now)
                        await self.record_event(
                            session, organization_id, "connector.status_changed", status, at=now
                        )
                    await repo.record_change(organization_id, connector_id, now, row=updated)
        except AppError:
            return ConsentOutcome("database_unavailable", connector_id, request.return_url)
        if failure is not None:
            await self._record_outcome(request, failure)
            return ConsentOutcome(failure, connector_id, request.return_url)
        # The old grant's tokens (and a consent_required the cache holds) are gone; the new
        # access token is handed out from now on, here and (through Redis) on every replica.
        self.grants.forget(connector_id)
        self.tokens.forget(connector_id)
        self._changed_here(updated)
        await self.tokens.seed(
            (connector_id, updated.version), dataclasses.replace(answer, refresh_token=None), sent_at=sent_at
        )
        return ConsentOutcome(None, connector_id, request.return_url)

    async def _record_outcome(self: _Service, request: ConsentRequest, error: str) -> None:
        """A consent that did not connect: its audit event, in a transaction of its own."""
        try:
            async with self.db.write() as session:
                if (
                    await ConnectorRepository(session).get(request.organization_id, request.connector_id)
                    is None
                ):
                    return
                await self._audit(
                    session,
                    request.organization_id,
                    request.connector_id,
                    "connect",
                    request.actor,
                    [],
                    error,
                )
        except AppError:
            log.warning(
                "could not record a consent's outcome", extra={"connector": str(request.connector_id)}
            )


def _failure(
    request: ConsentRequest,
    row: Connector | None,
    now: datetime,
    *,
    code: str | None,
    error: str | None,
    issuer: str | None,
) -> str | None:
    """Why a callback cannot connect, before any request is made; None if it may."""
    if request.expires_at <= now:
        return "expired_state"
    if row is None or row.version != request.connector_version:
        return "connector_changed"
    expected = row.auth_config.get("issuer")
    if (issuer is None and expected) or (issuer is not None and not _issuer_matches(issuer, row.auth_config)):
        # RFC 9207 §2.4: a client that knows the server's issuer refuses an answer without it.
        return "wrong_issuer"
    if error is not None:
        return error if error == "access_denied" else "provider_error"
    if not code:
        return "invalid_request"
    return None


def _issuer_matches(issuer: str, public: dict[str, object]) -> bool:
    """RFC 9207: ``iss`` names the authorization server the request went to: the connector's
    ``issuer`` when it has one, else at least a URL of the authorization endpoint's origin."""
    try:
        received = normalise_endpoint_url(issuer)
    except URLRuleError:
        return False
    expected = public.get("issuer")
    if isinstance(expected, str) and expected:
        return received == expected
    return origin_of(received) == origin_of(str(public["authorization_url"]))
