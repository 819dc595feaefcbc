"""Token requests to an OAuth 2.0 token endpoint (RFC 6749), and what their answers mean.

The choices that are not forced by the RFC, and why:

* **Client authentication is one method, never both**, applied by the configuration's
  ``client_auth`` (one module per method in ``app.connectors.kinds.client_auth``).
  ``client_secret_basic`` puts the client id and secret in an HTTP Basic header, each
  percent-encoded first (RFC 6749 §2.3.1 asks for the form encoding of Appendix B). Everything but
  the unreserved characters is escaped, and a space becomes ``%20`` rather than ``+``: servers that
  decode with plain percent-decoding (Authlib does) and servers that form-decode both read ``%20``
  as a space, while ``+`` means a space only to the latter (``client_basic_header``).
* **Scope, audience and the extra parameters go on every request, refreshes included.** Providers
  such as Auth0 pick the API a token is for from ``audience``; a refresh without it can return a
  token for another API. Extra parameters never replace a field that the grant, the client
  authentication, ``scope`` or ``audience`` define (``RESERVED_TOKEN_PARAMS``): a configuration
  could otherwise swap the grant type or send the client secret in a second place. Names are
  compared by ``token_param_key`` (NFKC, trimmed, case-folded, ``.``, ``-`` and spaces read as
  ``_``), since many providers read form names without regard to case, and PHP reads ``.`` as
  ``_``: ``GRANT_TYPE`` and ``grant.type`` are ``grant_type`` to them. Of two extra names
  with the same key, only the first is sent.
* **A response is judged on status and body together.** A 2xx counts only with a JSON object
  holding a string ``access_token`` of visible ASCII (it ends up in a header) and no ``error``
  member; some providers answer errors with 200.
* **``token_type`` missing is accepted as Bearer.** RFC 6749 requires it, but providers that omit
  it issue bearer tokens, and refusing them would fail a working connector. Any other value
  (``mac``, ``DPoP``, ``N_A``) is refused: the service only hands out ``Bearer`` headers, and
  such a token would not work in one.
* **``expires_in``** may be a number or a numeric string (both occur in the wild). Zero, negative,
  non-finite or non-numeric values are refused: a token that is already expired cannot be used,
  and treating it as valid would hand out dead tokens. Values above a year are cut to a year, so
  the cache still renews such a token now and then. Without ``expires_in`` the connector's
  ``token_lifetime_seconds`` applies, or the service default.
* **Errors carry only the provider's ``error`` code**, and only if it is a short token of safe
  characters. ``error_description`` and ``error_uri`` are free text written by the provider and
  may echo what was sent (some echo the client id or worse), so they never reach a caller.
  ``invalid_client``, ``invalid_grant`` and ``unauthorized_client`` mean the credentials were
  refused (``CredentialsRejected``), as does a 401 without a readable error. On a refresh, those
  codes that speak about the grant (``invalid_grant``, ``unauthorized_client``,
  ``unsupported_grant_type``) raise ``RefreshTokenRejected`` instead: the refresh token is dead or
  refreshing is not allowed, and the configured grant should run again.
"""

from __future__ import annotations

import base64
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Final, NoReturn
from urllib.parse import quote

from opentelemetry.trace import Span, Tracer

from app.core import tracing
from app.core.errors import AppError, ConsentRequired, CredentialsRejected, InvalidRequest, TokenEndpointError
from app.core.metrics import Metrics
from app.core.outbound import OutboundClient
from app.tokens.types import CodeExchange, OAuth2Config, RefreshTokenRejected, TokenGrant

__all__ = [
    "MAX_EXPIRES_IN_SECONDS",
    "RESERVED_TOKEN_PARAMS",
    "OAuth2TokenClient",
    "build_token_request",
    "client_basic_header",
    "token_param_key",
]

MAX_EXPIRES_IN_SECONDS: Final = 365 * 86_400

# Form fields a configuration's extra parameters may not set.
RESERVED_TOKEN_PARAMS: Final = frozenset(
    {
        "grant_type",
        "refresh_token",
        "username",
        "password",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "code",
        "code_verifier",
        "redirect_uri",
        "scope",
        "audience",
    }
)

# RFC 6749 section 5.2, RFC 8707 and RFC 9449 token endpoint errors, and two common extensions.
_KNOWN_ERROR_CODES: Final = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "invalid_dpop_proof",
        "use_dpop_nonce",
        "temporarily_unavailable",
        "server_error",
        "access_denied",
    }
)
_REJECTED_CODES: Final = frozenset({"invalid_client", "invalid_grant", "unauthorized_client"})
_REFRESH_REJECTED_CODES: Final = frozenset({"invalid_grant", "unauthorized_client", "unsupported_grant_type"})
_SAFE_ERROR_CODE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NUMERIC: Final = re.compile(r"\d{1,12}(?:\.\d{1,9})?")
# Visible ASCII only: a token becomes part of an Authorization header.
_HEADER_SAFE_TOKEN: Final = re.compile(r"[\x21-\x7e]+")
_NAME_SEPARATORS: Final = re.compile(r"[.\- ]")
# RFC 6749 §3.3 scope tokens, separated by spaces.
_SCOPE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*")


