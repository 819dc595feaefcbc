"""The console's pages: server-rendered HTML and plain forms over the service layer.

Every page needs a session (``app.console.sessions``), but the sign-in ones; every form that
changes something carries the session's CSRF token, compared in constant time before anything is
read or done; a read-only admin gets no such form, and the server refuses their posts (403).
The service layer does the work, as for the API: the same validation, limits, destination policy,
audit (the actor is the admin's ``sub``) and webhook events.

Pages send ``Cache-Control: no-store``, ``Referrer-Policy: same-origin``, ``X-Frame-Options:
DENY`` and a ``Content-Security-Policy`` without inline script or style (the stylesheet and the
script are files under content-hashed names, cached for a year).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from app.connectors import schemas
from app.connectors.callback import BINDING_COOKIE
from app.connectors.service import ConnectorService
from app.connectors.service.consent import CONSENT_TTL, OUTCOME_WORDS
from app.console import forms
from app.console.oidc import COOKIE as OIDC_COOKIE
from app.console.oidc import LOGIN_TTL, OidcClient, SignInRefused
from app.console.sessions import Session, SessionStore
from app.core.errors import AppError, ConnectorNotFound, InvalidRequest, VersionMismatch
from app.core.outbound import outbound_tenant
from app.core.resources import canonical_uuid
from app.core.urls import web_origin
from app.core.validation import field_errors

router = APIRouter(prefix="/console", include_in_schema=False)

COOKIE: Final = "connectors_console"
_HERE = Path(__file__).parent
_ENV = Environment(
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
_ENV.globals["static"] = STATIC.url
_ENV.globals["auth_types"] = forms.AUTH_TYPES
_ENV.globals["grant_types"] = forms.GRANT_TYPES
_ENV.globals["client_auth_methods"] = forms.CLIENT_AUTH_METHODS
_ENV.globals["api_key_places"] = forms.API_KEY_PLACES

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


def _headers(form_targets: str = "") -> dict[str, str]:
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


def _page(template: str, status: int = 200, *, form_targets: str = "", **context: Any) -> Response:
    html = _ENV.get_template(template).render(**context)
    return Response(
        html, status_code=status, media_type="text/html; charset=utf-8", headers=_headers(form_targets)
    )


def _see_other(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=_headers())


def _service(request: Request) -> ConnectorService:
    service: ConnectorService = request.app.state.connectors
    return service


def _sessions(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.console_sessions
    return store


async def _session(request: Request) -> Session | None:
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 100:
        return None
    session = await _sessions(request).get(session_id)
    if session is not None:
        request.scope.setdefault("state", {})["organization_id"] = session.organization_id
        outbound_tenant.set(session.organization_id)
    return session


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return {}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _csrf_ok(session: Session, data: Mapping[str, str]) -> bool:
    return hmac.compare_digest(session.csrf_token.encode(), data.get("csrf", "").encode())


def _words(state: str) -> str:
    return STATE_WORDS.get(state, state)


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC") if at is not None else "never"


_ENV.filters["state_words"] = _words
_ENV.filters["when"] = _when
_ENV.globals["kind_words"] = lambda auth: KIND_WORDS.get((auth["type"], auth.get("grant_type")), auth["type"])


def _signed_out(request: Request) -> Response:
    return _page("signin.html", 401, title="Sign in", oidc=request.app.state.console_oidc is not None)


def _forbidden(session: Session) -> Response:
    return _page(
        "message.html",
        403,
        session=session,
        title="Not allowed",
        message="Your sign-in lets you see connectors, not change them.",
    )


def _not_found(session: Session) -> Response:
    return _page(
        "message.html", 404, session=session, title="Not found", message="There is no such connector."
    )


def _connector_id(text: str) -> uuid.UUID:
    parsed = canonical_uuid(text)
    if parsed is None:
        raise ConnectorNotFound()
    return parsed


# Static files and signing in -------------------------------------------------------------------


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    found = STATIC.by_name.get(name)
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    content, media_type = found
    return Response(
        content, media_type=media_type, headers={"Cache-Control": "public, max-age=31536000, immutable"}
    )


@router.get("/sign-in")
async def sign_in(request: Request) -> Response:
    token = request.query_params.get("token", "")
    redeemed = await _sessions(request).redeem_link(token) if 0 < len(token) <= 100 else None
    if redeemed is None:
        return _page(
            "message.html",
            400,
            title="Sign-in link not valid",
            message="This sign-in link is unknown, was already used, or is more than 5 minutes old.",
        )
    session_id, _ = redeemed
    response = _see_other("/console/")
    _set_cookie(request, response, session_id)
    return response


def _secure(request: Request) -> bool:
    # Secure unless the service is reached over plain http (which the settings allow on loopback only).
    public: str = request.app.state.settings.effective_public_url
    return public.startswith("https://")


def _set_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(
        COOKIE, session_id, httponly=True, samesite="lax", secure=_secure(request), path="/console"
    )


@router.get("/sign-in/oidc")
async def sign_in_with_provider(request: Request) -> Response:
    oidc: OidcClient | None = request.app.state.console_oidc
    if oidc is None:
        return _page("message.html", 404, title="Not found", message="No identity provider is set up.")
    try:
        url, login = await oidc.start()
    except SignInRefused as refused:
        return _page("message.html", 502, title="Not signed in", message=str(refused))
    response = _see_other(url)
    response.set_cookie(
        OIDC_COOKIE,
        login,
        max_age=LOGIN_TTL,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
        path="/console",
    )
    return response


@router.get("/oidc/callback")
async def provider_callback(request: Request) -> Response:
    oidc: OidcClient | None = request.app.state.console_oidc
    if oidc is None:
        return _page("message.html", 404, title="Not found", message="No identity provider is set up.")
    query = request.query_params
    try:
        identity = await oidc.finish(
            code=query.get("code"),
            state=query.get("state"),
            error=query.get("error"),
            cookie=request.cookies.get(OIDC_COOKIE),
        )
    except SignInRefused as refused:
        response = _page("message.html", 400, title="Not signed in", message=str(refused))
        response.delete_cookie(OIDC_COOKIE, path="/console")
        return response
    session_id, _ = await _sessions(request).open(
        identity.organization_id, identity.subject, read_only=identity.read_only
    )
    response = _see_other("/console/")
    _set_cookie(request, response, session_id)
    response.delete_cookie(OIDC_COOKIE, path="/console")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    session = await _session(request)
    data = await _form(request)
    if session is None:
        return _signed_out(request)
    if not _csrf_ok(session, data):
        return _page("message.html", 403, session=session, title="Not done", message=_CSRF_WORDS)
    await _sessions(request).end(request.cookies[COOKIE])
    response = _page("message.html", title="Signed out", message="You are signed out.")
    response.delete_cookie(COOKIE, path="/console")
    return response


_CSRF_WORDS = "The form was sent without its security token (or an old one). Reload the page and try again."


# Connectors ------------------------------------------------------------------------------------


@router.get("/")
async def connectors_page(request: Request) -> Response:
    session = await _session(request)
    if session is None:
        return _signed_out(request)
    listed = await _service(request).list(session.organization_id)
    items = [item.model_dump(mode="python", by_alias=True) for item in listed.items]
    return _page(
        "connectors.html",
        session=session,
        title="Connectors",
        connectors=items,
        limit=listed.limit,
        at_limit=len(items) >= listed.limit,
        notice=_notice(request),
    )


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done")
    return {
        "created": "The connector was saved.",
        "deleted": "The connector was deleted.",
        "updated": "The connector was saved.",
        "validated": "The connector was checked.",
    }.get(done or "")


@router.get("/connectors/new")
async def new_connector(request: Request) -> Response:
    session = await _session(request)
    if session is None:
        return _signed_out(request)
    if not session.can_write:
        return _forbidden(session)
    return _form_page(request, session, forms.ConnectorForm(values={"type": "basic"}), None)


def _form_page(
    request: Request,
    session: Session,
    form: forms.ConnectorForm,
    connector: dict[str, Any] | None,
    status: int = 200,
) -> Response:
    return _page(
        "form.html",
        status,
        session=session,
        title="Edit connector" if connector else "New connector",
        form=form,
        connector=connector,
        redirect_uri=request.app.state.settings.callback_url,
    )


@router.post("/connectors")
async def create_connector(request: Request) -> Response:
    session = await _session(request)
    data = await _form(request)
    if session is None:
        return _signed_out(request)
    if not session.can_write:
        return _forbidden(session)
    if not _csrf_ok(session, data):
        return _page("message.html", 403, session=session, title="Not saved", message=_CSRF_WORDS)
    form = forms.ConnectorForm.posted(data)
    try:
        body = schemas.ConnectorCreate.model_validate(form.create_body())
        created = await _service(request).create(
            session.organization_id, body, validate=True, actor=session.subject
        )
    except ValidationError as error:
        form.place_errors(field_errors(error, rules=schemas.LOCATIONS))
        return _form_page(request, session, form, None, 422)
    except AppError as error:
        _refused(form, error)
        return _form_page(request, session, form, None, 422 if error.http_status < 500 else error.http_status)
    return _see_other(f"/console/connectors/{created.id}?done=created")


def _refused(form: forms.ConnectorForm, error: AppError) -> None:
    errors = error.extra.get("errors")
    if isinstance(errors, list) and errors:
        form.place_errors(errors)
    if not isinstance(errors, list) or not errors or "" in form.errors:
        form.problem = error.detail if error.detail != error.title else error.title


@router.get("/connectors/{connector_id}")
async def connector_page(request: Request, connector_id: str) -> Response:
    session = await _session(request)
    if session is None:
        return _signed_out(request)
    try:
        connector = await _service(request).get(session.organization_id, _connector_id(connector_id))
        history = await _service(request).history(session.organization_id, connector.id, limit=20)
    except ConnectorNotFound:
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such connector."
        )
    data = connector.model_dump(mode="python", by_alias=True)
    auth = data["auth"]
    targets = ""
    if auth.get("grant_type") == "authorization_code":
        # The Connect form's answer sends the browser on to the provider's consent page.
        targets = " " + web_origin(auth["authorization_url"])
    result = request.query_params.get("result")
    outcome = None
    if result == "connected":
        outcome = "The account is connected."
    elif result == "error":
        outcome = OUTCOME_WORDS.get(request.query_params.get("error", ""), OUTCOME_WORDS["provider_error"])
    return _page(
        "connector.html",
        session=session,
        form_targets=targets,
        title=data["name"],
        connector=data,
        history=[event.model_dump(mode="python", by_alias=True) for event in history.items],
        notice=_notice(request) or outcome,
    )


@router.get("/connectors/{connector_id}/edit")
async def edit_connector(request: Request, connector_id: str) -> Response:
    session = await _session(request)
    if session is None:
        return _signed_out(request)
    if not session.can_write:
        return _forbidden(session)
    try:
        connector = await _service(request).get(session.organization_id, _connector_id(connector_id))
    except ConnectorNotFound:
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such connector."
        )
    data = connector.model_dump(mode="python", by_alias=True)
    return _form_page(request, session, forms.ConnectorForm.of_connector(data), data)


@router.post("/connectors/{connector_id}/edit")
async def update_connector(request: Request, connector_id: str) -> Response:
    session = await _session(request)
    data = await _form(request)
    if session is None:
        return _signed_out(request)
    if not session.can_write:
        return _forbidden(session)
    if not _csrf_ok(session, data):
        return _page("message.html", 403, session=session, title="Not saved", message=_CSRF_WORDS)
    service = _service(request)
    try:
        stored = (await service.get(session.organization_id, _connector_id(connector_id))).model_dump(
            mode="python"
        )
    except ConnectorNotFound:
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such connector."
        )
    form = forms.ConnectorForm.posted(data)
    version = data.get("version", "")
    try:
        patch = schemas.ConnectorPatch.model_validate(form.patch_body(stored))
        await service.update(
            session.organization_id,
            stored["id"],
            patch,
            if_match=[int(version)] if version.isdigit() else [],
            validate=True,
            actor=session.subject,
        )
    except ValidationError as error:
        form.place_errors(field_errors(error, rules=schemas.LOCATIONS))
        return _form_page(request, session, form, stored, 422)
    except VersionMismatch:
        form.problem = (
            "Someone else changed this connector after you opened it. Nothing was saved: reload it to"
            " see their change, then make yours again."
        )
        return _form_page(request, session, form, stored, 409)
    except AppError as error:
        _refused(form, error)
        return _form_page(
            request, session, form, stored, 422 if error.http_status < 500 else error.http_status
        )
    return _see_other(f"/console/connectors/{stored['id']}?done=updated")


@router.get("/connectors/{connector_id}/delete")
async def confirm_delete(request: Request, connector_id: str) -> Response:
    session = await _session(request)
    if session is None:
        return _signed_out(request)
    if not session.can_write:
        return _forbidden(session)
    try:
        connector = await _service(request).get(session.organization_id, _connector_id(connector_id))
    except ConnectorNotFound:
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such connector."
        )
    return _page(
        "delete.html",
        session=session,
        title="Delete connector",
        connector=connector.model_dump(mode="python", by_alias=True),
    )


@router.post("/connectors/{connector_id}/{action}")
async def connector_action(request: Request, connector_id: str, action: str) -> Response:
    session = await _session(request)
    data = await _form(request)
    if session is None:
        return _signed_out(request)
    if action not in ("delete", "validate", "connect"):
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such page."
        )
    if not session.can_write:
        return _forbidden(session)
    if not _csrf_ok(session, data):
        return _page("message.html", 403, session=session, title="Not done", message=_CSRF_WORDS)
    service = _service(request)
    try:
        target = _connector_id(connector_id)
        if action == "delete":
            version = data.get("version", "")
            await service.delete(
                session.organization_id,
                target,
                if_match=[int(version)] if version.isdigit() else [],
                actor=session.subject,
            )
            return _see_other("/console/?done=deleted")
        if action == "validate":
            await service.validate(session.organization_id, target, actor=session.subject)
            return _see_other(f"/console/connectors/{target}?done=validated")
        page = f"{request.app.state.settings.effective_public_url}/console/connectors/{target}"
        binding = secrets.token_urlsafe(32)
        started = await service.start_consent(
            session.organization_id, target, return_url=page, actor=session.subject, binding=binding
        )
        response = _see_other(started.authorization_url)
        # Only this browser can finish the consent: the callback must bring the cookie back.
        response.set_cookie(
            BINDING_COOKIE,
            binding,
            max_age=int(CONSENT_TTL.total_seconds()),
            httponly=True,
            samesite="lax",
            secure=_secure(request),
            path="/oauth/callback",
        )
        return response
    except ConnectorNotFound:
        return _page(
            "message.html", 404, session=session, title="Not found", message="There is no such connector."
        )
    except VersionMismatch:
        return _page(
            "message.html",
            409,
            session=session,
            title="Not deleted",
            message="Someone else changed this connector after you opened it. Nothing was deleted.",
        )
    except (InvalidRequest, AppError) as error:
        return _page("message.html", 422, session=session, title="Not done", message=error.detail)


def sign_in_url(public_url: str, token: str) -> str:
    return f"{public_url}/console/sign-in?{urlencode({'token': token})}"
