"""Mutual TLS: requests that present a client certificate, against a real server that verifies it.

The server here keeps connections open between requests (unlike ``ScriptedServer``), so a pooled
connection would be reused if the client offered it: that is what shows a connection opened with
one certificate never carries a request made with another, or with none.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, Self

import httpcore
import pytest
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from pydantic import SecretStr

from app.core.errors import (
    AppError,
    CredentialsRejected,
    DestinationNotAllowed,
    UpstreamUnreachable,
)
from app.core.metrics import Metrics
from app.core.outbound import ClientCertificate, OutboundClient
from tests.conftest import CANARY, canary
from tests.support.fakes import FakeTime, StaticResolver
from tests.support.fixtures import MakeOutbound
from tests.support.metrics import parse
from tests.support.tls import LocalCA

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]
OUTBOUND = "connectors_outbound_request_duration_seconds_count"


# --- a server that verifies client certificates -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server saw it: the connection it came on and who the client was."""

    connection: int
    subject: str | None
    path: str


def _common_name(certificate: dict[str, Any] | None) -> str | None:
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def _linger(sock: ssl.SSLSocket) -> None:
    """After refusing a handshake, read what the client still sends until it hangs up.

    A server that closes with unread data (the rest of the client's handshake flight, or its
    request) resets the connection, and the reset can overtake the alert just sent, leaving the
    client with a bare "connection reset". Careful servers linger, and this one does, so what is
    tested is how the client reads the alert, not who wins that race on loopback.
    """
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_WR)
        while socket.socket.recv(sock, 65536):
            pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Longer than any wait below: a connection closes because the client closed it, not this.
    timeout = 30

    def setup(self) -> None:
        sock = self.request
        assert isinstance(sock, ssl.SSLSocket)
        self.number = self.server.owner._opened(sock)
        # The handshake, and so the verification of the client's certificate, happens here, before
        # the buffered files exist: a socket whose handshake failed then closes at once.
        sock.settimeout(self.timeout)
        try:
            sock.do_handshake()
        except ssl.SSLError:
            _linger(sock)
            raise
        super().setup()

    def do_GET(self) -> None:
        owner = self.server.owner
        assert isinstance(self.connection, ssl.SSLSocket)
        subject = _common_name(self.connection.getpeercert())
        status = owner._record(Seen(self.number, subject, self.path))
        if self.path == "/hold":
            owner.holding.set()
            owner.release.wait(5)
        body = (subject or "anonymous").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        self.server.owner._closed(self.number)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: MutualTLSServer, ssl_context: ssl.SSLContext) -> None:
        self.owner = owner
        self.ssl_context = ssl_context
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        self.owner._failed(error)


class MutualTLSServer:
    """An HTTPS server on 127.0.0.1 that asks for client certificates and keeps connections open.

    ``seen`` lists every request; ``connections`` counts the connections accepted (handshakes
    attempted); ``failures`` holds what went wrong on the server's side, such as a refused
    certificate. A request to ``/hold`` waits for ``release`` before it is answered.
    """

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Condition()
        self._seen: list[Seen] = []
        self._statuses: deque[int] = deque()
        self._sockets: dict[int, ssl.SSLSocket] = {}
        self._closed_numbers: set[int] = set()
        self._failures: list[BaseException] = []
        self._server = _Server(self, ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/", *, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def answer(self, *statuses: int) -> None:
        """Answer the next requests with ``statuses``, then with 200."""
        with self._lock:
            self._statuses.extend(statuses)

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._sockets)

    @property
    def failures(self) -> list[BaseException]:
        with self._lock:
            return list(self._failures)

    def wait_failures(self, count: int, timeout: float = 3.0) -> list[BaseException]:
        """The server-side failures, once there are ``count`` of them (or ``timeout`` passed).

        A client learns of a refused handshake from the alert, before the server's thread has
        finished failing.
        """
        with self._lock:
            self._lock.wait_for(lambda: len(self._failures) >= count, timeout)
            return list(self._failures)

    def wait_closed(self, number: int, timeout: float = 3.0) -> bool:
        """Whether connection ``number`` was closed by the client (waits up to ``timeout``)."""
        with self._lock:
            return self._lock.wait_for(lambda: number in self._closed_numbers, timeout)

    def _opened(self, sock: ssl.SSLSocket) -> int:
        with self._lock:
            number = len(self._sockets) + 1
            self._sockets[number] = sock
            return number

    def _record(self, seen: Seen) -> int:
        with self._lock:
            self._seen.append(seen)
            return self._statuses.popleft() if self._statuses else 200

    def _closed(self, number: int) -> None:
        with self._lock:
            self._closed_numbers.add(number)
            self._lock.notify_all()

    def _failed(self, error: BaseException | None) -> None:
        if error is not None:
            with self._lock:
                self._failures.append(error)
                self._lock.notify_all()

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            sockets = list(self._sockets.values())
        for sock in sockets:
            # The plain socket's shutdown: ends a handler waiting on a kept-alive connection.
            with suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._server.server_close()


