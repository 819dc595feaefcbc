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

import secrets
import uuid
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from app.connectors import schemas
from app.connectors.callback import BINDING_COOKIE
from app.connectors.service import ConnectorService
from app.connectors.service.consent import CONSENT_TTL, OUTCOME_WORDS
from app.console import forms
from app.console.oidc import COOKIE as OIDC_COOKIE
from app.console.oidc import LOGIN_TTL, OidcClient, SignInRefused
from app.console.pages import (
    COOKIE,
    CSRF_WORDS,
    STATIC,
    form_data,
    is_secure,
    page,
    see_other,
    session_of,
    sessions,
    set_language,
    set_session_cookie,
    signed_out,
    valid_csrf,
    writer,
)
from app.console.sessions import Session
from app.core.errors import AppError, ConnectorNotFound, InvalidRequest, VersionMismatch
from app.core.resources import canonical_uuid
from app.core.urls import web_origin
from app.core.validation import field_errors

router = APIRouter(prefix="/console", include_in_schema=False)


def _service(request: Request) -> ConnectorService:
    service: ConnectorService = request.app.state.connectors
    return service


def _not_found(session: Session) -> Response:
    message = "There is no such connector."
    return page("message.html", 404, session=session, title="Not found", message=message)


def _connector_id(text: str) -> uuid.UUID:
    parsed = canonical_uuid(text)
    if parsed is None:
        raise ConnectorNotFound()
    return parsed


async def _to_change(request: Request, connector_id: str) -> tuple[Session, schemas.Connector] | Response:
    """The session of an admin who may change things and the connector a form changes, or the
    page that refuses (signed out, read only, no such connector)."""
    allowed = await writer(request, posted=False)
    if isinstance(allowed, Response):
        return allowed
    session, _ = allowed
    try:
        return session, await _service(request).get(session.organization_id, _connector_id(connector_id))
    except ConnectorNotFound:
        return _not_found(session)


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
    set_language(request)
    token = request.query_params.get("token", "")
    redeemed = await sessions(request).redeem_link(token) if 0 < len(token) <= 100 else None
    if redeemed is None:
        return page(
            "message.html",
            400,
            title="Sign-in link not valid",
            message="This sign-in link is unknown, was already used, or is more than 5 minutes old.",
        )
    session_id, _ = redeemed
    response = see_other("/console/")
    set_session_cookie(request, response, session_id)
    return response


@router.get("/sign-in/oidc")
async def sign_in_with_provider(request: Request) -> Response:
    set_language(request)
    oidc: OidcClient | None = request.app.state.console_oidc
    if oidc is None:
        return page("message.html", 404, title="Not found", message="No identity provider is set up.")
    try:
        url, login = await oidc.start()
    except SignInRefused as refused:
        return page("message.html", 502, title="Not signed in", message=str(refused))
    response = see_other(url)
    response.set_cookie(
        OIDC_COOKIE,
        login,
        max_age=LOGIN_TTL,
        httponly=True,
        samesite="lax",
        secure=is_secure(request),
        path="/console",
    )
    return response


@router.get("/oidc/callback")
async def provider_callback(request: Request) -> Response:
    set_language(request)
    oidc: OidcClient | None = request.app.state.console_oidc
    if oidc is None:
        return page("message.html", 404, title="Not found", message="No identity provider is set up.")
    query = request.query_params
    try:
        identity = await oidc.finish(
            code=query.get("code"),
            state=query.get("state"),
            error=query.get("error"),
            cookie=request.cookies.get(OIDC_COOKIE),
        )
    except SignInRefused as refused:
        response = page("message.html", 400, title="Not signed in", message=str(refused))
        response.delete_cookie(OIDC_COOKIE, path="/console")
        return response
    session_id, _ = await sessions(request).open(
        identity.organization_id, identity.subject, read_only=identity.read_only
    )
    response = see_other("/console/")
    set_session_cookie(request, response, session_id)
    response.delete_cookie(OIDC_COOKIE, path="/console")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    session = await session_of(request)
    data = await form_data(request)
    if session is None:
        return signed_out(request)
    if not valid_csrf(session, data):
        return page("message.html", 403, session=session, title="Not done", message=CSRF_WORDS)
    await sessions(request).end(request.cookies[COOKIE])
    response = page("message.html", title="Signed out", message="You are signed out.")
    response.delete_cookie(COOKIE, path="/console")
    return response


# Connectors ------------------------------------------------------------------------------------


