"""A webhook receiver as a customer would run one: HTTPS on 127.0.0.1, verifying every request.

Each path stands for one subscription and trusts the secrets it is given (``trust``). A request is
verified with ``standardwebhooks.Webhook(secret).verify(body, headers)``, once per trusted secret,
and the secrets that verified it are recorded: during a rotation's overlap both the old and the
new secret verify. A request no trusted secret verifies is answered 400; a verified one with the
status the receiver is told to give (200 by default), and it counts as received only when that
status is 2xx.

The receiver can be made to fail: ``answer(500)``, ``hold()`` (requests wait, unanswered, until
``release``), ``down()`` (nothing listens on its port; connections are refused) and ``up()`` (back
on the same port). It runs in threads, independently of the test's event loop.

The library checks the ``webhook-timestamp`` against the system clock (five minutes either way).
A service under test that runs on ``FakeTime`` signs with the fake time, so a receiver given
``now`` measures that tolerance against it instead; the rest of the verification (headers, the
signature scheme, the constant-time comparison of every signature) is the library's own.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from standardwebhooks import Webhook, WebhookVerificationError

# The library's tolerance, applied to the receiver's own clock when it has one.
TOLERANCE = timedelta(minutes=5)


class _Verifier(Webhook):
    """The library's ``Webhook``, with its timestamp tolerance measured against ``now``."""

    def __init__(self, secret: str, now: Callable[[], datetime]) -> None:
        super().__init__(secret)
        self._now = now

    # The library's private check, by its mangled name: ``verify`` calls it for the timestamp.
    def _Webhook__verify_timestamp(self, timestamp_header: str) -> datetime:
        try:
            timestamp = datetime.fromtimestamp(float(timestamp_header), tz=self._now().tzinfo)
        except (TypeError, ValueError, OverflowError):
            raise WebhookVerificationError("Invalid Signature Headers") from None
        now = self._now()
        if timestamp < now - TOLERANCE:
            raise WebhookVerificationError("Message timestamp too old")
        if timestamp > now + TOLERANCE:
            raise WebhookVerificationError("Message timestamp too new")
        return timestamp


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the receiver saw it; header names are lower case."""

    path: str
    headers: dict[str, str]
    body: bytes
    # The trusted secrets that verified it (none: answered 400).
    verified_with: tuple[str, ...]
    status: int
    held: bool = False
    event: dict[str, Any] = field(default_factory=dict)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split()

    @property
    def accepted(self) -> bool:
        return bool(self.verified_with) and 200 <= self.status < 300


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.connection, ssl.SSLSocket)
        self.connection.do_handshake()

    def do_POST(self) -> None:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status = self.server.owner._answer(self.path, headers, body)
        if status is None:
            return  # held, then released by stopping: hang up without an answer
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, owner: WebhookReceiver, port: int, context: ssl.SSLContext) -> None:
        self.owner = owner
        self.context = context
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: object, client_address: object) -> None:
        # Senders hanging up (a killed replica, a timeout) are what these tests provoke.
        self.owner.errors += 1


class WebhookReceiver:
    """An HTTPS webhook receiver on 127.0.0.1 that verifies signatures; see the module docstring."""

    def __init__(self, context: ssl.SSLContext, *, now: Callable[[], datetime] | None = None) -> None:
        self._context = context
        self._now = now
        self._lock = threading.Lock()
        self._secrets: dict[str, list[str]] = {}
        self._received: list[Received] = []
        self._status = 200
        self._holding = False
        self._released = threading.Condition(self._lock)
        self._release_status: int | None = None
        self._generation = 0
        self._waiting = 0
        self.errors = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # Control --------------------------------------------------------------------------------

    def url(self, path: str = "/hooks") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def trust(self, path: str, *secrets: str) -> None:
        """Verify requests to ``path`` with these secrets (replacing any trusted before)."""
        with self._lock:
            self._secrets[path] = list(secrets)

    def answer(self, status: int) -> None:
        """Answer verified requests with ``status`` from now on."""
        with self._lock:
            self._status = status

    def hold(self) -> None:
        """Keep verified requests waiting, unanswered, until ``release`` (or ``down``)."""
        with self._lock:
            self._holding = True

    def release(self, status: int = 503) -> None:
        """Stop holding; the requests held are answered ``status`` (they count as received only
        if it is 2xx, and only if their sender is still there to read it)."""
        with self._lock:
            self._holding = False
            self._release_status = status
            self._generation += 1
            self._released.notify_all()

    def up(self) -> Self:
        """Listen (again, on the same port once it had one)."""
        assert self._server is None
        self._server = _Server(self, self.port, self._context)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop listening: held requests are dropped and new connections refused."""
        with self._lock:
            self._holding = False
            self._release_status = None
            self._generation += 1
            self._released.notify_all()
        if self._server is not None:
            self._server.shutdown()
            if self._thread is not None:
                self._thread.join()
            self._server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()

    # What arrived ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """Every request, in arrival order (held ones once answered or dropped)."""
        with self._lock:
            return list(self._received)

    def accepted(self, path: str | None = None) -> list[Received]:
        """The verified requests answered 2xx, optionally those to ``path`` only."""
        return [r for r in self.requests if r.accepted and (path is None or r.path == path)]

    def events(self, path: str | None = None) -> list[dict[str, Any]]:
        """The events accepted, in arrival order."""
        return [r.event for r in self.accepted(path)]

    @property
    def held(self) -> int:
        """Requests waiting now."""
        with self._lock:
            return self._waiting

    # Serving --------------------------------------------------------------------------------

    def _verify(self, path: str, headers: dict[str, str], body: bytes) -> tuple[str, ...]:
        with self._lock:
            secrets = list(self._secrets.get(path, ()))
        verified = []
        for secret in secrets:
            verifier = Webhook(secret) if self._now is None else _Verifier(secret, self._now)
            try:
                verifier.verify(body, headers)
            except WebhookVerificationError:
                continue
            verified.append(secret)
        return tuple(verified)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int | None:
        verified = self._verify(path, headers, body)
        event: dict[str, Any] = json.loads(body) if verified else {}
        with self._lock:
            if not verified:
                self._received.append(Received(path, headers, body, (), 400))
                return 400
            if not self._holding:
                status = self._status
                self._received.append(Received(path, headers, body, verified, status, event=event))
                return status
            generation = self._generation
            self._waiting += 1
            while self._generation == generation:
                self._released.wait()
            self._waiting -= 1
            released = self._release_status
            self._received.append(
                Received(path, headers, body, verified, released or 0, held=True, event=event)
            )
            return released
