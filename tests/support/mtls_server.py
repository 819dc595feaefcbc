"""An OAuth 2.0 authorization server that authenticates clients by their TLS certificate
(RFC 8705 §2.1, ``tls_client_auth``): Authlib on Flask, served over TLS from a thread.

Authlib has no RFC 8705 method, so one is registered with
``AuthorizationServer.register_client_auth_method``. The TLS layer asks every client for a
certificate and verifies it against the client CA it is given (``ssl.CERT_REQUIRED``): a
certificate that is expired or issued by another CA ends the handshake with an alert, before any
HTTP. The handshake runs in the connection's thread, and after refusing one the server reads
what the client still sends before it closes (``_linger``), as careful servers do: closing with
unread data resets the connection, and on loopback the reset can overtake the alert.

Werkzeug puts the verified certificate into the WSGI environ (``SSL_CLIENT_CERT``, PEM). The
method finds the client named by the form's ``client_id`` and accepts it only if the
certificate's subject is the one registered for that client (``tls_client_auth_subject_dn``,
RFC 8705 §2.1.2).

The grants, the token store and the client model are those of ``tests.support.authserver``; the
secret methods stay available, so one server can serve a client that moves to a certificate.
Every request's certificate is recorded (``seen``), so tests see what the provider saw.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from authlib.integrations.flask_oauth2 import AuthorizationServer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Flask, Response
from flask import request as flask_request
from werkzeug.serving import ThreadedWSGIServer

from tests.support.authserver import (
    AuthStore,
    IssuedTokenRecord,
    RegisteredClient,
    _ClientCredentialsGrant,
    _PasswordGrant,
    _QuietHandler,
    _RefreshTokenGrant,
)

TLS_CLIENT_AUTH = "tls_client_auth"
_CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", TLS_CLIENT_AUTH]


@dataclass(frozen=True, slots=True)
class SeenCertificate:
    """The certificate a request came with, as the server verified it."""

    subject: str
    fingerprint: str

    @classmethod
    def of(cls, pem: str) -> SeenCertificate:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
        return cls(subject=certificate.subject.rfc4514_string(), fingerprint=fingerprint(pem))


def fingerprint(pem: str) -> str:
    """The SHA-256 fingerprint (hex) of the first certificate of ``pem``."""
    certificate = x509.load_pem_x509_certificates(pem.encode("ascii"))[0]
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def subject(pem: str) -> str:
    """The RFC 4514 subject of the first certificate of ``pem``."""
    return x509.load_pem_x509_certificates(pem.encode("ascii"))[0].subject.rfc4514_string()


@dataclass
class CertificateClient(RegisteredClient):
    """A client that authenticates with ``tls_client_auth`` and has no secret."""

    client_secret: str = ""
    auth_method: str = TLS_CLIENT_AUTH
    tls_client_auth_subject_dn: str = ""

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_certificate(self, seen: SeenCertificate) -> bool:
        return bool(self.tls_client_auth_subject_dn) and seen.subject == self.tls_client_auth_subject_dn


def _peer_certificate() -> SeenCertificate | None:
    pem = flask_request.environ.get("SSL_CLIENT_CERT")
    return SeenCertificate.of(pem) if isinstance(pem, str) else None


def authenticate_tls_client_auth(query_client: Any, request: Any) -> RegisteredClient | None:
    """RFC 8705 §2.1: the client named in the form, if the verified certificate is its own."""
    client_id = request.form.get("client_id")
    seen = _peer_certificate()
    if not client_id or seen is None:
        return None
    client = query_client(client_id)
    if isinstance(client, CertificateClient) and client.check_certificate(seen):
        return client
    return None


class _CertificateClientCredentialsGrant(_ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS


class _CertificatePasswordGrant(_PasswordGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS


class _CertificateRefreshTokenGrant(_RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS


def _linger(sock: ssl.SSLSocket) -> None:
    """After refusing a handshake, read (below TLS) what the client still sends until it hangs up."""
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_WR)
        while socket.socket.recv(sock, 65536):
            pass


class _CertificateHandler(_QuietHandler):
    # Bounds the handshake, and the lingering after a refused one.
    timeout = 5
    refused = False

    def setup(self) -> None:
        sock = self.request
        assert isinstance(sock, ssl.SSLSocket)
        sock.settimeout(self.timeout)
        try:
            sock.do_handshake()
        except OSError:  # a refused certificate (ssl.SSLError), a timeout, a reset
            _linger(sock)
            self.refused = True
        super().setup()

    def handle(self) -> None:
        if not self.refused:
            super().handle()


class _Server(ThreadedWSGIServer):
    """Werkzeug's threaded server, accepting on a plain socket: each connection is wrapped without
    a handshake, which ``_CertificateHandler`` makes in the connection's own thread."""

    def __init__(self, app: Flask, ssl_context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", 0, app, handler=_CertificateHandler)
        # Set after the socket is made, so it stays plain; werkzeug reads it to speak of https.
        self.ssl_context = self._tls = ssl_context

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        return self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


@dataclass
class Observed:
    """What the server saw: one entry per request, ``None`` for a request without a certificate."""

    certificates: list[SeenCertificate | None] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    authorization_headers: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(store: AuthStore, observed: Observed, *, access_token_lifetime: int = 3600) -> Flask:
    """A Flask app with the token endpoint at ``/oauth/token`` that takes ``tls_client_auth``."""
    app = Flask(__name__)
    app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {
        "client_credentials": access_token_lifetime,
        "password": access_token_lifetime,
        "refresh_token": access_token_lifetime,
    }

    def query_client(client_id: str) -> RegisteredClient | None:
        with store.lock:
            return store.clients.get(client_id)

    def save_token(token: dict[str, Any], request: Any) -> None:
        record = IssuedTokenRecord(
            client_id=request.client.client_id,
            user=request.user,
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            scope=token.get("scope", ""),
            expires_in=int(token.get("expires_in", 0)),
        )
        with store.lock:
            store.tokens.append(record)

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.register_client_auth_method(TLS_CLIENT_AUTH, authenticate_tls_client_auth)
    # Authlib instantiates grants per request; the store reaches them as a class attribute.
    server.register_grant(_CertificateClientCredentialsGrant)
    server.register_grant(type("PasswordGrant", (_CertificatePasswordGrant,), {"store": store}))
    server.register_grant(type("RefreshTokenGrant", (_CertificateRefreshTokenGrant,), {"store": store}))

    @app.before_request
    def _observe() -> None:
        with observed.lock:
            observed.certificates.append(_peer_certificate())
            observed.forms.append(dict(flask_request.form.items()))
            observed.authorization_headers.append(flask_request.headers.get("Authorization"))

    @app.post("/oauth/token")
    def issue_token() -> Response:
        response: Response = server.create_token_response()
        return response

    return app


class MutualTLSAuthorizationServer:
    """Serves ``create_app`` over HTTPS on 127.0.0.1 at an ephemeral port.

    ``ssl_context`` must ask for client certificates (``LocalCA.verify_client_certificates``).
    ``request_count`` counts HTTP requests: a handshake refused over a certificate makes none.
    """

    def __init__(self, ssl_context: ssl.SSLContext, store: AuthStore | None = None) -> None:
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the server context must require client certificates")
        self.store = store or AuthStore()
        self.observed = Observed()
        app = create_app(self.store, self.observed)
        self._server = _Server(app, ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}/oauth/token"

    @property
    def request_count(self) -> int:
        with self.observed.lock:
            return len(self.observed.certificates)

    @property
    def seen(self) -> list[SeenCertificate | None]:
        """The certificate of each request so far, in order."""
        with self.observed.lock:
            return list(self.observed.certificates)

    def add_clients(self, clients: Iterable[RegisteredClient]) -> None:
        for client in clients:
            self.store.add_client(client)

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
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
