"""The :class:`TokenCache`: one entry per connector version, the hot path, and the flights.

How long a token is handed out and when it is renewed ahead is :mod:`app.tokens.cache.schedule`;
how entries are keyed and bounded is told in the package docstring.

Single flight
    Each entry has at most one token request running, as one asyncio task that every waiting
    caller awaits through ``asyncio.shield``: a caller that is cancelled (its client went away)
    stops waiting without cancelling the request for the others, and the result is stored even
    when nobody waits for it any more. The outcome listener is awaited inside that task, after the
    entry is updated, so outcomes of one connector are reported in the order they happened.

Refresh tokens
    When a response carries a ``refresh_token``, the next renewal sends it instead of running the
    configured grant again. A refresh token is taken out of the entry the moment it is about to be
    sent, so it is never sent twice after a failure: after a timeout or any other ambiguous
    failure the provider may or may not have rotated it, and the next renewal runs the original
    grant. RFC 6749 section 6 lets a provider answer a refresh without a new refresh token, meaning
    the old one stays valid; that old one is kept, and sent again later, only after the provider
    accepted it. ``RefreshTokenRejected`` makes the same flight run the original grant at once;
    only that grant's outcome is reported, since a refused refresh token says nothing about the
    connector's credentials.

Failures
    ``CredentialsRejected`` is sticky: the entry drops its tokens and every ``get`` raises the same
    error at once, without a token request, until ``forget`` (the connector was changed or checked
    again). A password grant retried in a loop locks the service account at many providers.
    ``ConsentRequired`` (an authorization code connector's grant is gone) is sticky the same way,
    and reported as ``consent_required``.

    Any other ``AppError`` is transient. The callers of the failed flight all get the error; until
    the backoff has passed, later callers get the same error at once (or the cached token while
    one is still usable) and no request is made; then one caller's flight tries again. The backoff
    starts at ``retry_backoff_initial``, doubles with each consecutive failure up to
    ``retry_backoff_max`` and resets on success. Waiting is a comparison with the clock, never a
    sleep. A token that has already expired when its response arrives counts as a transient
    ``TokenEndpointError`` (reported as ``authorized``: the credentials were accepted). An
    exception from the fetcher that is not an ``AppError`` is a bug or an unforeseen
    network failure: it is logged with its traceback, counted as a transient failure and raised
    to callers as ``UpstreamUnreachable``, so it neither poisons the entry nor surfaces as a 500.

    An error raised by ``load`` reaches the flight's callers unchanged and is not reported: no
    token request was made. It only keeps background renewals from loading again for
    ``retry_backoff_initial``; a caller without a usable token tries at once. A failed background
    renewal never takes away a usable token.

Secrets
    ``load`` (decryption of the stored secrets) runs only when a token request is about to be sent,
    and the configuration it returns lives only for that request: entries hold the access token,
    the refresh token and timestamps, never the client secret or password. Errors kept for replay
    are copies without traceback, whose frames would otherwise keep the configuration alive.

Replicas
    With a ``SharedTokenStore`` (Redis), a flight first looks for a token another replica got and
    takes it over if it is not yet due for renewal here (its expiry crosses replicas as wall-clock
    time); otherwise it takes the replicas' lock, looks once more, and makes the request, taking
    the refresh token from the store so that no two replicas ever send the same one. The result,
    or the failure with its backoff, goes back to the store for the others. Refresh tokens then
    live only in the store: when Redis is unavailable, a replica runs the configured grant rather
    than send a refresh token another replica may already have used. The hot path is unchanged;
    see ``app.tokens.shared`` for the guarantee and its limits.

What the owner must know
    ``load`` may run in the background after the caller that supplied it has returned, so it must
    not depend on that caller's request-scoped resources. Outcomes carry the full key, version
    included, and may arrive for a version that is no longer current. The cache serves one event
    loop.

The hot path, a warm hit, is one dict lookup, one monotonic clock reading, a few comparisons and
one counter increment (``app.core.metrics``): no task, no await that suspends, no logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Hashable
from datetime import timedelta

from app.core import tracing
from app.core.clock import Clock
from app.core.errors import (
    ERROR_CLASSES,
    AppError,
    ConsentRequired,
    CredentialsRejected,
    TokenEndpointError,
    UpstreamUnreachable,
)
from app.core.lru import LRU
from app.core.metrics import Metrics
from app.tokens.cache.entries import _NEVER, CacheKey, _detached, _Entry, _running, _Token
from app.tokens.cache.schedule import token_schedule
from app.tokens.shared import SharedFailure, SharedToken, SharedTokenStore, SharedUnavailable
from app.tokens.types import (
    CheckState,
    ConfigLoader,
    IssuedToken,
    OAuth2Config,
    OutcomeListener,
    RefreshTokenRejected,
    TokenFetcher,
    TokenGrant,
)

# The package's name: log lines keep the logger name they have always had.
log = logging.getLogger("app.tokens.cache")


class TokenCache:
    """Hands out OAuth access tokens per connector version; see the module docstring."""

    def __init__(
        self,
        fetcher: TokenFetcher,
        *,
        clock: Clock,
        on_outcome: OutcomeListener | None = None,
        retry_backoff_initial: float = 1.0,
        retry_backoff_max: float = 60.0,
        stale_min_age: float = 5.0,
        shared: SharedTokenStore | None = None,
        metrics: Metrics | None = None,
        capacity: int = 100_000,
    ) -> None:
        if not 0 < retry_backoff_initial <= retry_backoff_max:
            raise ValueError("need 0 < retry_backoff_initial <= retry_backoff_max")
        self._fetcher = fetcher
        self._clock = clock
        self._on_outcome = on_outcome
        self._backoff_initial = retry_backoff_initial
        self._backoff_max = retry_backoff_max
        # One entry per connector; the least recently used goes first when the cache is full.
        # An entry with a token request under way is not evicted: a second request for the same
        # connector could start beside it, and a refresh token taken out for it would be lost.
        self._entries: LRU[Hashable, _Entry] = LRU(
            capacity,
            on_evict=lambda _key, entry: self._retire(entry),
            busy=lambda entry: _running(entry) is not None,
        )
        self._outdated: dict[CacheKey, _Entry] = {}
        self._tasks: set[asyncio.Task[IssuedToken]] = set()
        self._closed = False
        self._shared = shared
        # A token reported refused is dropped only if it is at least this old: a report about a
        # token that just arrived most likely concerns the one before it, and a stream of late
        # reports must not become a stream of token requests.
        self._stale_min_age = stale_min_age
        metrics = metrics or Metrics()
        self._hits = metrics.token_cache_hits
        self._misses = metrics.token_cache_misses
        self._waits = metrics.token_single_flight_waits

    async def get(self, key: CacheKey, load: ConfigLoader, *, stale_token: str | None = None) -> IssuedToken:
        """A token usable now for ``key``; ``stale_token`` is one the resource refused.

        ``load`` is called only when a token request is about to be sent, possibly after this
        call has returned (for a background renewal).
        """
        entry = self._entries.get(key[0])
        if entry is not None and stale_token is None and entry.version == key[1]:
            token = entry.token
            if token is not None and self._clock.monotonic() < token.refresh_at:
                self._hits.inc()
                return token.issued
        return await self._get_slow(key, load, stale_token)

    def peek(self, key: CacheKey) -> str | None:
        """The access token ``get`` would hand out for ``key`` right now, without any request."""
        entry = self._entries.peek(key[0])
        if entry is None or entry.version != key[1] or entry.token is None:
            return None
        if self._clock.monotonic() < entry.token.usable_until:
            return entry.token.issued.access_token
        return None

    async def seed(self, key: CacheKey, grant: TokenGrant, *, sent_at: float | None = None) -> None:
        """Store a token obtained elsewhere, such as by the live check when a connector is saved.

        ``sent_at`` is the ``clock.monotonic()`` reading taken when that request was sent; without
        it the token is assumed to have been requested just now. A successful check also clears a
        rejection and any backoff of that version. A grant for an outdated version is ignored.
        """
        entry = self._current_entry(key)
        if entry is None:
            return
        sent_at = self._clock.monotonic() if sent_at is None else sent_at
        self._store(entry, grant, sent_at, None)
        self._succeeded(entry)
        entry.rejected = None
        if self._shared is not None:
            # The other replicas take this token over, and forget a failure they shared.
            refresh_token, entry.refresh_token = entry.refresh_token, None
            wall_sent_at = self._clock.now().timestamp() - (self._clock.monotonic() - sent_at)
            with contextlib.suppress(SharedUnavailable):
                await self._shared.publish_token(
                    key, SharedToken(grant.access_token, grant.expires_in, wall_sent_at), refresh_token
                )

    def forget(self, connector_id: Hashable) -> None:
        """Drop every entry of the connector, its rejection and backoff included."""
        entry = self._entries.pop(connector_id)
        if entry is not None:
            self._retire(entry)

    async def aclose(self) -> None:
        """Cancel and await every token request; the cache cannot be used afterwards."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        self._outdated.clear()

    # The slow path -----------------------------------------------------------------------------

    async def _get_slow(self, key: CacheKey, load: ConfigLoader, stale_token: str | None) -> IssuedToken:
        entry = self._current_entry(key)
        if entry is None:
            self._misses.inc()
            return await self._get_outdated(key, load)
        if entry.rejected is not None:
            self._misses.inc()
            raise _detached(entry.rejected)
        token = entry.token
        now = self._clock.monotonic()
        if (
            token is not None
            and stale_token is not None
            and token.issued.access_token == stale_token
            and now - token.received_at >= self._stale_min_age
        ):
            entry.token = token = None
            entry.stale = stale_token
        if token is not None and now < token.usable_until:
            if (
                now >= token.refresh_at
                and _running(entry) is None
                and now >= entry.retry_at
                and not self._closed
            ):
                self._start_flight(key, entry, load)
            self._hits.inc()
            return token.issued
        self._misses.inc()
        flight = _running(entry)
        if flight is not None:
            self._waits.inc()
            return await self._join(entry, flight)
        if entry.failure is not None and now < entry.retry_at:
            raise _detached(entry.failure)
        return await self._join(entry, self._start_flight(key, entry, load))

    def _current_entry(self, key: CacheKey) -> _Entry | None:
        """The entry of ``key``, created if needed; None when a newer version has been seen."""
        connector_id, version = key
        entry = self._entries.get(connector_id)
        if entry is not None and entry.version == version:
            return entry
        if entry is not None and entry.version > version:
            return None
        if entry is not None:
            self._retire(entry)
        entry = _Entry(version)
        self._entries.put(connector_id, entry)
        return entry

    async def _get_outdated(self, key: CacheKey, load: ConfigLoader) -> IssuedToken:
        entry = self._outdated.get(key)
        flight = _running(entry) if entry is not None else None
        if entry is not None and flight is not None:
            self._waits.inc()
            return await self._join(entry, flight)
        entry = self._outdated[key] = _Entry(key[1])
        return await self._join(entry, self._start_flight(key, entry, load))

    def _retire(self, entry: _Entry) -> None:
        """Forget an entry's tokens and stop its background renewal; awaited requests finish."""
        if entry.flight is not None and not entry.joined:
            entry.flight.cancel()
        entry.token = None
        entry.refresh_token = None

    # Flights -----------------------------------------------------------------------------------

    def _start_flight(self, key: CacheKey, entry: _Entry, load: ConfigLoader) -> asyncio.Task[IssuedToken]:
        if self._closed:
            raise RuntimeError("the token cache is closed")
        flight = asyncio.create_task(self._renew(key, entry, load), name=f"token request {key!r}")
        entry.flight = flight
        self._tasks.add(flight)
        flight.add_done_callback(functools.partial(self._flight_done, key, entry))
        return flight

    def _flight_done(self, key: CacheKey, entry: _Entry, flight: asyncio.Task[IssuedToken]) -> None:
        self._tasks.discard(flight)
        if entry.flight is flight:
            entry.flight = None
            entry.joined = False
        if self._outdated.get(key) is entry:
            del self._outdated[key]
        if not flight.cancelled():
            # Retrieve it, so a background renewal's failure is never reported as unretrieved;
            # it was already logged and given to the outcome listener.
            flight.exception()

    async def _join(self, entry: _Entry, flight: asyncio.Task[IssuedToken]) -> IssuedToken:
        entry.joined = True
        try:
            return await asyncio.shield(flight)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.cancelled() and (current is None or current.cancelling() == 0):
                # The request was stopped (shutdown) while this caller, not cancelled, waited.
                raise UpstreamUnreachable("The token request was cancelled") from None
            raise

    async def _renew(self, key: CacheKey, entry: _Entry, load: ConfigLoader) -> IssuedToken:
        """Run one flight: through the replicas' shared store when there is one, else alone."""
        # Its spans (Redis commands, the token request, status writes) name the connector.
        with tracing.for_connector(key[0]):
            if self._shared is not None and self._shared.available():
                try:
                    return await self._renew_shared(self._shared, key, entry, load)
                except SharedUnavailable:
                    pass
            refresh_token, entry.refresh_token = entry.refresh_token, None
            return await self._renew_alone(key, entry, load, refresh_token, None)

    async def _renew_shared(
        self, shared: SharedTokenStore, key: CacheKey, entry: _Entry, load: ConfigLoader
    ) -> IssuedToken:
        """Take over a token another replica got, or get one under the replicas' lock."""
        waited = False
        while True:
            token, failure = await shared.read(key)
            adopted = self._adopt(entry, token)
            if adopted is not None:
                return adopted
            if failure is not None:
                raise self._adopt_failure(entry, failure)
            owner = await shared.try_lock(key)
            if owner is None:
                # Another replica is asking; its answer appears in the store, or its lock
                # expires (at most lock_timeout, if it died) and this replica asks instead.
                if not waited:
                    self._waits.inc()
                    waited = True
                await shared.sleep(shared.poll_interval)
                continue
            try:
                token, failure = await shared.read(key)
                adopted = self._adopt(entry, token)
                if adopted is not None:
                    return adopted
                refresh_token = await shared.take_refresh_token(key)
                # Redis failing from here on must not lead to a second request: the rest of
                # this flight no longer raises SharedUnavailable.
                return await self._renew_alone(key, entry, load, refresh_token, shared)
            finally:
                with contextlib.suppress(SharedUnavailable):
                    await shared.release(key, owner)

    def _adopt(self, entry: _Entry, shared: SharedToken | None) -> IssuedToken | None:
        """Use a token from the shared store if it is not yet due for renewal here."""
        if shared is None or shared.access_token == entry.stale:
            return None
        now = self._clock.monotonic()
        sent_at = now - (self._clock.now().timestamp() - shared.sent_at)
        usable_until, refresh_at = token_schedule(shared.expires_in, sent_at)
        if now >= refresh_at:
            return None
        expires_at = self._clock.now() + timedelta(seconds=usable_until - now)
        entry.token = _Token(IssuedToken(shared.access_token, expires_at), usable_until, refresh_at, now)
        self._succeeded(entry)
        return entry.token.issued

    def _adopt_failure(self, entry: _Entry, failure: SharedFailure) -> AppError:
        """The error another replica got, kept for its backoff: answered here without a request."""
        cls = ERROR_CLASSES.get(failure.code, UpstreamUnreachable)
        error = cls(provider_error=failure.provider_error) if failure.provider_error else cls()
        if failure.rejected:
            # Not sticky here: the replica that was refused keeps the rejection (and records it
            # as the connector's status); this one looks at the shared store again after the
            # backoff, so a validation elsewhere reaches it.
            entry.token = None
        self._failed(entry, error)
        return error

    async def _renew_alone(
        self,
        key: CacheKey,
        entry: _Entry,
        load: ConfigLoader,
        refresh_token: str | None,
        shared: SharedTokenStore | None,
    ) -> IssuedToken:
        """Load the configuration, request a token, update the entry (and the store), report."""
        try:
            config = await load()
        except Exception as error:
            # No request was made, so nothing is reported and callers get the error as it is; a
            # renewal in the background waits a little before loading again.
            log.warning(
                "loading the token configuration failed",
                extra={"key": repr(key), "error": type(error).__name__},
            )
            entry.failure = None
            entry.retry_at = self._clock.monotonic() + self._backoff_initial
            raise
        # The refresh token was taken out before this point: whatever happens, it is not sent again.
        try:
            try:
                grant, sent_at, accepted_refresh = await self._request(config, refresh_token)
            finally:
                del config
        except ConsentRequired as error:
            # An authorization code connector's grant is gone: sticky, as a rejection is, until
            # an admin connects it again (which changes the connector, and so forgets this).
            entry.rejected = _detached(error)
            entry.token = None
            entry.failure = None
            log.warning("token request needs consent", extra={"key": repr(key)})
            await self._share_failure(shared, key, error, rejected=True, ttl=self._backoff_max)
            await self._report(key, "consent_required", None)
            raise
        except CredentialsRejected as error:
            entry.rejected = _detached(error)
            entry.token = None
            entry.failure = None
            log.warning("token request rejected", extra={"key": repr(key), "code": error.code})
            await self._share_failure(shared, key, error, rejected=True, ttl=self._backoff_max)
            await self._report(key, "rejected", error.code)
            raise
        except AppError as error:
            self._failed(entry, error)
            log.warning("token request failed", extra={"key": repr(key), "code": error.code})
            ttl = entry.retry_at - self._clock.monotonic()
            await self._share_failure(shared, key, error, rejected=False, ttl=ttl)
            await self._report(key, "unreachable", error.code)
            raise
        except Exception as error:
            log.exception("token request failed unexpectedly", extra={"key": repr(key)})
            wrapped = UpstreamUnreachable("The token request failed unexpectedly")
            self._failed(entry, wrapped)
            await self._report(key, "unreachable", "unexpected_error")
            raise wrapped from error
        token = self._store(entry, grant, sent_at, accepted_refresh)
        if shared is not None:
            # The refresh token lives in the shared store only, so that no replica can send one
            # that another already used.
            next_refresh, entry.refresh_token = entry.refresh_token, None
            wall_sent_at = self._clock.now().timestamp() - (self._clock.monotonic() - sent_at)
            with contextlib.suppress(SharedUnavailable):
                await shared.publish_token(
                    key, SharedToken(grant.access_token, grant.expires_in, wall_sent_at), next_refresh
                )
        if self._clock.monotonic() < token.usable_until:
            self._succeeded(entry)
            await self._report(key, "authorized", None)
            return token.issued
        # The credentials work, but the token expired before it could be handed out.
        expired = TokenEndpointError("The token endpoint issued a token that expired before it could be used")
        self._failed(entry, expired)
        await self._report(key, "authorized", None)
        raise expired

    async def _request(
        self, config: OAuth2Config, refresh_token: str | None
    ) -> tuple[TokenGrant, float, str | None]:
        """The grant, when its request was sent, and the refresh token the provider accepted."""
        if refresh_token is not None:
            sent_at = self._clock.monotonic()
            try:
                return await self._fetcher(config, refresh_token=refresh_token), sent_at, refresh_token
            except RefreshTokenRejected:
                log.info("refresh token refused; running the configured grant")
        sent_at = self._clock.monotonic()
        return await self._fetcher(config), sent_at, None

    def _store(
        self, entry: _Entry, grant: TokenGrant, sent_at: float, accepted_refresh: str | None
    ) -> _Token:
        usable_until, refresh_at = token_schedule(grant.expires_in, sent_at)
        expires_at = self._clock.now() + timedelta(seconds=usable_until - self._clock.monotonic())
        token = _Token(
            IssuedToken(grant.access_token, expires_at), usable_until, refresh_at, self._clock.monotonic()
        )
        entry.token = token
        entry.refresh_token = grant.refresh_token if grant.refresh_token is not None else accepted_refresh
        return token

    def _succeeded(self, entry: _Entry) -> None:
        entry.failure = None
        entry.failures = 0
        entry.retry_at = _NEVER

    def _failed(self, entry: _Entry, error: AppError) -> None:
        entry.failures += 1
        delay = self._backoff_initial * 2.0 ** min(entry.failures - 1, 32)
        entry.retry_at = self._clock.monotonic() + min(delay, self._backoff_max)
        entry.failure = _detached(error)

    async def _share_failure(
        self, shared: SharedTokenStore | None, key: CacheKey, error: AppError, *, rejected: bool, ttl: float
    ) -> None:
        if shared is None or ttl <= 0:
            return
        provider = error.extra.get("provider_error")
        failure = SharedFailure(error.code, rejected, provider if isinstance(provider, str) else None)
        with contextlib.suppress(SharedUnavailable):
            await shared.publish_failure(key, failure, ttl)

    async def _report(self, key: CacheKey, state: CheckState, detail: str | None) -> None:
        if self._on_outcome is None:
            return
        try:
            await self._on_outcome(key, state, detail)
        except Exception:
            log.exception("token outcome listener failed", extra={"key": repr(key)})
