"""The console's webhook pages: the subscriptions, adding one (its signing secret shown once),
editing, rotating the secret, and the deliveries with resend. Same rules as the connector pages
(``app.console.router``): a session, a CSRF token on every change, read-only admins refused."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import ImmutableMultiDict

from app.connectors.events import EVENT_TYPES
from app.console.pages import (
    page,
    see_other,
    session_of,
    signed_out,
    writer,
)
from app.core.errors import AppError, VersionMismatch, WebhookNotFound
from app.core.resources import canonical_uuid
from app.core.validation import field_errors
from app.webhooks import schemas
from app.webhooks.service import WebhookService

router = APIRouter(prefix="/console/webhooks", include_in_schema=False)


def _service(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


def _id(text: str) -> uuid.UUID:
    parsed = canonical_uuid(text)
    if parsed is None:
        raise WebhookNotFound()
    return parsed


def _not_found(session: Any, what: str = "webhook") -> Response:
    return page("message.html", 404, session=session, title="Not found", message=f"There is no such {what}.")


def _posted(data: ImmutableMultiDict[str, str]) -> dict[str, Any]:
    """A subscription as the form gives it: the event types ticked are a repeated field."""
    return {
        "url": data.get("url", ""),
        "event_types": data.getlist("event_type"),
        "enabled": data.get("enabled") == "on",
    }


@router.get("/")
async def webhooks_page(request: Request) -> Response:
    session = await session_of(request)
    if session is None:
        return signed_out(request)
    listed = await _service(request).list(session.organization_id)
    return page(
        "webhooks.html",
        session=session,
        title="Webhooks",
        webhooks=[item.model_dump(mode="python") for item in listed.items],
        limit=listed.limit,
    )


@router.get("/new")
async def new_webhook(request: Request) -> Response:
    allowed = await writer(request, posted=False)
    if isinstance(allowed, Response):
        return allowed
    session, _ = allowed
    return _form(session, {"url": "", "event_types": [], "enabled": True}, {}, None)


def _form(
    session: Any,
    values: dict[str, Any],
    errors: dict[str, list[str]],
    webhook: dict[str, Any] | None,
    status: int = 200,
) -> Response:
    return page(
        "webhook_form.html",
        status,
        session=session,
        title="Edit webhook" if webhook else "New webhook",
        values=values,
        errors=errors,
        webhook=webhook,
        event_types=EVENT_TYPES,
    )


def _errors(problem: list[dict[str, str]]) -> dict[str, list[str]]:
    placed: dict[str, list[str]] = {}
    for error in problem:
        field = str(error.get("field", "")).split(".")[0]
        placed.setdefault(field if field in ("url", "event_types") else "", []).append(
            str(error.get("reason", ""))
        )
    return placed


@router.post("/")
async def create_webhook(request: Request) -> Response:
    allowed = await writer(request)
    if isinstance(allowed, Response):
        return allowed
    session, data = allowed
    values = _posted(data)
    try:
        created = await _service(request).create(
            session.organization_id, schemas.WebhookCreate.model_validate(values)
        )
    except ValidationError as error:
        return _form(session, values, _errors(field_errors(error)), None, 422)
    except AppError as error:
        errors = error.extra.get("errors")
        placed = _errors(errors) if isinstance(errors, list) else {"": [error.detail]}
        return _form(session, values, placed, None, 422)
    return _secret_page(session, created.model_dump(mode="python"), "The webhook was added.")


def _secret_page(session: Any, webhook: dict[str, Any], notice: str) -> Response:
    return page(
        "webhook_secret.html", session=session, title="Signing secret", webhook=webhook, notice=notice
    )


@router.get("/{webhook_id}")
async def webhook_page(request: Request, webhook_id: str) -> Response:
    session = await session_of(request)
    if session is None:
        return signed_out(request)
    try:
        target = _id(webhook_id)
        webhook = await _service(request).get(session.organization_id, target)
        deliveries = await _service(request).deliveries(session.organization_id, target, limit=50)
    except WebhookNotFound:
        return page(
            "message.html", 404, session=session, title="Not found", message="There is no such webhook."
        )
    done = {"updated": "The webhook was saved.", "resent": "The delivery was queued again."}
    return page(
        "webhook.html",
        session=session,
        title="Webhook",
        webhook=webhook.model_dump(mode="python"),
        deliveries=[item.model_dump(mode="python") for item in deliveries.items],
        notice=done.get(request.query_params.get("done", "")),
    )


@router.get("/{webhook_id}/edit")
async def edit_webhook(request: Request, webhook_id: str) -> Response:
    allowed = await writer(request, posted=False)
    if isinstance(allowed, Response):
        return allowed
    session, _ = allowed
    try:
        webhook = (await _service(request).get(session.organization_id, _id(webhook_id))).model_dump(
            mode="python"
        )
    except WebhookNotFound:
        return page(
            "message.html", 404, session=session, title="Not found", message="There is no such webhook."
        )
    return _form(session, webhook, {}, webhook)


@router.post("/{webhook_id}/{action}")
async def webhook_action(request: Request, webhook_id: str, action: str) -> Response:
    allowed = await writer(request)
    if isinstance(allowed, Response):
        return allowed
    session, data = allowed
    if action not in ("edit", "delete", "rotate-secret", "resend"):
        return _not_found(session, "page")
    service = _service(request)
    version = data.get("version", "")
    if_match = [int(version)] if version.isdigit() else []
    try:
        target = _id(webhook_id)
        if action == "edit":
            stored = (await service.get(session.organization_id, target)).model_dump(mode="python")
            values = _posted(data)
            try:
                patch = schemas.WebhookPatch.model_validate(values)
            except ValidationError as error:
                return _form(session, values, _errors(field_errors(error)), stored, 422)
            await service.update(session.organization_id, target, patch, if_match=if_match)
            return see_other(f"/console/webhooks/{target}?done=updated")
        if action == "delete":
            await service.delete(session.organization_id, target, if_match=if_match)
            return see_other("/console/webhooks/")
        if action == "rotate-secret":
            rotated = await service.rotate_secret(session.organization_id, target)
            return _secret_page(session, rotated.model_dump(mode="python"), "A new signing secret was made.")
        delivery = canonical_uuid(data.get("delivery", ""))
        if delivery is None:
            return page(
                "message.html", 404, session=session, title="Not found", message="There is no such delivery."
            )
        await service.resend(session.organization_id, target, delivery)
        return see_other(f"/console/webhooks/{target}?done=resent")
    except WebhookNotFound:
        return page(
            "message.html", 404, session=session, title="Not found", message="There is no such webhook."
        )
    except VersionMismatch:
        message = "Someone else changed this webhook after you opened it. Nothing was changed: reload it."
        return page("message.html", 409, session=session, title="Not saved", message=message)
    except AppError as error:
        return page("message.html", 422, session=session, title="Not done", message=error.detail)


__all__ = ["router"]