class Serve(Protocol):
    def __call__(
        self, *, required: bool = True, maximum_version: ssl.TLSVersion | None = None
    ) -> MutualTLSServer: ...


# --- a network backend that tells where a TLS failure surfaced ----------------------------------


class _LoggedStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, log: list[str]) -> None:
        self._inner = inner
        self._log = log

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._inner.read(max_bytes, timeout)
        except ssl.SSLError as error:
            self._log.append(f"read failed: {error.reason}")
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        self._log.append("handshake completed")
        return _LoggedStream(stream, self._log)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class LoggingBackend(httpcore.AsyncNetworkBackend):
    """Logs each connection's address, a completed handshake and a TLS error on a read."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.log: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.log.append(f"connect {host}")
        stream = await self.inner.connect_tcp(host, port, timeout=timeout, socket_options=socket_options)
        return _LoggedStream(stream, self.log)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def client_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The CA the servers here trust for client certificates."""
    return LocalCA(tmp_path_factory.mktemp("client-ca"))


@pytest.fixture(scope="session")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """A CA no server here trusts."""
    return LocalCA(tmp_path_factory.mktemp("stranger-ca"))


def _certificate(ca: LocalCA, name: str, *, expired: bool = False) -> ClientCertificate:
    chain, key = ca.issue_client_certificate(name, expired=expired)
    # OpenSSL skips text before a PEM block, so the canary rides along wherever the key would go.
    return ClientCertificate(chain, SecretStr(f"{canary(name)}\n{key}"))


@pytest.fixture(scope="session")
def alice(client_ca: LocalCA) -> ClientCertificate:
    return _certificate(client_ca, "client-a")


@pytest.fixture(scope="session")
def bob(client_ca: LocalCA) -> ClientCertificate:
    return _certificate(client_ca, "client-b")


