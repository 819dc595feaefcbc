"""The token cache against a fake fetcher and a fake clock: no network, no sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import types
from collections import deque
from collections.abc import AsyncIterator, Hashable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from app.connectors.kinds.client_auth.client_secret_basic import ClientSecretBasic
from app.core.errors import (
    AppError,
    CredentialsRejected,
    DestinationNotAllowed,
    InvalidRequest,
    TokenEndpointError,
    TokenEndpointTimeout,
    UpstreamUnreachable,
    VersionMismatch,
)
from app.tokens.cache import TokenCache, token_schedule
from app.tokens.types import CheckState, IssuedToken, OAuth2Config, RefreshTokenRejected, TokenGrant

KEY = ("connector-1", 1)
START = 1_000.0


# Fakes ------------------------------------------------------------------------------------------


class FakeClock:
    """Moves only when told; wall time is monotonic time shifted to a fixed date."""

    def __init__(self) -> None:
        self.mono = START
        self.epoch = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.epoch + timedelta(seconds=self.mono - START)

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds

    def wall(self, mono: float) -> datetime:
        return self.epoch + timedelta(seconds=mono - START)


@dataclass
class Call:
    refresh_token: str | None
    sent_at: float


Scripted = TokenGrant | BaseException


@dataclass
class FakeFetcher:
    """Counts requests; answers from ``script`` first, then with fresh tokens of ``lifetime``.

    ``gate``, when set to an unset event, holds every request until the event is set. ``latency``
    advances the clock while a request is on the wire. It never keeps the configuration.
    """

    clock: FakeClock
    lifetime: float = 3600.0
    latency: float = 0.0
    issue_refresh_tokens: bool = False
    gate: asyncio.Event | None = None
    script: deque[Scripted] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    cancelled: int = 0
    issued: int = 0

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        self.calls.append(Call(refresh_token, self.clock.monotonic()))
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.clock.advance(self.latency)
        if self.script:
            outcome = self.script.popleft()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        self.issued += 1
        refresh = f"refresh-{self.issued}" if self.issue_refresh_tokens else None
        return TokenGrant(
            access_token=f"token-{self.issued}", expires_in=self.lifetime, refresh_token=refresh
        )

    def block(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        return self.gate


def make_config() -> OAuth2Config:
    return OAuth2Config(
        grant_type="client_credentials",
        token_url="https://idp.example.com/oauth/token",
        client_id="client",
        client_auth=ClientSecretBasic(SecretStr("client-secret-value")),
    )


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None

    async def __call__(self) -> OAuth2Config:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return make_config()


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[Hashable, CheckState, str | None]] = []

    async def __call__(self, key: Hashable, state: CheckState, detail: str | None) -> None:
        self.seen.append((key, state, detail))

    def states(self) -> list[CheckState]:
        return [state for _, state, _ in self.seen]


async def settle(rounds: int = 10) -> None:
    """Let every ready task run; the fakes never wait on real time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def grant(access: str, expires_in: float = 3600.0, refresh: str | None = None) -> TokenGrant:
    return TokenGrant(access_token=access, expires_in=expires_in, refresh_token=refresh)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetcher(clock: FakeClock) -> FakeFetcher:
    return FakeFetcher(clock)


@pytest.fixture
def load() -> Loader:
    return Loader()


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
async def cache(fetcher: FakeFetcher, clock: FakeClock, outcomes: Outcomes) -> AsyncIterator[TokenCache]:
    # Any token may be reported stale here; the minimum age of a dropped token has its own test.
    cache = TokenCache(fetcher, clock=clock, on_outcome=outcomes, stale_min_age=0.0)
    yield cache
    await cache.aclose()


def spawn(cache: TokenCache, load: Loader, n: int, **kwargs: Any) -> list[asyncio.Task[IssuedToken]]:
    return [asyncio.create_task(cache.get(KEY, load, **kwargs)) for _ in range(n)]


# 1. Expiry and leeway ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "leeway"),
    [(1.0, 0.1), (30.0, 3.0), (300.0, 30.0), (600.0, 60.0), (3600.0, 60.0), (86_400.0, 60.0)],
)
async def test_a_token_is_handed_out_until_its_expiry_minus_a_scaled_leeway(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader, lifetime: float, leeway: float
) -> None:
    fetcher.lifetime = lifetime
    first = await cache.get(KEY, load)
    usable_until = START + lifetime - leeway
    assert first.expires_at == clock.wall(usable_until)
    gate = fetcher.block()

    clock.mono = usable_until - 0.001
    assert (await cache.get(KEY, load)).access_token == "token-1"

    clock.mono = usable_until
    waiting = asyncio.create_task(cache.get(KEY, load))
    await settle()
    assert not waiting.done(), "a token past its usable time was handed out"
    gate.set()
    renewed = await waiting
    assert renewed.access_token == "token-2"
    assert renewed.expires_at > clock.now()


