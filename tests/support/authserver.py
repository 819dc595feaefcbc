"""A real OAuth 2.0 authorization server (Authlib on Flask), served over TLS from a thread.

Our token client is checked against an implementation written by someone else, so a shared
misreading of RFC 6749 cannot pass unnoticed. The server supports the client credentials,
password and refresh token grants, ``client_secret_basic``, ``client_secret_post`` and
``private_key_jwt`` (each client is registered with one of them, as providers do), issues refresh
tokens for the password grant, and rotates them: a used refresh token is revoked.

``private_key_jwt`` clients are registered with a public JWK, and their assertions are verified
by Authlib's RFC 7523 client authentication (``JWTBearerClientAssertion``): signature, ``iss`` =
``sub``, ``aud`` (the token URL unless ``AuthStore.assertion_audiences`` says otherwise), ``exp``
and a ``jti`` never seen before. Every assertion received is kept (``AuthStore.assertions``).

The authorization code grant (RFC 6749 §4.1) is served as a provider serves it to a browser: the
authorization endpoint renders its own sign-in page, then a consent page (Allow / Deny), and
redirects to the client's registered redirect URI with the code, PKCE (S256) required and the
issuer in the response (RFC 9207). Codes are single use; ``AuthStore.end_grants`` revokes every
token of a user, as an admin revoking the app at the provider does.

One deliberate change from Authlib's defaults: a wrong resource-owner password answers
``invalid_grant``, as RFC 6749 §5.2 says and as common providers do; Authlib answers
``invalid_request``.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidGrantError, OAuth2Error
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import AuthorizationCodeMixin as OIDCAuthorizationCodeMixin
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, Response, redirect, request, session
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, RSAKey, import_key
from markupsafe import escape
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Response as WerkzeugResponse

_CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
# The algorithms a private_key_jwt client may sign with; a registered key's "alg" narrows them.
_ASSERTION_ALGORITHMS = ["RS256", "PS256", "ES256"]


@dataclass
class RegisteredClient(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = ("client_credentials", "password", "refresh_token")
    scope: str = "read write"
    # private_key_jwt: the public key the client's assertions are verified with.
    public_jwk: dict[str, Any] | None = None
    # The authorization code grant: the redirect URIs registered, matched exactly.
    redirect_uris: tuple[str, ...] = ()

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if not self.client_secret:
            return False  # a client registered without a secret has none to match
        return secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint != "token" or method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

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
class AuthorizationCodeRecord(OIDCAuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None = None
    issued_at: float = field(default_factory=time.time)

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return int(self.issued_at)

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() > self.issued_at + 60


@dataclass
class AuthStore:
    """In-memory clients, resource owners and issued tokens, shared with the server thread."""

    clients: dict[str, RegisteredClient] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    tokens: list[IssuedTokenRecord] = field(default_factory=list)
    # private_key_jwt: the audiences an assertion may name (the server sets its token URL), the
    # jti values seen, and every client assertion received, verified or not.
    assertion_audiences: list[str] = field(default_factory=list)
    seen_jtis: set[tuple[str, str]] = field(default_factory=set)
    assertions: list[str] = field(default_factory=list)
    # The authorization code grant: codes issued and not yet used, every code exchange seen
    # (its form fields), whether the token response carries a refresh token, and the issuer the
    # authorization response names (None: the server's own).
    codes: dict[str, AuthorizationCodeRecord] = field(default_factory=dict)
    code_exchanges: list[dict[str, str]] = field(default_factory=list)
    issue_refresh_tokens: bool = True
    response_issuer: str | None = None
    # OpenID Connect: ID tokens are signed with this key; each user's organization and scopes
    # are claims of theirs (org_id, scope).
    signing_key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, private=True))
    user_claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def end_grants(self, user: str) -> int:
        """Revoke every token issued to ``user`` (an admin removing the app at the provider)."""
        with self.lock:
            ended = [token for token in self.tokens if token.user == user and not token.revoked]
            for token in ended:
                token.revoked = True
            return len(ended)

    def add_client(self, client: RegisteredClient) -> RegisteredClient:
        with self.lock:
            self.clients[client.client_id] = client
        return client

    def set_public_jwk(self, client_id: str, public_jwk: dict[str, Any]) -> None:
        """Register another public key for a ``private_key_jwt`` client (the old one stops working)."""
        with self.lock:
            self.clients[client_id].public_jwk = public_jwk

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


class _PrivateKeyJWT(JWTBearerClientAssertion):  # type: ignore[misc]
    """``private_key_jwt`` (RFC 7523 §2.2) as Authlib implements it; the store provides the
    audiences, the client's public key and the jti values seen."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, store: AuthStore) -> None:
        super().__init__(validate_jti=True)
        self.store = store

    def __call__(self, query_client: Any, request: Any) -> RegisteredClient | None:
        assertion = request.form.get("client_assertion")
        if assertion:
            with self.store.lock:
                self.store.assertions.append(assertion)
        client: RegisteredClient | None = super().__call__(query_client, request)
        return client

    def get_audiences(self) -> list[str]:
        with self.store.lock:
            return list(self.store.assertion_audiences)

    def validate_jti(self, claims: Any, jti: str) -> bool:
        with self.store.lock:
            key = (str(claims["sub"]), jti)
            if key in self.store.seen_jtis:
                return False
            self.store.seen_jtis.add(key)
            return True

    def resolve_client_public_key(self, client: RegisteredClient) -> Key:
        if client.public_jwk is None:
            raise InvalidClientError(description="The client has no public key registered.")
        return import_key(client.public_jwk)

    def process_assertion_claims(self, assertion: str, resolve_key: Key) -> Any:
        # Authlib's own, naming the algorithms allowed: joserfc otherwise takes only those it
        # recommends, which leaves out PS256.
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=_ASSERTION_ALGORITHMS)
        except JoseError as error:
            raise InvalidClientError(description=error.description) from error
        self.verify_claims(token.claims)
        return token.claims


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


