"""The HTTP protocol ``serve`` runs: uvicorn's httptools protocol with limits on slow clients.

uvicorn bounds the idle time between requests on a kept-alive connection, but not the time a
client takes to send a request's headers, and it accepts every connection it is offered: a few
hundred connections that open and then send a header line now and then stay open for as long as
the client likes, and each costs every other caller a share of the one event loop. So:

* **Headers within a time limit.** From the moment a connection opens, or a kept-alive
  connection's next request begins, its headers must be complete within ``header_timeout``
  seconds; otherwise the answer is ``408 Request Timeout`` and the connection is closed.
* **A cap on open connections.** A connection beyond ``max_connections`` open ones in this
  process is closed as soon as it is accepted, before it costs anything else.
* **Idle keep-alive** is uvicorn's own ``timeout_keep_alive`` (``CONNECTORS_KEEP_ALIVE_SECONDS``).

``ServeConfig`` is uvicorn's configuration with that protocol, built in the process that serves:
with ``CONNECTORS_WORKERS`` above 1 the configuration travels to each worker process (pickled), and
a class made at run time cannot, so each worker makes its own from the two limits.

A proxy in front should still buffer requests (so slow clients are its problem, not ours), keep
its own idle timeout towards the service below ``CONNECTORS_KEEP_ALIVE_SECONDS`` (so it never
sends on a connection the service is closing), and limit connections per client.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ServeConfig", "end_with_parent", "guarded_protocol"]

log = logging.getLogger(__name__)

_TIMEOUT_ANSWER: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 41\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"the request headers did not arrive in time"
)


class _GuardedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a header deadline and a connection cap (class attributes)."""

    header_timeout: float = 10.0
    max_connections: int = 1024
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            # Counted before this one is added: nothing is read from it, and nothing answered.
            transport.abort()
            _refusals.note(self.loop.time(), len(self.connections))
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self.transport is not None:  # None: refused in connection_made
            super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The next request on a kept-alive connection has begun: its headers are due in time. A
        # request pipelined behind an answer still being written is left to the keep-alive
        # timeout, which uvicorn arms once that answer is complete.
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()


class _Refusals:
    """Connections refused at the cap, logged at most once per ``every`` seconds with their
    count: a flood of connections is not a flood of log lines."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.count = 0
        self.logged_at = -float("inf")

    def note(self, now: float, open_connections: int) -> None:
        self.count += 1
        if now - self.logged_at >= self.every:
            log.warning(
                "connections refused: too many open connections",
                extra={"refused": self.count, "open": open_connections},
            )
            self.count = 0
            self.logged_at = now


_refusals = _Refusals()


def guarded_protocol(*, header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    if header_timeout <= 0 or max_connections < 1:
        raise ValueError("header_timeout must be positive and max_connections at least 1")
    return type(
        "GuardedHttpToolsProtocol",
        (_GuardedProtocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


class ServeConfig(uvicorn.Config):
    """uvicorn's configuration with the guarded protocol, made from the limits where it loads."""

    def __init__(self, app: Any, *, header_timeout: float, max_connections: int, **options: Any) -> None:
        guarded_protocol(header_timeout=header_timeout, max_connections=max_connections)  # checks them
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        super().__init__(app, http="httptools", **options)

    def load(self) -> None:
        self.http = guarded_protocol(header_timeout=self.header_timeout, max_connections=self.max_connections)
        super().load()


_PR_SET_PDEATHSIG: Final = 1


def end_with_parent() -> None:
    """Have the kernel stop this worker (SIGTERM, so gracefully) when the ``serve`` process that
    started it ends, even killed: a worker never serves on alone, holding the port. Linux only;
    elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    # The process that started this one, as multiprocessing recorded it: should it have ended
    # already, getppid() names whichever process adopted this one instead.
    starter = multiprocessing.parent_process()
    parent = starter.pid if starter is not None and starter.pid is not None else os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to end with the serve process", extra={"errno": ctypes.get_errno()})
        return
    if os.getppid() != parent:  # it ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