@router.get("/")
async def connectorspage(request: Request) -> Response:
    session = await session_of(request)
    if session is None:
        return signed_out(request)
    listed = await _service(request).list(session.organization_id)
    items = [item.model_dump(mode="python", by_alias=True) for item in listed.items]
    return page(
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
    allowed = await writer(request, posted=False)
    if isinstance(allowed, Response):
        return allowed
    session, _ = allowed
    return _formpage(request, session, forms.ConnectorForm(values={"type": "basic"}), None)


def _formpage(
    request: Request,
    session: Session,
    form: forms.ConnectorForm,
    connector: dict[str, Any] | None,
    status: int = 200,
) -> Response:
    return page(
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
    allowed = await writer(request)
    if isinstance(allowed, Response):
        return allowed
    session, data = allowed
    form = forms.ConnectorForm.posted(data)
    try:
        body = schemas.ConnectorCreate.model_validate(form.create_body())
        created = await _service(request).create(
            session.organization_id, body, validate=True, actor=session.subject
        )
    except ValidationError as error:
        form.place_errors(field_errors(error, rules=schemas.LOCATIONS))
        return _formpage(request, session, form, None, 422)
    except AppError as error:
        _refused(form, error)
        return _formpage(request, session, form, None, 422 if error.http_status < 500 else error.http_status)
    return see_other(f"/console/connectors/{created.id}?done=created")


def _refused(form: forms.ConnectorForm, error: AppError) -> None:
    errors = error.extra.get("errors")
    if isinstance(errors, list) and errors:
        form.place_errors(errors)
    if not isinstance(errors, list) or not errors or "" in form.errors:
        form.problem = error.detail if error.detail != error.title else error.title


@router.get("/connectors/{connector_id}")
async def connectorpage(request: Request, connector_id: str) -> Response:
    session = await session_of(request)
    if session is None:
        return signed_out(request)
    try:
        connector = await _service(request).get(session.organization_id, _connector_id(connector_id))
        history = await _service(request).history(session.organization_id, connector.id, limit=20)
    except ConnectorNotFound:
        return _not_found(session)
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
    return page(
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
    found = await _to_change(request, connector_id)
    if isinstance(found, Response):
        return found
    session, connector = found
    data = connector.model_dump(mode="python", by_alias=True)
    return _formpage(request, session, forms.ConnectorForm.of_connector(data), data)


@router.post("/connectors/{connector_id}/edit")
async def update_connector(request: Request, connector_id: str) -> Response:
    allowed = await writer(request)
    if isinstance(allowed, Response):
        return allowed
    session, data = allowed
    service = _service(request)
    try:
        stored = (await service.get(session.organization_id, _connector_id(connector_id))).model_dump(
            mode="python"
        )
    except ConnectorNotFound:
        return _not_found(session)
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
        return _formpage(request, session, form, stored, 422)
    except VersionMismatch:
        form.problem = (
            "Someone else changed this connector after you opened it. Nothing was saved: reload it to"
            " see their change, then make yours again."
        )
        return _formpage(request, session, form, stored, 409)
    except AppError as error:
        _refused(form, error)
        return _formpage(
            request, session, form, stored, 422 if error.http_status < 500 else error.http_status
        )
    return see_other(f"/console/connectors/{stored['id']}?done=updated")


@router.get("/connectors/{connector_id}/delete")
async def confirm_delete(request: Request, connector_id: str) -> Response:
    found = await _to_change(request, connector_id)
    if isinstance(found, Response):
        return found
    session, connector = found
    return page(
        "delete.html",
        session=session,
        title="Delete connector",
        connector=connector.model_dump(mode="python", by_alias=True),
    )


@router.post("/connectors/{connector_id}/{action}")
async def connector_action(request: Request, connector_id: str, action: str) -> Response:
    allowed = await writer(request)
    if isinstance(allowed, Response):
        return allowed
    session, data = allowed
    if action not in ("delete", "validate", "connect"):
        return page("message.html", 404, session=session, title="Not found", message="There is no such page.")
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
            return see_other("/console/?done=deleted")
        if action == "validate":
            await service.validate(session.organization_id, target, actor=session.subject)
            return see_other(f"/console/connectors/{target}?done=validated")
        back_to = f"{request.app.state.settings.effective_public_url}/console/connectors/{target}"
        binding = secrets.token_urlsafe(32)
        started = await service.start_consent(
            session.organization_id, target, return_url=back_to, actor=session.subject, binding=binding
        )
        response = see_other(started.authorization_url)
        # Only this browser can finish the consent: the callback must bring the cookie back.
        response.set_cookie(
            BINDING_COOKIE,
            binding,
            max_age=int(CONSENT_TTL.total_seconds()),
            httponly=True,
            samesite="lax",
            secure=is_secure(request),
            path="/oauth/callback",
        )
        return response
    except ConnectorNotFound:
        return _not_found(session)
    except VersionMismatch:
        return page(
            "message.html",
            409,
            session=session,
            title="Not deleted",
            message="Someone else changed this connector after you opened it. Nothing was deleted.",
        )
    except (InvalidRequest, AppError) as error:
        return page("message.html", 422, session=session, title="Not done", message=error.detail)


def sign_in_url(public_url: str, token: str) -> str:
    return f"{public_url}/console/sign-in?{urlencode({'token': token})}"