class _AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = _CLIENT_AUTH_METHODS
    store: AuthStore

    def save_authorization_code(self, code: str, request: Any) -> None:
        record = AuthorizationCodeRecord(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.payload.scope or "",
            user=request.user,
            code_challenge=request.payload.data.get("code_challenge"),
            code_challenge_method=request.payload.data.get("code_challenge_method"),
            nonce=request.payload.data.get("nonce"),
        )
        with self.store.lock:
            self.store.codes[code] = record

    def query_authorization_code(self, code: str, client: RegisteredClient) -> AuthorizationCodeRecord | None:
        with self.store.lock:
            record = self.store.codes.get(code)
            self.store.code_exchanges.append(dict(self.request.form))
        if record is not None and record.client_id == client.client_id and not record.is_expired():
            return record
        return None

    def delete_authorization_code(self, authorization_code: AuthorizationCodeRecord) -> None:
        with self.store.lock:
            self.store.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthorizationCodeRecord) -> str:
        return authorization_code.user


class _OpenIDCode(OpenIDCode):  # type: ignore[misc]
    """ID tokens for the authorization code grant (OpenID Connect Core §3.1), signed RS256."""

    def __init__(self, store: AuthStore, issuer: Callable[[], str]) -> None:
        super().__init__(require_nonce=True)
        self.store = store
        self.issuer = issuer

    def exists_nonce(self, nonce: str, request: Any) -> bool:
        with self.store.lock:
            return any(record.nonce == nonce for record in self.store.codes.values())

    def resolve_client_private_key(self, client: RegisteredClient) -> RSAKey:
        return self.store.signing_key

    def get_client_algorithm(self, client: RegisteredClient) -> str:
        return "RS256"

    def get_client_claims(self, client: RegisteredClient) -> dict[str, Any]:
        return {"iss": self.issuer(), "aud": [client.client_id]}

    def generate_user_info(self, user: str, scope: str) -> UserInfo:
        with self.store.lock:
            return UserInfo(sub=user, **self.store.user_claims.get(user, {}))


