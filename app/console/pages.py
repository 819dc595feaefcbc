"""What every console page shares: the templates, static files, headers, sessions and CSRF.

Pages send ``Cache-Control: no-store``, ``Referrer-Policy: same-origin``, ``X-Frame-Options:
DENY`` and a ``Content-Security-Policy`` without inline script or style (the stylesheet and the
script are files under content-hashed names, cached for a year). Every form that changes
something carries the session's CSRF token, compared in constant time before anything is done.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import ImmutableMultiDict

from app.console import forms, i18n
from app.console.sessions import Session, SessionStore
from app.core.outbound import outbound_tenant

COOKIE: Final = "connectors_console"
_HERE = Path(__file__).parent
ENV = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
# At most this much form body is read (a connector's form is a few KiB; PEM keys come later).
_MAX_FORM_BYTES: Final = 64 * 1024


class StaticFiles:
    """The console's stylesheet and script under names holding their content's hash."""

    def __init__(self, directory: Path) -> None:
        self.by_name: dict[str, tuple[bytes, str]] = {}
        self.hashed: dict[str, str] = {}
        types = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
        for path in sorted(directory.iterdir()):
            content = path.read_bytes()
            digest = hashlib.sha256(content).hexdigest()[:16]
            name = f"{path.stem}.{digest}{path.suffix}"
            self.hashed[path.name] = name
            self.by_name[name] = (content, types.get(path.suffix, "application/octet-stream"))

    def url(self, name: str) -> str:
        return f"/console/static/{self.hashed[name]}"


STATIC = StaticFiles(_HERE / "static")
ENV.globals["static"] = STATIC.url
ENV.globals["auth_types"] = forms.AUTH_TYPES
ENV.globals["grant_types"] = forms.GRANT_TYPES
ENV.globals["client_auth_methods"] = forms.CLIENT_AUTH_METHODS
ENV.globals["api_key_places"] = forms.API_KEY_PLACES
ENV.globals["signing_algs"] = forms.SIGNING_ALGS

STATE_WORDS: Final = {
    "unverified": "Not checked",
    "authorized": "Working",
    "rejected": "Credentials refused",
    "unreachable": "Could not be reached",
    "consent_required": "Needs an admin to connect the account",
}
KIND_WORDS: Final = {
    ("basic", None): "Basic authentication",
    ("oauth2", "client_credentials"): "OAuth 2.0, client credentials",
    ("oauth2", "password"): "OAuth 2.0, password grant",
    ("oauth2", "authorization_code"): "OAuth 2.0, authorization code",
    ("api_key", None): "API key",
}


def headers(form_targets: str = "") -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
            f"form-action 'self'{form_targets}; frame-ancestors 'none'; base-uri 'none'"
        ),
    }


def page(template: str, status: int = 200, *, form_targets: str = "", **context: Any) -> Response:
    """A page in the request's language (``set_language``), remembered when it was switched."""
    chosen = i18n.current()
    html = ENV.get_template(template).render(
        _=chosen.gettext, lang=chosen.code, languages=i18n.NAMES, **context
    )
    response = Response(
        html, status_code=status, media_type="text/html; charset=utf-8", headers=headers(form_targets)
    )
    if chosen.switched:
        response.set_cookie(i18n.COOKIE, chosen.code, max_age=365 * 86_400, samesite="lax", path="/console")
    return response


def set_language(request: Request) -> None:
    """Pick the language of this request's pages (``app.console.i18n.language``)."""
    i18n.choose(
        i18n.language(
            request.query_params.get("lang"),
            request.cookies.get(i18n.COOKIE),
            request.headers.get("accept-language"),
        )
    )


def see_other(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=headers())


def sessions(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.console_sessions
    return store


async def session_of(request: Request) -> Session | None:
    set_language(request)
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 100:
        return None
    session = await sessions(request).get(session_id)
    if session is not None:
        request.scope.setdefault("state", {})["organization_id"] = session.organization_id
        outbound_tenant.set(session.organization_id)
    return session


async def writer(
    request: Request, *, posted: bool = True
) -> tuple[Session, ImmutableMultiDict[str, str]] | Response:
    """The signed-in admin who may change things, and the form they sent (its CSRF token checked);
    or the page that refuses: signed out (401), read-only (403), no or another token (403)."""
    session = await session_of(request)
    data = await form_data(request) if posted else ImmutableMultiDict[str, str]()
    if session is None:
        return signed_out(request)
    if not session.can_write:
        return forbidden(session)
    if posted and not valid_csrf(session, data):
        return page("message.html", 403, session=session, title="Not done", message=CSRF_WORDS)
    return session, data


async def form_data(request: Request) -> ImmutableMultiDict[str, str]:
    """The form posted (``application/x-www-form-urlencoded``); a field may repeat."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return ImmutableMultiDict()
    return ImmutableMultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def valid_csrf(session: Session, data: Mapping[str, str]) -> bool:
    return hmac.compare_digest(session.csrf_token.encode(), data.get("csrf", "").encode())


# A status's detail (an error code, and the provider's own after a colon) in words.
DETAIL_WORDS: Final = {
    "credentials_rejected": "The provider refused the credentials",
    "token_endpoint_error": "The token endpoint answered with an error",
    "token_endpoint_timeout": "The token endpoint did not answer in time",
    "upstream_unreachable": "The service could not be reached",
    "upstream_timeout": "The service did not answer in time",
    "name_not_resolved": "Its host name could not be resolved",
    "destination_not_allowed": "Its address is not allowed (a private or local address)",
    "secret_unreadable": "Its stored secret cannot be decrypted with the service's keys",
    "database_unavailable": "The service's database was unavailable",
    "unexpected_error": "An unexpected error",
}


def _detail(detail: str | None) -> str:
    code, _, provider = (detail or "").partition(": ")
    words = i18n.current().gettext(DETAIL_WORDS.get(code, code))
    return f"{words} ({provider})" if provider else words


def _words(state: str) -> str:
    return i18n.current().gettext(STATE_WORDS.get(state, state))


def _when(at: datetime | None) -> str:
    return i18n.current().when(at)


def _kind(auth: Mapping[str, Any]) -> str:
    return i18n.current().gettext(KIND_WORDS.get((auth["type"], auth.get("grant_type")), auth["type"]))


ENV.filters["state_words"] = _words
ENV.filters["when"] = _when
ENV.filters["detail_words"] = _detail
ENV.globals["kind_words"] = _kind


def signed_out(request: Request) -> Response:
    return page("signin.html", 401, title="Sign in", oidc=request.app.state.console_oidc is not None)


def forbidden(session: Session) -> Response:
    return page(
        "message.html",
        403,
        session=session,
        title="Not allowed",
        message="Your sign-in lets you see connectors, not change them.",
    )


def is_secure(request: Request) -> bool:
    # Secure unless the service is reached over plain http (which the settings allow on loopback only).
    public: str = request.app.state.settings.effective_public_url
    return public.startswith("https://")


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(
        COOKIE, session_id, httponly=True, samesite="lax", secure=is_secure(request), path="/console"
    )


CSRF_WORDS: Final = (
    "The form was sent without its security token (or an old one). Reload the page and try again."
)
