"""Connector rules: creation under the limit, partial updates, live checks and authorize.

Database transactions are short and never held across an outbound call: a live check runs
between a read and the write, and the write re-checks what the read saw (limit, name, version).

Each change writes its audit event in the write's transaction, so an acknowledged change always
has its event and a rolled-back one has none. A refused attempt on an existing connector is
recorded afterwards in a short transaction of its own. Events name fields, never values.

``authorize`` is the hot path. It answers from the connectors this process holds in memory
(``app.connectors.memory``: organization, version, status, URLs, for Basic the ready header, for
OAuth the encrypted secrets a renewal needs) and from the token cache: in steady state no
database query, no decryption and no outbound call. A connector not held is loaded once, shared
by all who wait for it. Each write made here holds its new copy at once and tells the other
replicas; the change follower (``app.connectors.follower``) brings every other change in within
its interval. While the database is away, what is held keeps being served, renewals included,
until the follower has not heard from the database for ``max_staleness`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection, Coroutine, Hashable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.connectors import schemas
from app.connectors.events import EventRecorder, no_events
from app.connectors.follower import ChangeFollower
from app.connectors.grants import NO_GRANT, GrantFacts, GrantRepository
from app.connectors.kinds import CheckTools, Kind, kind_of
from app.connectors.memory import ConnectorMemory
from app.connectors.misses import Misses
from app.connectors.models import Connector
from app.connectors.preload import Preload
from app.connectors.renewals import GrantKeeper
from app.connectors.repository import ConnectorRepository, StatsRepository
from app.connectors.sealing import SecretSealer
from app.connectors.service.audit import Auditing
from app.connectors.service.authorize import Authorizing
from app.connectors.service.background import Background, ChangeListener
from app.connectors.service.consent import CodeExchanger, Consenting
from app.connectors.service.status import StatusRecorder
from app.connectors.service.validation import Validating, Validation
from app.connectors.service.writes import Writing
from app.connectors.usage import UsageRecorder
from app.core import tracing
from app.core.clock import Clock
from app.core.crypto import KeyRing
from app.core.db import Database
from app.core.errors import ConnectorNotFound, DatabaseUnavailable, UpstreamUnreachable
from app.core.keychecks import KeyChecks
from app.core.metrics import Metrics
from app.core.urls import web_origin
from app.tokens.types import CheckState, CodeExchange, ConfigLoader, IssuedToken, OAuth2Config, TokenGrant

log = logging.getLogger("app.connectors.service")


class DestinationChecker(Protocol):
    """Refuses a URL whose host is, or resolves to, a non-global address."""

    async def __call__(self, url: str) -> None: ...


class Tokens(Protocol):
    """The part of the token cache this service uses."""

    async def get(
        self, key: tuple[Hashable, int], load: ConfigLoader, *, stale_token: str | None = None
    ) -> IssuedToken: ...

    def peek(self, key: tuple[Hashable, int]) -> str | None: ...

    async def seed(
        self, key: tuple[Hashable, int], grant: TokenGrant, *, sent_at: float | None = None
    ) -> None: ...

    def forget(self, connector_id: Hashable) -> None: ...


class ConnectorService(Writing, Authorizing, Validating, Auditing, Consenting):
    def __init__(
        self,
        *,
        db: Database,
        keyring: KeyRing,
        tokens: Tokens,
        checker: CheckTools,
        check_destination: DestinationChecker,
        clock: Clock,
        max_per_org: int,
        held_capacity: int = 100_000,
        max_staleness: float = 300.0,
        poll_interval: float = 1.0,
        validate_interval: float = 10.0,
        on_change: ChangeListener | None = None,
        key_checks: KeyChecks | None = None,
        record_event: EventRecorder = no_events,
        status: StatusRecorder | None = None,
        exchange_code: CodeExchanger | None = None,
        callback_url: str = "http://127.0.0.1:8000/oauth/callback",
        return_origins: Collection[str] = (),
        preload: bool = False,
        preload_ready_wait: float = 0.0,
    ) -> None:
        """``key_checks`` checks private keys in full off the event loop (one worker process
        made on first use when not given); ``record_event`` is told of every change.

        ``status`` is the recorder of token requests' outcomes that the token cache was given
        (``status_recorder`` builds it, with the memory this service then shares); without one,
        the service makes its own (``record_outcome`` then reaches it).

        Authorization code connectors: ``exchange_code`` exchanges a consent's code for tokens,
        ``callback_url`` is the redirect URI the provider sends the browser back to, and
        ``return_origins`` are the origins (besides the callback's own) a consent may send the
        browser back to afterwards.

        ``preload``: fill the memory once started (``app.connectors.preload``), and note which
        connectors are called, for the next process's preload; ``preload_ready_wait``: until the
        connectors called lately are held, but at most this many seconds after the start,
        ``starting`` says the process is not yet worth routing to."""
        self.db = db
        self.key_checks = key_checks or KeyChecks()
        # Writes the event of each change in the change's transaction (app.connectors.events).
        self.record_event = record_event
        self.keyring = keyring
        self.sealer = SecretSealer(keyring)
        self.grants = GrantKeeper(db, self.sealer, clock)
        self.exchange_code = exchange_code or _no_exchange
        self.callback_url = callback_url
        self.return_origins = frozenset({web_origin(callback_url), *return_origins})
        self.tokens = tokens
        # What kinds' live checks use (app.tokens.check.LiveChecker).
        self.checker = checker
        self.check_destination = check_destination
        self.clock = clock
        self.max_per_org = max_per_org
        # How long after the follower last heard from the database what is held is still served.
        self.max_staleness = max_staleness
        if status is None:
            status = status_recorder(
                db=db,
                clock=clock,
                held_capacity=held_capacity,
                on_change=on_change,
                record_event=record_event,
            )
        self.status = status
        self.memory = status.memory
        self.misses = Misses(self._rows)
        # Which connectors are called, for the next process's preload: kept where preload is on.
        self.usage = UsageRecorder(db, clock) if preload else None
        # Fills the memory at the start, those called lately first (app.connectors.preload).
        self.preloader: Preload | None = None
        if preload:
            self.preloader = Preload(db, self.memory, self.held_from, clock, ready_wait=preload_ready_wait)
        # Status writes, change notices (on_change: the other replicas) and checks under way.
        self.background = status.background
        self.follower = ChangeFollower(
            db,
            clock=clock,
            interval=poll_interval,
            select=self._changed,
            apply=self._refresh,
            held=self._held_keys,
            reached=status.write_unwritten,
        )
        # POST /validate: at most one live check per connector version per interval; the checks
        # under way here, shared by every caller asking meanwhile, and how many have ended.
        self.validate_interval = validate_interval
        self._validations: dict[tuple[str, uuid.UUID, int], asyncio.Future[Validation | None]] = {}
        self._validations_ended = 0

    # Reads -------------------------------------------------------------------------------------

    async def list(self, organization_id: str) -> schemas.ConnectorList:
        async with self.db.read() as session:
            rows = await ConnectorRepository(session).list(organization_id)
            facts = await self._grant_facts(session, organization_id, rows)
        items = [self.to_out(row, facts.get(row.id)) for row in rows]
        return schemas.ConnectorList(items=items, limit=self.max_per_org)

    async def get(self, organization_id: str, connector_id: uuid.UUID) -> schemas.Connector:
        async with self.db.read() as session:
            row = await self._require(ConnectorRepository(session), organization_id, connector_id)
            facts = await self._grant_facts(session, organization_id, [row])
        return self.to_out(row, facts.get(row.id))

    async def count_by_state(self) -> dict[str, int]:
        """Connectors of every organization per status state, for the operators' metrics."""
        async with self.db.read() as session:
            return await StatsRepository(session).count_by_state()

    # Running it ---------------------------------------------------------------------------------

    def background_work(self) -> tuple[Coroutine[Any, Any, None], ...]:
        """What runs beside the requests until cancelled: following the changes made elsewhere,
        pruning the change log, writing which connectors are called, and filling the memory at the
        start (which then ends)."""
        work = (self.follower.run(), self.follower.prune())
        if self.usage is None or self.preloader is None:
            return work
        return (*work, self.usage.run(), self.preloader.rest())

    def changes_announced(self) -> None:
        """Another replica announced a change (or notices may have been missed): read the
        changes now."""
        self.follower.wake()

    def starting(self) -> str | None:
        """Why this process is not yet worth routing to (``/readyz``), or None: with preload on, it
        is loading the connectors called lately, for at most ``preload_ready_wait`` seconds."""
        return self.preloader.starting() if self.preloader is not None else None

    async def readiness(self) -> float | None:
        """None when the database answers; else how many seconds what is held may still be
        served from memory (0 or less: no longer)."""
        try:
            await self.db.ping()
        except DatabaseUnavailable:
            return self.max_staleness - self.follower.age()
        return None

    def observe(self, metrics: Metrics) -> None:
        """Set the gauges of what this process holds and how current it is."""
        metrics.held.set(len(self.memory))
        metrics.follower_age.set(min(self.follower.age(), 1e9))
        metrics.database_up.set(1 if self.db.available else 0)

    # Helpers -----------------------------------------------------------------------------------

    def to_out(self, row: Connector, grant: GrantFacts | None = None) -> schemas.Connector:
        """The connector as read; ``grant``: what reads show of its grant, for a kind that needs
        consent (none given: it has none)."""
        kind = kind_of(row.auth_type, row.grant_type)
        auth = kind.read_model(row.auth_config, row.secrets)
        if kind.needs_consent:
            grant = grant or NO_GRANT
            auth.update(
                redirect_uri=self.callback_url,
                has_refresh_token=grant.has_refresh_token,
                connected_at=grant.connected_at,
                granted_scope=grant.granted_scope,
            )
        return schemas.Connector.model_validate(
            {
                "id": row.id,
                "name": row.name,
                "resource_domain_url": row.resource_domain_url,
                "auth": auth,
                "status": {
                    "state": row.status_state,
                    "checked_at": row.status_checked_at,
                    "detail": row.status_detail,
                },
                "version": row.version,
                "created_at": row.created_at,
                "updated_at": row.updated_at,
            }
        )

    async def _grant_facts(
        self, session: AsyncSession, organization_id: str, rows: Sequence[Connector]
    ) -> dict[uuid.UUID, GrantFacts]:
        ids = [row.id for row in rows if kind_of(row.auth_type, row.grant_type).needs_consent]
        return await GrantRepository(session).facts(organization_id, ids)

    async def _require(
        self, repo: ConnectorRepository, organization_id: str, connector_id: uuid.UUID
    ) -> Connector:
        row = await repo.get(organization_id, connector_id)
        if row is None:
            raise ConnectorNotFound()
        return row

    async def _live_check(
        self,
        kind: Kind,
        public: Mapping[str, Any],
        secrets: Mapping[str, SecretStr],
        *,
        connector_id: uuid.UUID | None = None,
    ) -> TokenGrant | None:
        """Check the credentials; the check's span names ``connector_id`` (none before a create)."""
        if connector_id is None:
            return await kind.check(self.checker, public, secrets)
        with tracing.for_connector(connector_id):
            return await kind.check(self.checker, public, secrets)

    async def aclose(self) -> None:
        """Stop loads; wait for status writes and change notices still under way."""
        await self.memory.aclose()
        await self.misses.aclose()
        if self.usage is not None:
            # What was noted since the last write: the next process loads these first.
            await self.usage.flush()
        await self.grants.aclose()
        await self.background.drain()
        self.key_checks.close()

    async def record_outcome(self, key: Hashable, state: CheckState, detail: str | None) -> None:
        """A token request's outcome (``StatusRecorder.record_outcome``)."""
        await self.status.record_outcome(key, state, detail)


async def _no_exchange(config: OAuth2Config, exchange: CodeExchange) -> TokenGrant:
    raise UpstreamUnreachable("this service was built without a token client")


def status_recorder(
    *,
    db: Database,
    clock: Clock,
    held_capacity: int = 100_000,
    on_change: ChangeListener | None = None,
    record_event: EventRecorder = no_events,
) -> StatusRecorder:
    """The recorder of token requests' outcomes, with the memory of held connectors it and the
    service share: built first, so that the token cache can be given ``record_outcome``."""
    return StatusRecorder(
        db=db,
        memory=ConnectorMemory(held_capacity),
        clock=clock,
        record_event=record_event,
        background=Background(on_change),
    )
