"""A real OAuth 2.0 authorization server (Authlib on Flask), served over TLS from a thread.

Our token client is checked against an implementation written by someone else, so a shared
misreading of RFC 6749 cannot pass unnoticed. The server supports the client credentials,
password and refresh token grants, both ``client_secret_basic`` and ``client_secret_post``
(each client is registered with one of them, as providers do), issues refresh tokens for the
password grant, and rotates them: a used refresh token is revoked.

One deliberate change from Authlib's defaults: a wrong resource-owner password answers
``invalid_grant``, as RFC 6749 §5.2 says and as common providers do; Authlib answers
``invalid_request``.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError
from flask import Flask, Response
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

_CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


@dataclass
class RegisteredClient(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = ("client_credentials", "password", "refresh_token")
    scope: str = "read write"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint != "token" or method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class IssuedTokenRecord(TokenMixin):  # type: ignore[misc]
    client_id: str
    user: str | None
    access_token: str
    refresh_token: str | None
    scope: str
    expires_in: int
    issued_at: float = field(default_factory=time.time)
    revoked: bool = False

    def check_client(self, client: RegisteredClient) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() > self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked


@dataclass
class AuthStore:
    """In-memory clients, resource owners and issued tokens, shared with the server thread."""

    clients: dict[str, RegisteredClient] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    tokens: list[IssuedTokenRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_client(self, client: RegisteredClient) -> RegisteredClient:
        with self.lock:
            self.clients[client.client_id] = client
        return client

    def add_user(self, username: str, password: str) -> None:
        with self.lock:
            self.users[username] = password

    def find_access_token(self, access_token: str) -> IssuedTokenRecord | None:
        with self.lock:
            return next((t for t in self.tokens if t.access_token == access_token), None)

    def revoke(self, access_token: str) -> None:
        """Revoke an issued access token, and the refresh token issued with it (RFC 7009); resource
        servers that ask the store (``is_revoked``) refuse it from then on."""
        with self.lock:
            for token in self.tokens:
                if token.access_token == access_token:
                    token.revoked = True
                    return
        raise KeyError("no such access token")


class _PasswordGrant(grants.ResourceOwnerPasswordCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS
    store: AuthStore

    def authenticate_user(self, username: str, password: str) -> str:
        with self.store.lock:
            expected = self.store.users.get(username)
        if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
            raise InvalidGrantError("Invalid resource owner credentials.")
        return username


class _ClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS


class _RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True
    store: AuthStore

    def authenticate_refresh_token(self, refresh_token: str) -> IssuedTokenRecord | None:
        with self.store.lock:
            for token in self.store.tokens:
                if token.refresh_token == refresh_token and not token.revoked:
                    return token
        return None

    def authenticate_user(self, refresh_token: IssuedTokenRecord) -> str | None:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: IssuedTokenRecord) -> None:
        with self.store.lock:
            refresh_token.revoked = True


def create_app(store: AuthStore, *, access_token_lifetime: int = 3600) -> Flask:
    """A Flask app with the token endpoint at ``/oauth/token``."""
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
    # Authlib instantiates grants per request; the store reaches them as a class attribute.
    password_grant = type("PasswordGrant", (_PasswordGrant,), {"store": store})
    refresh_grant = type("RefreshTokenGrant", (_RefreshTokenGrant,), {"store": store})
    server.register_grant(_ClientCredentialsGrant)
    server.register_grant(password_grant)
    server.register_grant(refresh_grant)

    @app.post("/oauth/token")
    def issue_token() -> Response:
        response: Response = server.create_token_response()
        return response

    return app


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class AuthorizationServerThread:
    """Serves ``create_app(store)`` over HTTPS on 127.0.0.1 at an ephemeral port."""

    def __init__(self, ssl_context: ssl.SSLContext, store: AuthStore | None = None) -> None:
        self.store = store or AuthStore()
        self.request_count = 0
        app = create_app(self.store)

        @app.before_request
        def _count() -> None:
            self.request_count += 1

        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler, ssl_context=ssl_context
        )
        self._thread: threading.Thread | None = None

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}/oauth/token"

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
