"""Name resolution that no tenant can starve: c-ares, one flight per name, a deadline that ends it.

The host names the service resolves are written by users, and a user can pick names whose DNS
servers never answer. ``loop.getaddrinfo`` runs each lookup in a small pool of threads (four under
uvloop) and a deadline only stops the caller waiting, not the lookup, so a few such names fill the
pool and every other organization's token renewals, webhooks and even the database's connections
queue behind them. Here:

* **c-ares, not threads** (``CaresResolver``, through aiodns). A lookup is a few UDP datagrams
  that c-ares multiplexes on its own sockets; an unanswered one holds no thread, and nothing
  else waits behind it. c-ares' own per-try timeout and try count end it, so an abandoned lookup
  does not linger either. The name is looked up as written (no search domains: a URL's host is
  absolute, and ``api`` must not become an internal ``api.corp.example``); ``/etc/hosts`` is read
  first, as by the system resolver. The loop's ``getaddrinfo`` is left to the database and Redis.
* **One flight per name** (``Lookups``). Concurrent lookups of one name share one query, whoever
  asked: a burst of token renewals behind the same identity provider costs one lookup.
* **A deadline that ends the lookup.** The shared flight itself is bounded; no waiter can keep it
  alive and no waiter's cancellation ends it for the others.
* **A short negative cache.** A name that failed (no such name, no answer in time) fails at once
  for ``negative_ttl`` seconds instead of being asked again by every caller.
* **A cap per organization.** At most ``max_per_tenant`` flights started on behalf of one
  organization are in flight at a time; beyond that its lookups fail at once. The organization is
  the one in ``outbound_tenant``, which the caller-token check sets for a request (and every task
  the request starts) and the webhook worker sets for each attempt.

A name that cannot be resolved raises ``NameNotResolved``, whose detail names that host only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn

import aiodns
import pycares

from app.core.clock import Clock, SystemClock
from app.core.errors import NameNotResolved
from app.core.lru import LRU
from app.core.metrics import Metrics
from app.core.outbound.policy import Resolver

if TYPE_CHECKING:
    from app.core.config import Settings

__all__ = ["CaresResolver", "Lookups", "on_behalf_of", "outbound_tenant"]

log = logging.getLogger(__name__)

# The organization on whose behalf outbound calls are made in this context; None for the service's
# own calls. Tasks copy it when they are created, so a token renewal a request starts carries it.
outbound_tenant: ContextVar[str | None] = ContextVar("outbound_tenant", default=None)

# Tries per lookup: the first try gets a third of the deadline, the second (c-ares doubles it) the
# rest, so c-ares gives up by itself when the deadline passes.
_TRIES: Final = 2


@contextlib.contextmanager
def on_behalf_of(organization_id: str) -> Iterator[None]:
    """Make outbound calls inside the block on behalf of ``organization_id``."""
    token = outbound_tenant.set(organization_id)
    try:
        yield
    finally:
        outbound_tenant.reset(token)


class _NoAnswer(Exception):
    """A lookup that ended without addresses; the message is safe to show (names the host only)."""


class CaresResolver:
    """Resolves with c-ares (``aiodns``); a ``Resolver``. The channel is made on first use, on the
    running loop, and closed by ``aclose``.

    ``nameservers`` (``"ip"`` or ``"ip:port"``) replaces the servers of ``/etc/resolv.conf``.
    """

    def __init__(self, *, timeout_seconds: float, nameservers: Sequence[str] = ()) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        self._timeout = timeout_seconds
        self._nameservers = list(nameservers)
        self._resolver: aiodns.DNSResolver | None = None

    def _channel(self) -> aiodns.DNSResolver:
        if self._resolver is None:
            self._resolver = aiodns.DNSResolver(
                nameservers=self._nameservers or None,
                loop=asyncio.get_running_loop(),
                timeout=self._timeout / (2**_TRIES - 1),
                tries=_TRIES,
                flags=pycares.ARES_FLAG_NOSEARCH,
            )
        return self._resolver

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        try:
            result = await self._channel().getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as error:
            code = error.args[0] if error.args else None
            if code == aiodns.error.ARES_ETIMEOUT:
                raise TimeoutError from None
            raise _NoAnswer(_describe(code)) from None
        addresses: list[str] = []
        for node in result.nodes:
            address = node.addr[0].decode("ascii")
            if address not in addresses:
                addresses.append(address)
        return addresses

    async def aclose(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


def _describe(code: int | None) -> str:
    if code in (aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA):
        return "no such name"
    if code == aiodns.error.ARES_ECONNREFUSED:
        return "the DNS server refused the connection"
    if code in (aiodns.error.ARES_ESERVFAIL, aiodns.error.ARES_EREFUSED):
        return "the DNS server could not answer"
    return "the lookup failed"


@dataclass(frozen=True, slots=True)
class _Failure:
    detail: str
    until: float


class Lookups:
    """Single flight, a deadline, a negative cache and a cap per organization over a ``Resolver``;
    itself a ``Resolver``. See the module docstring."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        timeout_seconds: float,
        negative_ttl_seconds: float = 5.0,
        max_per_tenant: int = 8,
        capacity: int = 4096,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_per_tenant < 1:
            raise ValueError("max_per_tenant must be at least 1")
        self._resolver = resolver
        self._timeout = timeout_seconds
        self._negative_ttl = negative_ttl_seconds
        self._max_per_tenant = max_per_tenant
        self._clock: Clock = clock or SystemClock()
        self._lookups = (metrics or Metrics()).dns_lookups
        self._flights: dict[str, asyncio.Task[list[str]]] = {}
        self._per_tenant: dict[str, int] = {}
        self._failures: LRU[str, _Failure] = LRU(capacity)

    @classmethod
    def build(
        cls,
        *,
        timeout_seconds: float,
        nameservers: Sequence[str] = (),
        negative_ttl_seconds: float = 5.0,
        max_per_tenant: int = 8,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> Lookups:
        """Lookups over c-ares, each ended by c-ares itself within ``timeout_seconds``."""
        return cls(
            CaresResolver(timeout_seconds=timeout_seconds, nameservers=nameservers),
            timeout_seconds=timeout_seconds,
            negative_ttl_seconds=negative_ttl_seconds,
            max_per_tenant=max_per_tenant,
            clock=clock,
            metrics=metrics,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Clock | None = None, metrics: Metrics | None = None
    ) -> Lookups:
        """The process's lookups, shared by every outbound client; never longer than the deadline."""
        return cls.build(
            timeout_seconds=min(settings.dns_timeout_seconds, settings.outbound_timeout_seconds),
            nameservers=settings.dns_servers,
            negative_ttl_seconds=settings.dns_negative_ttl_seconds,
            max_per_tenant=settings.dns_max_lookups_per_organization,
            clock=clock,
            metrics=metrics,
        )

    async def aclose(self) -> None:
        """Close the resolver underneath, if it has anything to close; lookups in flight end."""
        for flight in list(self._flights.values()):
            flight.cancel()
        close = getattr(self._resolver, "aclose", None)
        if close is not None:
            await close()

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        """The addresses of ``host``; raises ``NameNotResolved``."""
        host = host.lower()
        failure = self._failures.peek(host)
        if failure is not None:
            if failure.until > self._clock.monotonic():
                self._lookups.labels("cached_failure").inc()
                raise NameNotResolved(failure.detail)
            self._failures.pop(host)
        flight = self._flights.get(host)
        if flight is None:
            flight = self._start(host, port)
        else:
            self._lookups.labels("shared").inc()
        # Shielded: a waiter that gives up does not end the lookup for the others.
        return list(await asyncio.shield(flight))

    def in_flight(self, organization_id: str | None = None) -> int:
        """Lookups in flight, in all or started on behalf of ``organization_id``."""
        if organization_id is None:
            return len(self._flights)
        return self._per_tenant.get(organization_id, 0)

    def _start(self, host: str, port: int) -> asyncio.Task[list[str]]:
        owner = outbound_tenant.get()
        if owner is not None:
            running = self._per_tenant.get(owner, 0)
            if running >= self._max_per_tenant:
                self._lookups.labels("over_limit").inc()
                raise NameNotResolved(
                    f"{host} was not looked up: this organization already has {running} name lookups"
                    " in flight"
                )
            self._per_tenant[owner] = running + 1
        flight = asyncio.get_running_loop().create_task(self._resolve(host, port), name=f"lookup {host}")
        self._flights[host] = flight

        def done(finished: asyncio.Task[list[str]]) -> None:
            del self._flights[host]
            if not finished.cancelled():
                finished.exception()  # retrieved: every waiter may have given up already
            if owner is not None:
                left = self._per_tenant[owner] - 1
                if left:
                    self._per_tenant[owner] = left
                else:
                    del self._per_tenant[owner]

        flight.add_done_callback(done)
        return flight

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            async with asyncio.timeout(self._timeout):
                addresses = list(await self._resolver(host, port))
        except TimeoutError:
            detail = f"{host} could not be resolved: no answer from DNS within {self._timeout:g}s"
            self._fail(host, detail, "timeout")
        except _NoAnswer as error:
            self._fail(host, f"{host} could not be resolved: {error}", "not_found")
        except OSError:
            self._fail(host, f"{host} could not be resolved", "not_found")
        if not addresses:
            self._fail(host, f"{host} could not be resolved: no addresses", "not_found")
        self._lookups.labels("resolved").inc()
        return addresses

    def _fail(self, host: str, detail: str, result: str) -> NoReturn:
        self._lookups.labels(result).inc()
        self._failures.put(host, _Failure(detail, self._clock.monotonic() + self._negative_ttl))
        log.info("name lookup failed", extra={"host": host, "result": result})
        raise NameNotResolved(detail) from None  # the resolver's own error may carry OS detail