class _Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, store: AuthStore, default: Callable[[], str]) -> None:
        self.store = store
        self.default = default

    def get_issuer(self) -> str:
        with self.store.lock:
            return self.store.response_issuer or self.default()


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>
<body><main><h1>{title}</h1>{body}</main></body></html>"""


def _login_page(error: str = "") -> str:
    body = (
        (f'<p role="alert">{escape(error)}</p>' if error else "")
        + '<form method="post" action="/login">'
        + f'<input type="hidden" name="next" value="{escape(request.full_path)}">'
        + '<label>Username <input name="username" autocomplete="username"></label>'
        + '<label>Password <input name="password" type="password" autocomplete="current-password"></label>'
        + '<button type="submit">Sign in</button></form>'
    )
    return _PAGE.format(title="Sign in to Example IdP", body=body)


def _consent_page(client_id: str, scope: str, user: str) -> str:
    body = (
        f"<p>Signed in as {escape(user)}.</p>"
        f"<p>The application <strong>{escape(client_id)}</strong> asks for:"
        f" {escape(scope or 'no scope')}.</p>"
        f'<form method="post" action="{escape(request.full_path)}">'
        '<button type="submit" name="decision" value="allow">Allow</button> '
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )
    return _PAGE.format(title="Allow access?", body=body)


def create_app(store: AuthStore, *, access_token_lifetime: int = 3600) -> Flask:
    """A Flask app with the token endpoint at ``/oauth/token``."""
    app = Flask(__name__)
    app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
    app.secret_key = secrets.token_bytes(32)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {
        "authorization_code": access_token_lifetime,
        "client_credentials": access_token_lifetime,
        "password": access_token_lifetime,
        "refresh_token": access_token_lifetime,
    }

    def query_client(client_id: str) -> RegisteredClient | None:
        with store.lock:
            return store.clients.get(client_id)

    def save_token(token: dict[str, Any], request: Any) -> None:
        if request.payload.grant_type == "authorization_code" and not store.issue_refresh_tokens:
            token.pop("refresh_token", None)
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
    server.register_client_auth_method(_PrivateKeyJWT.CLIENT_AUTH_METHOD, _PrivateKeyJWT(store))
    # Authlib instantiates grants per request; the store reaches them as a class attribute.
    password_grant = type("PasswordGrant", (_PasswordGrant,), {"store": store})
    refresh_grant = type("RefreshTokenGrant", (_RefreshTokenGrant,), {"store": store})
    code_grant = type("AuthorizationCodeGrant", (_AuthorizationCodeGrant,), {"store": store})
    issuer = lambda: request.host_url.rstrip("/")  # noqa: E731
    server.register_grant(code_grant, [CodeChallenge(required=True), _OpenIDCode(store, issuer)])
    server.register_extension(_Issuer(store, issuer))
    server.register_grant(_ClientCredentialsGrant)
    server.register_grant(password_grant)
    server.register_grant(refresh_grant)

    @app.post("/oauth/token")
    def issue_token() -> Response:
        response: Response = server.create_token_response()
        return response

    @app.get("/.well-known/openid-configuration")
    def discovery() -> Response:
        base = request.host_url.rstrip("/")
        document = {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "jwks_uri": f"{base}/jwks",
            "response_types_supported": ["code"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        }
        return Response(json.dumps(document), mimetype="application/json")

    @app.get("/jwks")
    def jwks() -> Response:
        public = store.signing_key.as_dict(private=False)
        return Response(
            json.dumps({"keys": [{**public, "use": "sig", "alg": "RS256"}]}), mimetype="application/json"
        )

    @app.get("/api/me")
    def resource() -> Response:
        """A resource of the provider's: the bearer token must be one it issued and still honours."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        record = store.find_access_token(token) if token else None
        if record is None or record.is_revoked() or record.is_expired():
            return Response('{"error": "invalid_token"}', status=401, mimetype="application/json")
        return Response(json.dumps({"user": record.user, "scope": record.scope}), mimetype="application/json")

    @app.get("/oauth/authorize")
    def authorize_page() -> Response | str:
        user = session.get("user")
        if user is None:
            return _login_page()
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as error:
            return Response(_PAGE.format(title="Error", body=escape(error.error)), status=400)
        return _consent_page(grant.client.client_id, grant.request.payload.scope or "", user)

    @app.post("/oauth/authorize")
    def authorize_decision() -> Response:
        user = session.get("user")
        granted = user if user is not None and request.form.get("decision") == "allow" else None
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as error:
            return Response(_PAGE.format(title="Error", body=escape(error.error)), status=400)
        response: Response = server.create_authorization_response(grant_user=granted, grant=grant)
        return response

    @app.post("/login")
    def login() -> WerkzeugResponse | str:
        username, password = request.form.get("username", ""), request.form.get("password", "")
        with store.lock:
            expected = store.users.get(username)
        if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
            return _login_page("Wrong username or password")
        session["user"] = username
        target = request.form.get("next", "/")
        return redirect(target if target.startswith("/oauth/authorize") else "/")

    return app


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class AuthorizationServerThread:
    """Serves ``create_app(store)`` over HTTPS on 127.0.0.1 at an ephemeral port."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        store: AuthStore | None = None,
        *,
        access_token_lifetime: int = 3600,
    ) -> None:
        self.store = store or AuthStore()
        self.request_count = 0
        app = create_app(self.store, access_token_lifetime=access_token_lifetime)

        @app.before_request
        def _count() -> None:
            self.request_count += 1

        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler, ssl_context=ssl_context
        )
        self._thread: threading.Thread | None = None
        if not self.store.assertion_audiences:
            self.store.assertion_audiences = [self.token_url]

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}/oauth/token"

    @property
    def authorization_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}/oauth/authorize"

    @property
    def issuer(self) -> str:
        """The server's issuer identifier, an audience some providers want instead of the token URL."""
        return f"https://127.0.0.1:{self._server.server_port}"

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