def token_param_key(name: str) -> str:
    """What a form field name is compared by: a provider may ignore case in names, and some read
    ``.``, ``-`` and spaces in a name as ``_`` (PHP turns ``grant.type`` into ``grant_type``)."""
    return _NAME_SEPARATORS.sub("_", unicodedata.normalize("NFKC", name).strip().casefold())


def client_basic_header(client_id: str, client_secret: str) -> str:
    """The ``client_secret_basic`` header value (RFC 6749 §2.3.1): encode each part, then Basic."""
    user = quote(client_id, safe="")
    secret = quote(client_secret, safe="")
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode("ascii")).decode("ascii")


class OAuth2TokenClient:
    """Runs token requests through the outbound client; implements ``TokenFetcher``."""

    def __init__(
        self,
        outbound: OutboundClient,
        default_token_lifetime_seconds: int,
        *,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """``tracer``: a client span per token request (``app.core.tracing``)."""
        if default_token_lifetime_seconds <= 0:
            raise ValueError("default_token_lifetime_seconds must be positive")
        self._outbound = outbound
        self._default_lifetime = default_token_lifetime_seconds
        self._requests = (metrics or Metrics()).token_requests
        self._tracer = tracer

    async def __call__(self, config: OAuth2Config, refresh_token: str | None = None) -> TokenGrant:
        """Run the configured grant, or the refresh grant when ``refresh_token`` is given.

        The configured grant of an authorization code connector is a refresh with the grant an
        admin gave, which its ``StoredGrant`` runs (and keeps the rotated refresh token of).
        """
        if refresh_token is None and config.grant_type == "authorization_code":
            if config.grant is None:
                raise ConsentRequired()
            return await config.grant.renew(lambda token: self._run(config, token, None))
        return await self._run(config, refresh_token, None)

    async def exchange_code(self, config: OAuth2Config, exchange: CodeExchange) -> TokenGrant:
        """Exchange an authorization code (with its PKCE verifier) for tokens."""
        return await self._run(config, None, exchange)

    async def _run(
        self, config: OAuth2Config, refresh_token: str | None, exchange: CodeExchange | None
    ) -> TokenGrant:
        form, headers = build_token_request(config, refresh_token, exchange)
        grant_type = form["grant_type"]
        # The span records the token URL's host, the grant type, the status and the outcome only.
        with tracing.outbound_span(
            self._tracer, "token request", "POST", config.token_url, {"connectors.grant_type": grant_type}
        ) as span:
            # Counted in the vocabulary of a connector's status; a cancelled request is not counted.
            try:
                grant = await self._send(
                    config, form, headers, refresh_token=refresh_token, exchange=exchange, span=span
                )
            except (CredentialsRejected, RefreshTokenRejected):
                self._requests.labels(grant_type, "rejected").inc()
                span.set_attribute(tracing.OUTCOME, "rejected")
                raise
            except Exception:
                self._requests.labels(grant_type, "unreachable").inc()
                span.set_attribute(tracing.OUTCOME, "unreachable")
                raise
            self._requests.labels(grant_type, "authorized").inc()
            span.set_attribute(tracing.OUTCOME, "authorized")
        return grant

    async def _send(
        self,
        config: OAuth2Config,
        form: dict[str, str],
        headers: dict[str, str],
        *,
        refresh_token: str | None,
        exchange: CodeExchange | None,
        span: Span,
    ) -> TokenGrant:
        first = [form]

        def attempt_form() -> dict[str, str]:
            # A retry sends a form made afresh: a client assertion (its jti) is good for one use.
            return first.pop() if first else build_token_request(config, refresh_token, exchange)[0]

        response = await self._outbound.request(
            "POST",
            config.token_url,
            headers=headers,
            data=attempt_form,
            kind="token",
            client_certificate=config.client_auth.certificate,
        )
        span.set_attribute("http.response.status_code", response.status_code)
        body = _json_object(response.content)
        status = response.status_code
        if 200 <= status < 300 and (body is None or "error" not in body):
            lifetime = config.token_lifetime_seconds or self._default_lifetime
            return _grant_from(body, status, lifetime)
        _raise_for_error(status, body, refreshing=refresh_token is not None)


def build_token_request(
    config: OAuth2Config, refresh_token: str | None = None, exchange: CodeExchange | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The form fields and headers of one token request: the refresh grant when given
    ``refresh_token``, the code exchange when given ``exchange``, else the configured grant."""
    form: dict[str, str] = {}
    if refresh_token is not None:
        form["grant_type"] = "refresh_token"
        form["refresh_token"] = refresh_token
    elif exchange is not None:
        form["grant_type"] = "authorization_code"
        form["code"] = exchange.code
        form["redirect_uri"] = exchange.redirect_uri
        form["code_verifier"] = exchange.code_verifier
    elif config.grant_type == "authorization_code":
        raise InvalidRequest("the authorization code grant runs by consent or with a refresh token")
    elif config.grant_type == "password":
        if config.username is None or config.password is None:
            raise InvalidRequest("the password grant needs a username and a password")
        form["grant_type"] = "password"
        form["username"] = config.username
        form["password"] = config.password.get_secret_value()
    else:
        form["grant_type"] = "client_credentials"
    if config.scope and exchange is None:
        # A code carries the scope its consent granted (RFC 6749 §4.1.3 sends none with it).
        form["scope"] = config.scope
    if config.audience:
        form["audience"] = config.audience
    # Every field set above or below has a reserved name, so no extra parameter can replace one.
    taken = set(RESERVED_TOKEN_PARAMS)
    for name, value in config.extra_token_params.items():
        key = token_param_key(name)
        if key not in taken:
            taken.add(key)
            form[name] = value

    headers = {"Accept": "application/json"}
    config.client_auth.apply(
        client_id=config.client_id, token_url=config.token_url, form=form, headers=headers
    )
    return form, headers


def _json_object(content: bytes) -> Mapping[str, object] | None:
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        # ValueError covers undecodable bytes too; RecursionError a deeply nested document.
        return None
    return value if isinstance(value, dict) else None


def _grant_from(body: Mapping[str, object] | None, status: int, default_lifetime: int) -> TokenGrant:
    if body is None:
        raise TokenEndpointError(f"the token endpoint answered HTTP {status} without a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not _HEADER_SAFE_TOKEN.fullmatch(access_token):
        raise TokenEndpointError("the token endpoint answered without a usable access_token")
    token_type = body.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        raise TokenEndpointError("the token endpoint issued a token that is not a Bearer token")
    refresh_token = body.get("refresh_token")
    if refresh_token is not None and (
        not isinstance(refresh_token, str) or not _HEADER_SAFE_TOKEN.fullmatch(refresh_token)
    ):
        raise TokenEndpointError("the token endpoint answered with an unusable refresh_token")
    scope = body.get("scope")
    return TokenGrant(
        access_token=access_token,
        expires_in=_expires_in(body.get("expires_in"), default_lifetime),
        refresh_token=refresh_token or None,
        # Shown to admins as the granted scope: a plain, bounded string or nothing.
        scope=scope if isinstance(scope, str) and len(scope) <= 1024 and _SCOPE.fullmatch(scope) else None,
    )


def _expires_in(raw: object, default_lifetime: int) -> float:
    if raw is None:
        return float(default_lifetime)
    value: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:
            value = None
    elif isinstance(raw, str) and _NUMERIC.fullmatch(raw.strip()):
        value = float(raw)
    if value is None or not math.isfinite(value) or value <= 0:
        raise TokenEndpointError("the token endpoint answered with an invalid expires_in")
    return min(value, float(MAX_EXPIRES_IN_SECONDS))


def _provider_error(body: Mapping[str, object] | None) -> str | None:
    if body is None:
        return None
    code = body.get("error")
    if not isinstance(code, str) or not _SAFE_ERROR_CODE.fullmatch(code):
        return None
    # Only registered codes pass: a provider's free-form "code" could carry anything.
    return code if code in _KNOWN_ERROR_CODES else "other"


def _raise_for_error(status: int, body: Mapping[str, object] | None, *, refreshing: bool) -> NoReturn:
    code = _provider_error(body)
    answered = f"the token endpoint answered HTTP {status}" + (f" with error {code}" if code else "")
    if refreshing and code in _REFRESH_REJECTED_CODES:
        raise RefreshTokenRejected(answered)
    if code in _REJECTED_CODES or (code is None and status == 401):
        raise _with_code(CredentialsRejected, answered, code)
    if 300 <= status < 400:
        raise TokenEndpointError(f"the token endpoint answered with a redirect (HTTP {status}), not followed")
    raise _with_code(TokenEndpointError, answered, code)


def _with_code(error: type[AppError], detail: str, code: str | None) -> AppError:
    return error(detail) if code is None else error(detail, provider_error=code)