async def test_expiry_counts_from_when_the_request_was_sent(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.lifetime, fetcher.latency = 30.0, 4.0
    issued = await cache.get(KEY, load)
    assert clock.monotonic() == START + 4.0
    # Sent at START: usable until START + 30 - 3, not 4 s later.
    assert issued.expires_at == clock.wall(START + 27.0)
    fetcher.block()
    clock.mono = START + 26.999
    assert (await cache.get(KEY, load)).access_token == "token-1"
    clock.mono = START + 27.0
    waiting = asyncio.create_task(cache.get(KEY, load))
    await settle()
    assert not waiting.done()
    waiting.cancel()


async def test_a_short_lived_token_is_reused_for_most_of_its_life(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.lifetime = 30.0
    for _ in range(21):
        assert (await cache.get(KEY, load)).access_token == "token-1"
        clock.advance(1.0)
    assert len(fetcher.calls) == 1


@pytest.mark.parametrize("expires_in", [0.0, -5.0, float("nan"), 9.0])
async def test_a_token_already_expired_on_arrival_is_not_handed_out(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    load: Loader,
    outcomes: Outcomes,
    expires_in: float,
) -> None:
    fetcher.latency = 9.5
    fetcher.script.append(grant("too-late", expires_in))
    with pytest.raises(TokenEndpointError):
        await cache.get(KEY, load)
    # The provider accepted the credentials; the token was useless. Then the usual backoff.
    assert outcomes.states() == ["authorized"]
    with pytest.raises(TokenEndpointError):
        await cache.get(KEY, load)
    assert len(fetcher.calls) == 1


def test_schedule_values() -> None:
    assert token_schedule(30.0, 0.0) == (27.0, 21.0)
    assert token_schedule(3600.0, 0.0) == (3540.0, 3240.0)
    assert token_schedule(float("inf"), 0.0)[0] < float("inf")


@dataclass
class Step:
    advance: float
    callers: int
    stale: bool


@dataclass
class Answer:
    kind: str
    lifetime: float
    latency: float
    refresh: bool


steps = st.builds(
    Step,
    advance=st.one_of(st.floats(0, 5), st.floats(0, 200), st.floats(0, 4000)),
    callers=st.integers(1, 4),
    stale=st.booleans(),
)
answers = st.builds(
    Answer,
    kind=st.sampled_from(["ok", "ok", "ok", "timeout", "error", "refresh_refused"]),
    lifetime=st.one_of(st.floats(0.5, 60), st.floats(60, 7200)),
    latency=st.floats(0, 5),
    refresh=st.booleans(),
)


class PropertyFetcher:
    """Answers from a drawn list; notes breaches of single flight and of the refresh-token rules.

    Breaches are collected, not raised: the cache would turn an exception from here into
    ``UpstreamUnreachable``.
    """

    def __init__(self, clock: FakeClock, answers: list[Answer]) -> None:
        self.clock = clock
        self.answers = answers
        self.count = 0
        self.running = 0
        self.expiry: dict[str, float] = {}
        # Refresh tokens the provider would accept now.
        self.live_refresh: set[str] = set()
        self.breaches: list[str] = []

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        if self.running:
            self.breaches.append("two token requests ran at once")
        self.running += 1
        try:
            sent_at = self.clock.monotonic()
            answer = self.answers[self.count % len(self.answers)]
            self.count += 1
            await asyncio.sleep(0)
            self.clock.advance(answer.latency)
            if refresh_token is not None:
                if refresh_token not in self.live_refresh:
                    self.breaches.append(f"{refresh_token} was sent again")
                self.live_refresh.discard(refresh_token)
                if answer.kind == "refresh_refused":
                    raise RefreshTokenRejected()
            if answer.kind == "timeout":
                raise TokenEndpointTimeout()
            if answer.kind == "error":
                raise TokenEndpointError()
            access = f"token-{self.count}"
            self.expiry[access] = sent_at + answer.lifetime
            new_refresh = f"refresh-{self.count}" if answer.refresh else None
            if new_refresh is not None:
                self.live_refresh.add(new_refresh)
            elif refresh_token is not None:
                self.live_refresh.add(refresh_token)  # accepted and kept by the provider
            return TokenGrant(access_token=access, expires_in=answer.lifetime, refresh_token=new_refresh)
        finally:
            self.running -= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(steps, min_size=1, max_size=40), drawn=st.lists(answers, min_size=1, max_size=10))
def test_no_token_is_ever_handed_out_after_its_expiry(plan: list[Step], drawn: list[Answer]) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        fetcher = PropertyFetcher(clock, drawn)
        cache = TokenCache(fetcher, clock=clock, retry_backoff_initial=0.5, retry_backoff_max=30.0)
        load = Loader()
        last: str | None = None

        async def caller(stale: str | None) -> str | None:
            try:
                token = await cache.get(KEY, load, stale_token=stale)
            except AppError:
                return None
            assert fetcher.expiry[token.access_token] > clock.monotonic()
            assert token.expires_at > clock.now()
            return token.access_token

        try:
            for step in plan:
                clock.advance(step.advance)
                stale = last if step.stale else None
                got = await asyncio.gather(*(caller(stale) for _ in range(step.callers)))
                last = next((token for token in got if token is not None), last)
                await settle(3)
        finally:
            await cache.aclose()
        assert fetcher.breaches == []

    asyncio.run(scenario())


# 2. Single flight -------------------------------------------------------------------------------


async def test_concurrent_callers_of_a_cold_key_share_one_request(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    gate = fetcher.block()
    waiting = spawn(cache, load, 200)
    await settle()
    assert len(fetcher.calls) == 1
    gate.set()
    tokens = await asyncio.gather(*waiting)
    assert {token.access_token for token in tokens} == {"token-1"}
    assert load.calls == 1


async def test_concurrent_callers_of_an_expired_key_share_one_request(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    clock.advance(3600.0)
    gate = fetcher.block()
    waiting = spawn(cache, load, 200)
    await settle()
    gate.set()
    tokens = await asyncio.gather(*waiting)
    assert {token.access_token for token in tokens} == {"token-2"}
    assert len(fetcher.calls) == 2


async def test_a_cancelled_caller_does_not_cancel_the_request_of_the_others(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    gate = fetcher.block()
    first, second = spawn(cache, load, 2)
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    assert fetcher.cancelled == 0
    gate.set()
    assert (await second).access_token == "token-1"


async def test_the_token_is_stored_even_when_every_caller_left(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    gate = fetcher.block()
    (only,) = spawn(cache, load, 1)
    await settle()
    only.cancel()
    await settle()
    gate.set()
    await settle()
    assert (await cache.get(KEY, load)).access_token == "token-1"
    assert len(fetcher.calls) == 1


# 3. Refresh ahead -------------------------------------------------------------------------------


async def test_past_the_refresh_point_callers_get_the_cached_token_and_one_renewal_runs(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    gate = fetcher.block()
    clock.advance(3300.0)  # past 3240, before 3540
    waiting = spawn(cache, load, 50)
    await settle()
    assert all(task.done() for task in waiting), "callers waited on the renewal"
    assert {task.result().access_token for task in waiting} == {"token-1"}
    assert len(fetcher.calls) == 2
    gate.set()
    await settle()
    assert (await cache.get(KEY, load)).access_token == "token-2"
    assert len(fetcher.calls) == 2


async def test_a_steady_stream_of_calls_never_waits_on_the_identity_provider(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.lifetime, fetcher.latency = 30.0, 1.0
    await cache.get(KEY, load)
    gate = fetcher.block()
    seen = set()
    for step in range(400):
        clock.advance(0.5)
        (call,) = spawn(cache, load, 1)
        await settle(2)
        assert call.done(), f"call {step} waited"
        seen.add(call.result().access_token)
        if step % 4 == 0:  # the identity provider answers within two seconds
            gate.set()
            await settle()
            gate.clear()
    assert len(seen) >= 8
    assert len(fetcher.calls) - len(seen) in (0, 1)


async def test_a_failed_renewal_keeps_the_valid_token_and_retries_after_the_backoff(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader, outcomes: Outcomes
) -> None:
    await cache.get(KEY, load)
    fetcher.script.append(TokenEndpointError())
    clock.advance(3300.0)
    assert (await cache.get(KEY, load)).access_token == "token-1"
    await settle()
    assert outcomes.states() == ["authorized", "unreachable"]
    for _ in range(10):
        assert (await cache.get(KEY, load)).access_token == "token-1"
    assert len(fetcher.calls) == 2
    clock.advance(1.0)
    assert (await cache.get(KEY, load)).access_token == "token-1"
    await settle()
    assert len(fetcher.calls) == 3
    assert (await cache.get(KEY, load)).access_token == "token-2"
    assert outcomes.states()[-1] == "authorized"


async def test_a_background_failure_is_never_left_unretrieved(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        cache = TokenCache(fetcher, clock=clock)
        await cache.get(KEY, load)
        fetcher.script.extend([RuntimeError("bug"), UpstreamUnreachable()])
        clock.advance(3300.0)
        await cache.get(KEY, load)
        await settle()
        clock.advance(2.0)
        await cache.get(KEY, load)
        await settle()
        assert len(fetcher.calls) == 3
        await cache.aclose()
        del cache
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(None)


# 4. Refresh tokens ------------------------------------------------------------------------------


async def renew(cache: TokenCache, clock: FakeClock, load: Loader) -> IssuedToken:
    """Let the current token run out and get the next one in the foreground."""
    clock.advance(4000.0)
    return await cache.get(KEY, load)


async def test_the_refresh_token_is_used_for_the_next_renewal(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.issue_refresh_tokens = True
    fetcher.latency = 2.0
    await cache.get(KEY, load)
    await renew(cache, clock, load)
    third = await renew(cache, clock, load)
    assert [call.refresh_token for call in fetcher.calls] == [None, "refresh-1", "refresh-2"]
    # A refreshed token's expiry counts from when the refresh request was sent, too.
    assert third.expires_at == clock.wall(fetcher.calls[-1].sent_at + 3540.0)


async def test_a_refresh_answer_without_a_new_refresh_token_keeps_the_accepted_one(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.script.extend([grant("a", refresh="R"), grant("b"), grant("c")])
    await cache.get(KEY, load)
    assert (await renew(cache, clock, load)).access_token == "b"
    assert (await renew(cache, clock, load)).access_token == "c"
    assert [call.refresh_token for call in fetcher.calls] == [None, "R", "R"]


@pytest.mark.parametrize(
    "failure", [TokenEndpointTimeout(), UpstreamUnreachable(), TokenEndpointError(), RuntimeError("?")]
)
@pytest.mark.parametrize("background", [False, True])
async def test_a_refresh_token_is_never_sent_again_after_a_failed_attempt(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    load: Loader,
    failure: BaseException,
    background: bool,
) -> None:
    fetcher.script.extend([grant("a", refresh="R"), failure, grant("b")])
    await cache.get(KEY, load)
    clock.advance(3300.0 if background else 4000.0)
    if background:
        await cache.get(KEY, load)
        await settle()
    else:
        with pytest.raises(AppError):
            await cache.get(KEY, load)
    clock.advance(1.0)
    await cache.get(KEY, load)
    await settle()
    assert [call.refresh_token for call in fetcher.calls] == [None, "R", None]


async def test_a_refused_refresh_token_runs_the_grant_in_the_same_flight(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader, outcomes: Outcomes
) -> None:
    fetcher.script.extend([grant("a", refresh="R"), RefreshTokenRejected(), grant("b", 30.0)])
    await cache.get(KEY, load)
    clock.advance(4000.0)
    fetcher.latency = 5.0
    gate = fetcher.block()
    waiting = spawn(cache, load, 20)
    await settle()
    gate.set()
    tokens = await asyncio.gather(*waiting)
    assert {token.access_token for token in tokens} == {"b"}
    assert [call.refresh_token for call in fetcher.calls] == [None, "R", None]
    # The grant's expiry counts from when the grant itself was sent, after the refused refresh.
    grant_sent = fetcher.calls[-1].sent_at
    assert grant_sent == fetcher.calls[-2].sent_at + 5.0
    assert tokens[0].expires_at == clock.wall(grant_sent + 27.0)
    assert outcomes.states() == ["authorized", "authorized"]
    assert load.calls == 2


async def test_a_refresh_token_refused_for_bad_client_credentials_is_a_rejection(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.script.extend([grant("a", refresh="R"), CredentialsRejected()])
    await cache.get(KEY, load)
    with pytest.raises(CredentialsRejected):
        await renew(cache, clock, load)
    with pytest.raises(CredentialsRejected):
        await cache.get(KEY, load)
    assert len(fetcher.calls) == 2


# 5. Stale tokens --------------------------------------------------------------------------------


async def test_a_stale_token_equal_to_the_cached_one_is_replaced(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    await cache.get(KEY, load)
    assert (await cache.get(KEY, load, stale_token="token-1")).access_token == "token-2"
    assert (await cache.get(KEY, load)).access_token == "token-2"
    assert len(fetcher.calls) == 2


async def test_a_stale_token_already_replaced_returns_the_current_one_without_a_request(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    await cache.get(KEY, load)
    await cache.get(KEY, load, stale_token="token-1")
    assert (await cache.get(KEY, load, stale_token="token-1")).access_token == "token-2"
    assert len(fetcher.calls) == 2


async def test_many_callers_reporting_the_same_stale_token_cause_one_request(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    await cache.get(KEY, load)
    gate = fetcher.block()
    waiting = spawn(cache, load, 200, stale_token="token-1")
    await settle()
    gate.set()
    tokens = await asyncio.gather(*waiting)
    assert {token.access_token for token in tokens} == {"token-2"}
    assert len(fetcher.calls) == 2


async def test_a_stale_report_during_a_renewal_joins_it(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    gate = fetcher.block()
    clock.advance(3300.0)
    assert (await cache.get(KEY, load)).access_token == "token-1"
    (reporter,) = spawn(cache, load, 1, stale_token="token-1")
    await settle()
    assert not reporter.done()
    gate.set()
    assert (await reporter).access_token == "token-2"
    assert len(fetcher.calls) == 2


async def test_a_stale_report_does_not_skip_the_backoff(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    fetcher.script.append(UpstreamUnreachable())
    with pytest.raises(UpstreamUnreachable):
        await cache.get(KEY, load, stale_token="token-1")
    with pytest.raises(UpstreamUnreachable):
        await cache.get(KEY, load, stale_token="token-1")
    assert len(fetcher.calls) == 2


async def test_peek_shows_the_token_get_would_hand_out(
    cache: TokenCache, clock: FakeClock, load: Loader
) -> None:
    assert cache.peek(KEY) is None
    await cache.get(KEY, load)
    assert cache.peek(KEY) == "token-1"
    assert cache.peek(("connector-1", 2)) is None
    clock.advance(3540.0)
    assert cache.peek(KEY) is None


# 6. Sticky rejection ----------------------------------------------------------------------------


async def test_a_rejection_is_answered_at_once_until_the_connector_is_forgotten(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader, outcomes: Outcomes
) -> None:
    fetcher.script.append(CredentialsRejected("invalid_client"))
    gate = fetcher.block()
    waiting = spawn(cache, load, 20)
    await settle()
    gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, CredentialsRejected) for result in results)
    for _ in range(50):
        with pytest.raises(CredentialsRejected) as caught:
            await cache.get(KEY, load, stale_token="token-1")
        assert caught.value.detail == "invalid_client"
        clock.advance(86_400.0)
    assert len(fetcher.calls) == 1
    assert load.calls == 1
    assert outcomes.seen == [(KEY, "rejected", "credentials_rejected")]

    cache.forget(KEY[0])
    assert (await cache.get(KEY, load)).access_token == "token-1"
    assert len(fetcher.calls) == 2


async def test_a_rejected_renewal_withdraws_the_still_valid_token(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    fetcher.script.append(CredentialsRejected())
    clock.advance(3300.0)
    await cache.get(KEY, load)
    await settle()
    assert cache.peek(KEY) is None
    with pytest.raises(CredentialsRejected):
        await cache.get(KEY, load)
    assert len(fetcher.calls) == 2


async def test_a_replayed_error_is_a_fresh_copy_of_the_first(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    fetcher.script.append(CredentialsRejected("refused", status=502, provider_error="invalid_client"))
    with pytest.raises(CredentialsRejected) as first:
        await cache.get(KEY, load)
    with pytest.raises(CredentialsRejected) as second:
        await cache.get(KEY, load)
    assert second.value is not first.value
    assert (second.value.detail, second.value.http_status, second.value.extra) == (
        "refused",
        502,
        {"provider_error": "invalid_client"},
    )
    assert second.value.__cause__ is None
    with pytest.raises(CredentialsRejected) as third:
        await cache.get(KEY, load)
    assert third.value is not second.value


async def test_a_seeded_token_clears_a_rejection(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.script.append(CredentialsRejected())
    with pytest.raises(CredentialsRejected):
        await cache.get(KEY, load)
    await cache.seed(KEY, grant("checked"))
    assert (await cache.get(KEY, load)).access_token == "checked"
    clock.advance(3300.0)  # past the refresh point: the slow path must agree
    assert (await cache.get(KEY, load)).access_token == "checked"
    await settle()
    assert (await cache.get(KEY, load)).access_token == "token-1"


# 7. Transient failures and backoff --------------------------------------------------------------

TRANSIENT = [
    TokenEndpointError("server_error"),
    TokenEndpointTimeout(),
    UpstreamUnreachable(),
    DestinationNotAllowed(),
    InvalidRequest("odd"),
]


@pytest.mark.parametrize("failure", TRANSIENT, ids=lambda error: error.code)
async def test_a_transient_failure_is_shared_then_replayed_until_the_backoff_passes(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    load: Loader,
    outcomes: Outcomes,
    failure: AppError,
) -> None:
    fetcher.script.append(failure)
    gate = fetcher.block()
    waiting = spawn(cache, load, 20)
    await settle()
    gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(type(result) is type(failure) for result in results)
    assert outcomes.seen == [(KEY, "unreachable", failure.code)]

    clock.advance(0.999)
    with pytest.raises(type(failure)) as replayed:
        await cache.get(KEY, load)
    assert replayed.value.detail == failure.detail
    with pytest.raises(type(failure)) as again:
        await cache.get(KEY, load)
    assert again.value is not replayed.value
    assert len(fetcher.calls) == 1
    assert load.calls == 1

    clock.mono = START + 1.0
    gate = fetcher.block()
    waiting = spawn(cache, load, 20)
    await settle()
    assert len(fetcher.calls) == 2
    gate.set()
    assert {token.access_token for token in await asyncio.gather(*waiting)} == {"token-1"}


async def test_the_backoff_doubles_up_to_its_cap_and_resets_on_success(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock, retry_backoff_initial=1.0, retry_backoff_max=8.0)

    async def refused_for() -> float:
        """After a failure: how long callers are answered without a request, until one is tried."""
        calls = len(fetcher.calls)
        waited = 0.0
        while len(fetcher.calls) == calls:
            clock.advance(0.25)
            waited += 0.25
            with pytest.raises(TokenEndpointTimeout):
                await cache.get(KEY, load)
        return waited

    fetcher.script.extend(TokenEndpointTimeout() for _ in range(6))
    with pytest.raises(TokenEndpointTimeout):
        await cache.get(KEY, load)
    assert [await refused_for() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]

    clock.advance(8.0)
    assert (await cache.get(KEY, load)).access_token == "token-1"
    fetcher.script.extend(TokenEndpointTimeout() for _ in range(2))
    clock.advance(4000.0)
    with pytest.raises(TokenEndpointTimeout):
        await cache.get(KEY, load)
    assert await refused_for() == 1.0
    await cache.aclose()


async def test_a_usable_token_is_served_during_the_backoff(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    fetcher.script.extend([UpstreamUnreachable(), UpstreamUnreachable()])
    clock.advance(3300.0)
    await cache.get(KEY, load)
    await settle()
    clock.advance(1.0)
    await cache.get(KEY, load)
    await settle()
    # Two failures: the next try waits 2 s, and the token stays valid meanwhile.
    for _ in range(7):
        clock.advance(0.25)
        assert (await cache.get(KEY, load)).access_token == "token-1"
    assert len(fetcher.calls) == 3
    clock.advance(0.25)
    await cache.get(KEY, load)
    await settle()
    assert len(fetcher.calls) == 4


async def test_an_unexpected_fetcher_error_is_a_transient_upstream_failure(
    cache: TokenCache,
    fetcher: FakeFetcher,
    clock: FakeClock,
    load: Loader,
    outcomes: Outcomes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fetcher.script.append(KeyError("surprise"))
    with pytest.raises(UpstreamUnreachable) as caught:
        await cache.get(KEY, load)
    assert isinstance(caught.value.__cause__, KeyError)
    assert outcomes.seen == [(KEY, "unreachable", "unexpected_error")]
    assert any(record.exc_info for record in caplog.records)
    with pytest.raises(UpstreamUnreachable):
        await cache.get(KEY, load)
    clock.advance(1.0)
    assert (await cache.get(KEY, load)).access_token == "token-1"


async def test_a_load_error_reaches_the_callers_and_changes_nothing(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader, outcomes: Outcomes
) -> None:
    load.error = VersionMismatch("the connector changed; retry")
    with pytest.raises(VersionMismatch):
        await cache.get(KEY, load)
    load.error = None
    assert (await cache.get(KEY, load)).access_token == "token-1"
    assert len(fetcher.calls) == 1
    assert outcomes.states() == ["authorized"]


async def test_a_load_error_in_the_background_pauses_renewals_briefly(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    load.error = RuntimeError("database down")
    clock.advance(3300.0)
    for _ in range(20):
        assert (await cache.get(KEY, load)).access_token == "token-1"
        await settle()
    assert load.calls == 2
    load.error = None
    clock.advance(1.0)
    await cache.get(KEY, load)
    await settle()
    assert (await cache.get(KEY, load)).access_token == "token-2"
    assert load.calls == len(fetcher.calls) + 1 == 3


# 8. Outcome listener ----------------------------------------------------------------------------


async def test_an_outcome_is_reported_for_every_request_and_never_for_a_hit(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader, outcomes: Outcomes
) -> None:
    for _ in range(10):
        await cache.get(KEY, load)
    assert outcomes.seen == [(KEY, "authorized", None)]
    fetcher.script.append(TokenEndpointTimeout())
    clock.advance(4000.0)
    with pytest.raises(TokenEndpointTimeout):
        await cache.get(KEY, load)
    clock.advance(1.0)
    await cache.get(KEY, load)
    assert outcomes.states() == ["authorized", "unreachable", "authorized"]
    assert outcomes.seen[1][2] == "token_endpoint_timeout"


async def test_a_failing_listener_is_logged_and_never_reaches_callers(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(key: Hashable, state: CheckState, detail: str | None) -> None:
        raise RuntimeError("listener down")

    cache = TokenCache(fetcher, clock=clock, on_outcome=broken)
    with caplog.at_level(logging.ERROR, logger="app.tokens.cache"):
        assert (await cache.get(KEY, load)).access_token == "token-1"
    assert "listener" in caplog.text
    await cache.aclose()


# 9 and 10. Load only before a request; a cheap hot path -----------------------------------------


async def test_load_runs_only_before_a_request(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    for _ in range(100):
        await cache.get(KEY, load)
    clock.advance(3300.0)
    await cache.get(KEY, load)  # starts the renewal
    await cache.get(KEY, load)
    await settle()
    assert load.calls == len(fetcher.calls) == 2


async def test_a_warm_hit_completes_without_suspending_logging_or_creating_tasks(
    cache: TokenCache, load: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.get(KEY, load)
    tasks = asyncio.all_tasks()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        coroutine = cache.get(KEY, load)
        with pytest.raises(StopIteration) as done:
            coroutine.send(None)
    assert done.value.value.access_token == "token-1"
    assert asyncio.all_tasks() == tasks
    assert caplog.records == []
    assert load.calls == 1


# 11. Secrets ------------------------------------------------------------------------------------


def reachable(root: object) -> Iterator[object]:
    """Objects reachable from ``root``, not following into modules, classes or functions."""
    seen = {id(root)}
    stack = [root]
    while stack:
        item = stack.pop()
        yield item
        for child in gc.get_referents(item):
            if isinstance(child, types.ModuleType | type | types.FunctionType | types.CodeType):
                continue
            if isinstance(child, dict) and "__builtins__" in child:
                continue  # a module's globals
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


@pytest.mark.parametrize(
    "outcome", [grant("a", refresh="R"), TokenEndpointError(), CredentialsRejected(), KeyError("x")]
)
async def test_the_cache_keeps_no_secret_after_a_request(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader, outcome: Scripted
) -> None:
    cache = TokenCache(fetcher, clock=clock)
    fetcher.script.append(outcome)
    with contextlib.suppress(AppError):
        await cache.get(KEY, load)
    await settle()
    leaked = [item for item in reachable(cache) if isinstance(item, OAuth2Config | SecretStr)]
    assert leaked == []
    await cache.aclose()


# Versions, seeding, forgetting, closing ---------------------------------------------------------


async def test_a_new_version_is_a_new_entry_and_replaces_the_old_one(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    v1, v2 = ("connector-1", 1), ("connector-1", 2)
    assert (await cache.get(v1, load)).access_token == "token-1"
    assert (await cache.get(v2, load)).access_token == "token-2"
    assert (await cache.get(v2, load)).access_token == "token-2"
    # A caller still holding version 1 gets a token of its own, never cached.
    assert (await cache.get(v1, load)).access_token == "token-3"
    assert (await cache.get(v1, load)).access_token == "token-4"
    assert (await cache.get(v2, load)).access_token == "token-2"
    assert len(fetcher.calls) == 4


async def test_callers_of_an_outdated_version_share_one_request(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    await cache.get(("connector-1", 2), load)
    gate = fetcher.block()
    waiting = spawn(cache, load, 20)  # KEY is version 1
    await settle()
    gate.set()
    assert {token.access_token for token in await asyncio.gather(*waiting)} == {"token-2"}
    assert len(fetcher.calls) == 2


async def test_a_new_version_stops_the_old_versions_renewal(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    await cache.get(KEY, load)
    gate = fetcher.block()
    clock.advance(3300.0)
    await cache.get(KEY, load)
    await settle()
    await cache.seed(("connector-1", 2), grant("v2"))
    await settle()
    assert fetcher.cancelled == 1
    gate.set()
    assert (await cache.get(("connector-1", 2), load)).access_token == "v2"


async def test_forget_drops_the_entry_and_cancels_its_renewal(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    fetcher.issue_refresh_tokens = True
    await cache.get(KEY, load)
    gate = fetcher.block()
    clock.advance(3300.0)
    await cache.get(KEY, load)
    await settle()
    cache.forget(KEY[0])
    await settle()
    assert fetcher.cancelled == 1
    assert cache.peek(KEY) is None
    gate.set()
    assert (await cache.get(KEY, load)).access_token == "token-2"
    assert [call.refresh_token for call in fetcher.calls] == [None, "refresh-1", None]


async def test_forget_lets_awaited_requests_finish_without_caching_them(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    gate = fetcher.block()
    (waiting,) = spawn(cache, load, 1)
    await settle()
    cache.forget(KEY[0])
    gate.set()
    assert (await waiting).access_token == "token-1"
    assert (await cache.get(KEY, load)).access_token == "token-2"


async def test_a_seeded_token_is_served_without_a_request(
    cache: TokenCache, fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    sent_at = clock.monotonic()
    clock.advance(3.0)
    await cache.seed(KEY, grant("seeded", 30.0, refresh="R"), sent_at=sent_at)
    issued = await cache.get(KEY, load)
    assert issued.access_token == "seeded"
    assert issued.expires_at == clock.wall(sent_at + 27.0)
    assert load.calls == 0
    clock.advance(30.0)
    await cache.get(KEY, load)
    assert [call.refresh_token for call in fetcher.calls] == ["R"]


async def test_a_seed_for_an_outdated_version_is_ignored(
    cache: TokenCache, fetcher: FakeFetcher, load: Loader
) -> None:
    await cache.seed(("connector-1", 2), grant("v2"))
    await cache.seed(KEY, grant("v1"))
    assert cache.peek(KEY) is None
    assert cache.peek(("connector-1", 2)) == "v2"


async def test_aclose_cancels_every_request_and_leaves_no_task(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock)
    other = ("connector-2", 1)
    await cache.get(KEY, load)
    fetcher.block()
    clock.advance(3300.0)
    await cache.get(KEY, load)  # a background renewal, held
    waiting = asyncio.create_task(cache.get(other, load))
    await settle()
    await cache.aclose()
    with pytest.raises(UpstreamUnreachable):
        await waiting
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert fetcher.cancelled == 2
    fetcher.gate = None
    with pytest.raises(RuntimeError):
        await cache.get(KEY, load)


async def test_a_cancelled_caller_stays_cancelled_when_the_cache_closes(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock)
    fetcher.block()
    (waiting,) = spawn(cache, load, 1)
    await settle()
    waiting.cancel()
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_the_backoff_settings_are_checked(fetcher: FakeFetcher, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="backoff"):
        TokenCache(fetcher, clock=clock, retry_backoff_initial=0.0)
    with pytest.raises(ValueError, match="backoff"):
        TokenCache(fetcher, clock=clock, retry_backoff_initial=5.0, retry_backoff_max=1.0)


async def test_a_token_reported_stale_right_after_it_arrived_is_kept(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock, stale_min_age=5.0)
    try:
        first = await cache.get(KEY, load)
        clock.advance(10)
        # Old enough: the report is believed, the token replaced once for all reporters.
        tasks = spawn(cache, load, 20, stale_token=first.access_token)
        second = {t.access_token for t in await asyncio.gather(*tasks)}
        assert len(second) == 1
        assert len(fetcher.calls) == 2
        (replacement,) = second
        # Late reports, about the new token or the old one, within 5 s of its arrival: no request.
        clock.advance(1)
        assert (await cache.get(KEY, load, stale_token=replacement)).access_token == replacement
        assert (await cache.get(KEY, load, stale_token=first.access_token)).access_token == replacement
        assert len(fetcher.calls) == 2
        clock.advance(5)
        assert (await cache.get(KEY, load, stale_token=replacement)).access_token != replacement
        assert len(fetcher.calls) == 3
    finally:
        await cache.aclose()


# Bounds -----------------------------------------------------------------------------------------


async def test_entries_are_bounded_and_the_least_recently_used_goes_first(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock, capacity=2)
    try:
        for connector in ("a", "b"):
            await cache.get((connector, 1), load)
        await cache.get(("a", 1), load)  # a use: "b" is now the least recently used
        await cache.get(("c", 1), load)  # evicts "b"
        assert len(fetcher.calls) == 3
        assert cache.peek(("a", 1)) == "token-1"
        assert cache.peek(("b", 1)) is None
        assert cache.peek(("c", 1)) == "token-3"
        await cache.get(("b", 1), load)  # evicted: asked for again
        assert len(fetcher.calls) == 4
    finally:
        await cache.aclose()


async def test_an_entry_with_a_request_under_way_is_not_evicted(
    fetcher: FakeFetcher, clock: FakeClock, load: Loader
) -> None:
    cache = TokenCache(fetcher, clock=clock, capacity=1)
    gate = fetcher.block()
    try:
        first = asyncio.create_task(cache.get(("a", 1), load))
        await settle()
        other = asyncio.create_task(cache.get(("b", 1), load))  # the cache is over its bound now
        await settle()
        again = asyncio.create_task(cache.get(("a", 1), load))
        await settle()
        assert len(fetcher.calls) == 2, "the second caller of a joined its request, not a new one"
        gate.set()
        assert (await first).access_token == (await again).access_token == "token-1"
        assert (await other).access_token == "token-2"
        await cache.get(("c", 1), load)  # back to its bound: the two idle entries go
        assert cache.peek(("a", 1)) is None
        assert cache.peek(("b", 1)) is None
        assert cache.peek(("c", 1)) == "token-3"
    finally:
        await cache.aclose()
