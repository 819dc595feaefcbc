"""A programmable HTTPS server that misbehaves on request.

Each request is answered by the next queued action, or by the default once the queue is empty. An
action is a ``Reply`` (status, headers, body, optionally delayed or dripped byte by byte), ``Drop``
(close the connection without answering) or a function of the recorded request returning one of
those. Every request is recorded, so tests count retries and prove redirects were not followed at
the server, where it happened, instead of trusting the client.

The server runs in threads, independent of the event loop of the test, and answers every request
with ``Connection: close`` so a retry always opens a new connection. Waits use an event that
``stop()`` sets, so a server stuck dripping a body shuts down at once.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import parse_qsl


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as the server received it; header names are lower case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        """The form-encoded body; a field sent twice makes the test fail loudly."""
        pairs = parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=bool(self.body))
        form = dict(pairs)
        assert len(form) == len(pairs), "a form field was sent more than once"
        return form


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, possibly slow.

    ``delay`` waits before the status line. ``drip_interval`` sends the body ``chunk_size`` bytes
    at a time with a pause between. Without ``declare_length`` the body is delimited by closing
    the connection, so the client cannot know its size in advance.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    drip_interval: float | None = None
    chunk_size: int = 1
    declare_length: bool = True

    @classmethod
    def json(cls, payload: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(
            status=status,
            headers={"Content-Type": "application/json", **(headers or {})},
            body=json.dumps(payload).encode(),
        )

    @classmethod
    def html(cls, status: int, text: str = "<html><body>Service Unavailable</body></html>") -> Reply:
        return cls(status=status, headers={"Content-Type": "text/html"}, body=text.encode())


@dataclass(frozen=True, slots=True)
class Drop:
    """Close the connection without sending anything."""


Action = Reply | Drop
Responder = Callable[[RecordedRequest], Action]


class _Handler(BaseHTTPRequestHandler):
    server: _TLSServer
    protocol_version = "HTTP/1.1"
    # Bounds a read from a client that connected and went quiet.
    timeout = 5

    def setup(self) -> None:
        super().setup()
        # Complete the handshake here, under the socket timeout set by ``setup``.
        assert isinstance(self.connection, ssl.SSLSocket)
        self.connection.do_handshake()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        action = self.server.owner._record_and_choose(request)
        if isinstance(action, Drop):
            return
        stopping = self.server.owner.stopping
        if action.delay and stopping.wait(action.delay):
            return
        self.send_response(action.status)
        for name, value in action.headers.items():
            self.send_header(name, value)
        if action.declare_length:
            self.send_header("Content-Length", str(len(action.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if action.drip_interval is None:
            self.wfile.write(action.body)
            return
        for start in range(0, len(action.body), action.chunk_size):
            self.wfile.write(action.body[start : start + action.chunk_size])
            self.wfile.flush()
            if stopping.wait(action.drip_interval):
                return

    def log_message(self, format: str, *args: object) -> None:
        pass


class _TLSServer(ThreadingHTTPServer):
    # Handler threads are joined on close; they end quickly because waits watch ``stopping``.
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: ScriptedServer, host: str, ssl_context: ssl.SSLContext) -> None:
        self.owner = owner
        self.ssl_context = ssl_context
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        # The handshake runs in the handler thread (on first read), so a client that refuses the
        # certificate cannot stall the accepting loop.
        wrapped = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-answer and failed handshakes are what these tests provoke.
        self.owner.errors += 1


class ScriptedServer:
    """An HTTPS server on an ephemeral port answering from a queue of actions."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        host: str = "127.0.0.1",
        default: Action | Responder = Reply(status=404),
    ) -> None:
        self.stopping = threading.Event()
        self.errors = 0
        self._default = default
        self._queue: deque[Action | Responder] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = _TLSServer(self, host, ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/", *, host: str | None = None) -> str:
        """The URL of ``path`` on this server, optionally under another name for the host."""
        name = host or self.host
        if ":" in name:
            name = f"[{name}]"
        return f"https://{name}:{self.port}{path}"

    def queue(self, *actions: Action | Responder) -> None:
        with self._lock:
            self._queue.extend(actions)

    def set_default(self, action: Action | Responder) -> None:
        with self._lock:
            self._default = action

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def _record_and_choose(self, request: RecordedRequest) -> Action:
        with self._lock:
            self._requests.append(request)
            chosen = self._queue.popleft() if self._queue else self._default
        return chosen(request) if callable(chosen) else chosen

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def unused_port() -> int:
    """A port nothing listens on (bound and released), for connection-refused tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