@pytest.fixture
def serve(local_ca: LocalCA, client_ca: LocalCA) -> Iterator[Serve]:
    servers: list[MutualTLSServer] = []

    def start(*, required: bool = True, maximum_version: ssl.TLSVersion | None = None) -> MutualTLSServer:
        context = local_ca.server_context()
        client_ca.verify_client_certificates(context, required=required)
        if maximum_version is not None:
            context.maximum_version = maximum_version
        server = MutualTLSServer(context).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _all_text(error: BaseException) -> str:
    """Everything an error could show: message, detail, extras and the whole chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        if isinstance(current, AppError):
            parts += [current.detail, repr(current.extra)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def _same(certificate: ClientCertificate) -> ClientCertificate:
    """An equal certificate in a new object: pools follow the content, not the object."""
    return ClientCertificate(
        certificate.certificate_pem, SecretStr(certificate.private_key_pem.get_secret_value())
    )


# --- presenting a certificate --------------------------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_the_server_sees_the_certificate_presented(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate, version: ssl.TLSVersion
) -> None:
    server = serve(maximum_version=version)

    response = await make_outbound().request(
        "GET", server.url("/check"), kind="validation", client_certificate=alice
    )

    assert response.status_code == 200
    assert response.content == b"client-a"
    assert server.seen == [Seen(connection=1, subject="client-a", path="/check")]
    assert server.failures == []


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_without_a_certificate_a_demanding_server_is_unreachable(
    make_outbound: MakeOutbound, serve: Serve, fake_time: FakeTime, version: ssl.TLSVersion
) -> None:
    # No certificate was presented, so the refusal says nothing about credentials: it is a TLS
    # failure like any other (with TLS 1.3 it arrives on the first read, after the handshake).
    server = serve(maximum_version=version)
    backend = LoggingBackend()

    with pytest.raises(UpstreamUnreachable, match=r"^the TLS handshake with 127\.0\.0\.1 failed$"):
        await make_outbound(network_backend=backend).request("GET", server.url(), kind="token")

    assert server.connections == 1
    assert server.seen == []
    assert fake_time.sleeps == []
    if version is ssl.TLSVersion.TLSv1_3:
        assert backend.log == [
            "connect 127.0.0.1",
            "handshake completed",
            "read failed: TLSV13_ALERT_CERTIFICATE_REQUIRED",
        ]
    else:
        assert backend.log == ["connect 127.0.0.1"]


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize(
    ("kind", "who"), [("token", "the token endpoint at 127.0.0.1"), ("validation", "127.0.0.1")]
)
async def test_an_expired_certificate_is_rejected_once(
    make_outbound: MakeOutbound,
    serve: Serve,
    client_ca: LocalCA,
    fake_time: FakeTime,
    version: ssl.TLSVersion,
    kind: str,
    who: str,
) -> None:
    server = serve(maximum_version=version)
    backend = LoggingBackend()
    expired = _certificate(client_ca, "client-expired", expired=True)

    with pytest.raises(CredentialsRejected) as caught:
        await make_outbound(network_backend=backend).request(
            "POST",
            server.url(),
            data={"grant_type": "client_credentials"},
            kind=kind,  # type: ignore[arg-type]
            client_certificate=expired,
        )

    assert caught.value.detail == f"{who} refused the client certificate (certificate expired)"
    assert CANARY not in _all_text(caught.value)
    # Not retried: one connection, no backoff.
    assert server.connections == 1
    assert server.seen == []
    assert fake_time.sleeps == []
    [failure] = await asyncio.to_thread(server.wait_failures, 1)
    assert isinstance(failure, ssl.SSLCertVerificationError)
    assert failure.verify_message == "certificate has expired"
    # TLS 1.3 servers refuse after the client finished its handshake: the alert comes on a read.
    if version is ssl.TLSVersion.TLSv1_3:
        assert backend.log == [
            "connect 127.0.0.1",
            "handshake completed",
            "read failed: SSLV3_ALERT_CERTIFICATE_EXPIRED",
        ]
    else:
        assert backend.log == ["connect 127.0.0.1"]


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_a_certificate_from_an_unknown_ca_is_rejected_once(
    make_outbound: MakeOutbound,
    serve: Serve,
    stranger_ca: LocalCA,
    fake_time: FakeTime,
    version: ssl.TLSVersion,
) -> None:
    server = serve(maximum_version=version)
    stranger = _certificate(stranger_ca, "client-stranger")

    with pytest.raises(CredentialsRejected) as caught:
        await make_outbound().request("GET", server.url(), kind="token", client_certificate=stranger)

    assert caught.value.detail == (
        "the token endpoint at 127.0.0.1 refused the client certificate (unknown certificate authority)"
    )
    assert CANARY not in _all_text(caught.value)
    assert server.connections == 1
    assert fake_time.sleeps == []


async def test_a_refused_certificate_counts_as_an_error(
    local_ca: LocalCA, serve: Serve, alice: ClientCertificate, stranger_ca: LocalCA, fake_time: FakeTime
) -> None:
    server = serve()
    metrics = Metrics()
    async with OutboundClient(
        timeout_seconds=2.0,
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=True,
        max_response_bytes=1024,
        clock=fake_time,
        sleep=fake_time.sleep,
        metrics=metrics,
    ) as client:
        await client.request("GET", server.url(), kind="token", client_certificate=alice)
        stranger = _certificate(stranger_ca, "client-stranger")
        with pytest.raises(CredentialsRejected):
            await client.request("GET", server.url(), kind="token", client_certificate=stranger)

    scrape = parse(metrics.render().decode())
    assert scrape.value(OUTBOUND, kind="token", result="2xx") == 1
    assert scrape.value(OUTBOUND, kind="token", result="error") == 1


# --- one pool per certificate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("required", "sequence"),
    [
        pytest.param(True, ["a", "a", "b", "a", "b"], id="required"),
        pytest.param(False, ["a", None, "b", None, "a"], id="optional"),
    ],
)
async def test_connections_never_carry_another_identity(
    make_outbound: MakeOutbound,
    serve: Serve,
    alice: ClientCertificate,
    bob: ClientCertificate,
    required: bool,
    sequence: list[str | None],
) -> None:
    server = serve(required=required)
    client = make_outbound()
    certificates = {"a": alice, "b": bob, None: None}
    subjects = {"a": "client-a", "b": "client-b", None: None}

    for who in sequence:
        chosen = certificates[who]
        response = await client.request(
            "GET",
            server.url(f"/{who}"),
            kind="validation",
            client_certificate=None if chosen is None else _same(chosen),
        )
        assert response.status_code == 200

    seen = server.seen
    assert [s.subject for s in seen] == [subjects[who] for who in sequence]
    # Each identity kept its own connection alive, and no connection served two identities.
    by_connection: dict[int, set[str | None]] = {}
    for s in seen:
        by_connection.setdefault(s.connection, set()).add(s.subject)
    assert all(len(identities) == 1 for identities in by_connection.values())
    assert server.connections == len(set(sequence))


async def test_an_evicted_pool_is_closed_and_all_close_with_the_client(
    local_ca: LocalCA,
    serve: Serve,
    alice: ClientCertificate,
    bob: ClientCertificate,
) -> None:
    server = serve()
    async with OutboundClient(
        timeout_seconds=2.0,
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=True,
        max_response_bytes=1024,
        max_client_certificates=1,
    ) as client:
        await client.request("GET", server.url(), kind="validation", client_certificate=alice)
        await client.request("GET", server.url(), kind="validation", client_certificate=bob)
        # Alice's pool made way for Bob's, and its connection was closed with it.
        assert await asyncio.to_thread(server.wait_closed, 1)
        await client.request("GET", server.url(), kind="validation", client_certificate=alice)
        assert [(s.connection, s.subject) for s in server.seen] == [
            (1, "client-a"),
            (2, "client-b"),
            (3, "client-a"),
        ]
        assert await asyncio.to_thread(server.wait_closed, 2)

    assert await asyncio.to_thread(server.wait_closed, 3)


async def test_a_pool_in_use_is_not_evicted_from_under_its_request(
    local_ca: LocalCA,
    serve: Serve,
    client_ca: LocalCA,
    alice: ClientCertificate,
    bob: ClientCertificate,
) -> None:
    server = serve()
    carol = _certificate(client_ca, "client-c")
    async with OutboundClient(
        timeout_seconds=4.0,
        ca_bundle=local_ca.ca_bundle,
        allow_private_destinations=True,
        max_response_bytes=1024,
        max_client_certificates=1,
    ) as client:
        held = asyncio.create_task(
            client.request("GET", server.url("/hold"), kind="validation", client_certificate=alice)
        )
        assert await asyncio.to_thread(server.holding.wait, 4)
        # Bob's pool is added while Alice's request is under way on hers.
        await client.request("GET", server.url(), kind="validation", client_certificate=bob)
        server.release.set()
        response = await held
        assert response.content == b"client-a"
        assert not server.wait_closed(1, timeout=0)
        # Once idle, Alice's pool is the least recently used and the next newcomer evicts it.
        await client.request("GET", server.url(), kind="validation", client_certificate=carol)
        assert await asyncio.to_thread(server.wait_closed, 1)

    assert [s.subject for s in server.seen] == ["client-a", "client-b", "client-c"]


# --- everything else stays as it is --------------------------------------------------------------


async def test_the_destination_policy_still_applies(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate
) -> None:
    server = serve()
    resolver = StaticResolver({"api.example.test": ["127.0.0.1"]})
    client = make_outbound(allow_private_destinations=False, resolver=resolver)

    with pytest.raises(DestinationNotAllowed, match=r"^127\.0\.0\.1 is a loopback address$"):
        await client.request("GET", server.url(), kind="token", client_certificate=alice)
    with pytest.raises(DestinationNotAllowed, match=r"^api\.example\.test resolves to a loopback address$"):
        await client.request(
            "GET", server.url(host="api.example.test"), kind="token", client_certificate=alice
        )

    assert server.connections == 0


async def test_connections_go_to_the_checked_address_and_verify_the_server_name(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate
) -> None:
    server = serve()
    backend = LoggingBackend()
    resolver = StaticResolver({"api.example.test": ["127.0.0.1"], "evil.example.test": ["127.0.0.1"]})
    client = make_outbound(resolver=resolver, network_backend=backend)

    response = await client.request(
        "GET", server.url(host="api.example.test"), kind="validation", client_certificate=alice
    )
    assert response.content == b"client-a"
    assert backend.log == ["connect 127.0.0.1", "handshake completed"]

    # The server's certificate does not name evil.example.test: our side refuses, not theirs.
    with pytest.raises(UpstreamUnreachable, match=r"evil\.example\.test could not be verified"):
        await client.request(
            "GET", server.url(host="evil.example.test"), kind="validation", client_certificate=alice
        )
    assert len(server.seen) == 1


async def test_the_server_is_verified_against_the_same_trust_store(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate, fake_time: FakeTime
) -> None:
    server = serve()

    with pytest.raises(UpstreamUnreachable, match="could not be verified"):
        await make_outbound(ca_bundle=None).request(
            "GET", server.url(), kind="token", client_certificate=alice
        )

    assert server.seen == []
    assert fake_time.sleeps == []


async def test_retries_work_as_without_a_certificate(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate, fake_time: FakeTime
) -> None:
    server = serve()
    server.answer(503)

    response = await make_outbound().request("GET", server.url(), kind="token", client_certificate=alice)

    assert response.status_code == 200
    assert [s.subject for s in server.seen] == ["client-a", "client-a"]
    assert len(fake_time.sleeps) == 1


# --- pairs that cannot be loaded ------------------------------------------------------------------


def _encrypted(certificate: ClientCertificate) -> str:
    key = load_pem_private_key(certificate.private_key_pem.get_secret_value().encode(), None)
    encrypted = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"passphrase"))
    return f"{canary('encrypted')}\n{encrypted.decode()}"


@pytest.mark.parametrize(
    ("key_of", "problem"),
    [
        pytest.param("bob", "the private key does not belong to the certificate", id="mismatch"),
        pytest.param("garbage", "the certificate or its private key is not valid PEM", id="garbage"),
        pytest.param("encrypted", "the private key is encrypted", id="encrypted"),
    ],
)
async def test_a_pair_that_cannot_be_loaded_is_refused_without_quoting_it(
    make_outbound: MakeOutbound,
    serve: Serve,
    alice: ClientCertificate,
    bob: ClientCertificate,
    key_of: str,
    problem: str,
) -> None:
    server = serve()
    keys = {
        "bob": bob.private_key_pem.get_secret_value(),
        "garbage": f"{canary('garbage')} is not a key",
        "encrypted": _encrypted(alice),
    }
    broken = ClientCertificate(alice.certificate_pem, SecretStr(keys[key_of]))

    # The pair is the connector's credentials at fault: refused, as a provider refusing it would be.
    with pytest.raises(CredentialsRejected) as caught:
        await make_outbound().request("GET", server.url(), kind="token", client_certificate=broken)

    assert problem in str(caught.value.detail)
    text = _all_text(caught.value)
    assert CANARY not in text
    assert "-----BEGIN" not in text
    assert alice.certificate_pem.splitlines()[1] not in text
    assert server.connections == 0


def test_a_certificate_never_shows_its_key(alice: ClientCertificate) -> None:
    key = alice.private_key_pem.get_secret_value()
    for shown in (repr(alice), str(alice)):
        assert CANARY not in shown
        assert key.splitlines()[2] not in shown


# --- the key never touches a regular file --------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory of the process for the test, empty at the start."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``load_cert_chain`` was given, looked at while it was being loaded."""

    key_path: str
    target: str
    mode: int
    directory_mode: int


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Loaded]:
    loaded: list[Loaded] = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, keyfile: str | None = None, password: Any = None) -> None:
        # The test servers load theirs from one file; client certificates come with a key file.
        if keyfile is not None:
            in_proc = keyfile.startswith("/proc/")
            loaded.append(
                Loaded(
                    key_path=keyfile,
                    target=os.readlink(keyfile) if in_proc else os.path.realpath(keyfile),
                    mode=os.stat(keyfile).st_mode & 0o777,
                    directory_mode=os.stat(os.path.dirname(keyfile)).st_mode & 0o777,
                )
            )
        original(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    return loaded


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux only")
async def test_the_key_is_loaded_from_memory(
    make_outbound: MakeOutbound, serve: Serve, alice: ClientCertificate, spool: Path, loads: list[Loaded]
) -> None:
    server = serve()

    response = await make_outbound().request("GET", server.url(), kind="token", client_certificate=alice)

    assert response.content == b"client-a"
    [loaded] = loads
    assert loaded.key_path.startswith("/proc/self/fd/")
    assert loaded.target.startswith("/memfd:")
    # The descriptor was closed once the key was loaded.
    assert not os.path.exists(loaded.key_path) or os.readlink(loaded.key_path) != loaded.target
    assert list(spool.iterdir()) == []


async def test_without_memfd_the_key_file_is_private_and_removed(
    make_outbound: MakeOutbound,
    serve: Serve,
    alice: ClientCertificate,
    spool: Path,
    loads: list[Loaded],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    server = serve()

    response = await make_outbound().request("GET", server.url(), kind="token", client_certificate=alice)

    assert response.content == b"client-a"
    [loaded] = loads
    assert Path(loaded.target).parent.parent == spool.resolve()
    assert (loaded.mode, loaded.directory_mode) == (0o600, 0o700)
    assert list(spool.iterdir()) == []
