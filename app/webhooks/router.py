"""HTTP endpoints of webhook subscriptions. HTTP concerns only; the rules live in the service."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from fastapi.openapi.models import Example

from app.core.auth import SCOPE_READ, SCOPE_WRITE
from app.core.errors import (
    DatabaseUnavailable,
    DestinationNotAllowed,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    ResendLimitReached,
    Unauthenticated,
    VersionMismatch,
    WebhookDeliveryNotFound,
    WebhookLimitReached,
    WebhookNotDeliverable,
    WebhookNotFound,
)
from app.core.openapi import ErrorSpec, problems, secured
from app.core.preconditions import IfMatch
from app.core.resources import ID_SCHEMA, NO_STORE, canonical_uuid, etag
from app.core.security import Reader, Writer
from app.webhooks import schemas
from app.webhooks.service import WebhookService

router = APIRouter(prefix="/webhooks", tags=["webhooks"], redirect_slashes=False)


async def get_service(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


Service = Annotated[WebhookService, Depends(get_service)]

# Ids are taken only as issued, as for connectors (``app.core.resources``): another spelling is a 404.


async def parse_webhook_id(
    webhook_id: Annotated[
        str,
        Path(
            description=(
                "The subscription's id as issued: a lower-case, hyphenated UUID. Any other spelling of the "
                "same UUID answers 404, like an id that does not exist."
            ),
            json_schema_extra=ID_SCHEMA,
        ),
    ],
) -> uuid.UUID:
    parsed = canonical_uuid(webhook_id)
    if parsed is None:
        raise WebhookNotFound()
    return parsed


async def parse_delivery_id(
    delivery_id: Annotated[
        str,
        Path(
            description="The delivery's id as listed: a lower-case, hyphenated UUID (another spelling: 404)",
            json_schema_extra=ID_SCHEMA,
        ),
    ],
) -> uuid.UUID:
    parsed = canonical_uuid(delivery_id)
    if parsed is None:
        raise WebhookDeliveryNotFound()
    return parsed


# Endpoints declare the caller before the ids: dependencies run in that order, so a caller
# without a valid token gets 401 (and one without the scope 403) before any 404.
WebhookId = Annotated[uuid.UUID, Depends(parse_webhook_id)]
DeliveryId = Annotated[uuid.UUID, Depends(parse_delivery_id)]
DeliveriesLimit = Annotated[int, Query(ge=1, le=1000, description="At most this many deliveries, the newest")]

# What every operation on /webhooks may answer, besides its own errors.
_CALLER: tuple[ErrorSpec, ...] = (Unauthenticated, Forbidden, DatabaseUnavailable)

_ETAG_HEADER: dict[str, Any] = {
    "ETag": {
        "description": 'The subscription\'s `version` in quotes (`"3"`): send it back in `If-Match`',
        "required": True,
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    }
}
_NO_STORE_HEADER: dict[str, Any] = {
    "Cache-Control": {
        "description": "`no-store`: the answer holds the signing secret",
        "required": True,
        "schema": {"type": "string", "enum": ["no-store"]},
    }
}
_ID_FROM_BODY = {"webhook_id": "$response.body#/id"}
# From a created subscription to what can be done with it; clients and test generators follow them.
_CREATED_LINKS: dict[str, Any] = {
    name: {"operationId": name, "parameters": _ID_FROM_BODY, "description": description}
    for name, description in (
        ("getWebhook", "Read the subscription created"),
        ("updateWebhook", "Change the subscription created"),
        ("deleteWebhook", "Delete the subscription created"),
        ("rotateWebhookSecret", "Rotate the created subscription's signing secret"),
        ("listWebhookDeliveries", "List the created subscription's deliveries"),
    )
}
_DELIVERIES_LINKS: dict[str, Any] = {
    "resendWebhookDelivery": {
        "operationId": "resendWebhookDelivery",
        "parameters": {"webhook_id": "$request.path.webhook_id", "delivery_id": "$response.body#/items/0/id"},
        "description": "Send the newest delivery's event again",
    }
}

_CREATE_EXAMPLES: dict[str, Example] = {
    "allEvents": Example(
        summary="Every event type (event_types omitted or empty)",
        value={"url": "https://hooks.example.com/connectors"},
    ),
    "someEvents": Example(
        summary="Only creations and status changes",
        value={
            "url": "https://hooks.example.com/connectors?source=credentials",
            "event_types": ["connector.created", "connector.status_changed"],
        },
    ),
    "disabled": Example(
        summary="Created disabled: nothing is queued for it until it is enabled",
        value={"url": "https://hooks.example.com/connectors", "event_types": [], "enabled": False},
    ),
}
_PATCH_EXAMPLES: dict[str, Example] = {
    "moveURL": Example(
        summary="A new URL: a failing subscription is active again, its pending deliveries due now",
        value={"url": "https://hooks-v2.example.com/connectors"},
    ),
    "reEnable": Example(
        summary="Enable; on a failing subscription, retry its pending deliveries now",
        value={"enabled": True},
    ),
    "pause": Example(summary="Stop queueing and sending events", value={"enabled": False}),
    "everyEvent": Example(summary="Every event type from now on", value={"event_types": []}),
}


@router.post(
    "",
    operation_id="createWebhook",
    summary="Create a webhook subscription",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "description": "Created, with its signing `secret`: shown this once",
            "headers": {
                **_ETAG_HEADER,
                **_NO_STORE_HEADER,
                "Location": {
                    "description": "The subscription's URL, `/webhooks/{id}`",
                    "required": True,
                    "schema": {"type": "string", "format": "uri-reference"},
                },
            },
            "links": _CREATED_LINKS,
        },
        **problems(
            "createWebhook",
            *_CALLER,
            WebhookLimitReached,
            PayloadTooLarge,
            InvalidRequest,
            DestinationNotAllowed,
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def create_webhook(
    body: Annotated[schemas.WebhookCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    principal: Writer,
    service: Service,
    response: Response,
) -> schemas.WebhookWithSecret:
    """Subscribe a URL to the organization's connector events; the answer holds its signing secret."""
    created = await service.create(principal.organization_id, body)
    response.headers["ETag"] = etag(created.version)
    response.headers["Location"] = f"/webhooks/{created.id}"
    response.headers.update(NO_STORE)
    return created


@router.get(
    "",
    operation_id="listWebhooks",
    summary="List webhook subscriptions",
    responses=problems("listWebhooks", *_CALLER),
    openapi_extra=secured(SCOPE_READ),
)
async def list_webhooks(principal: Reader, service: Service) -> schemas.WebhookList:
    """List the organization's webhook subscriptions, oldest first."""
    return await service.list(principal.organization_id)


@router.get(
    "/{webhook_id}",
    operation_id="getWebhook",
    summary="Read a webhook subscription",
    responses={
        200: {"description": "The subscription", "headers": _ETAG_HEADER},
        **problems("getWebhook", *_CALLER, WebhookNotFound),
    },
    openapi_extra=secured(SCOPE_READ),
)
async def get_webhook(
    principal: Reader, webhook_id: WebhookId, service: Service, response: Response
) -> schemas.Webhook:
    """Read one webhook subscription (never its secret); the ETag names its version."""
    webhook = await service.get(principal.organization_id, webhook_id)
    response.headers["ETag"] = etag(webhook.version)
    return webhook


@router.patch(
    "/{webhook_id}",
    operation_id="updateWebhook",
    summary="Change a webhook subscription",
    responses={
        200: {
            "description": "The subscription as changed (or as it was, when nothing changed)",
            "headers": _ETAG_HEADER,
        },
        **problems(
            "updateWebhook",
            *_CALLER,
            WebhookNotFound,
            VersionMismatch,
            PayloadTooLarge,
            InvalidRequest,
            DestinationNotAllowed,
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def update_webhook(
    principal: Writer,
    webhook_id: WebhookId,
    body: Annotated[schemas.WebhookPatch, Body(openapi_examples=_PATCH_EXAMPLES)],
    service: Service,
    response: Response,
    if_match: IfMatch,
) -> schemas.Webhook:
    """Change the URL, event types or enabled flag; a new URL or enabled=true fixes a failing one."""
    updated = await service.update(principal.organization_id, webhook_id, body, if_match=if_match)
    response.headers["ETag"] = etag(updated.version)
    return updated


@router.delete(
    "/{webhook_id}",
    operation_id="deleteWebhook",
    summary="Delete a webhook subscription",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        204: {"description": "Deleted, with its deliveries: nothing more is sent to it"},
        **problems("deleteWebhook", *_CALLER, WebhookNotFound, VersionMismatch, InvalidRequest),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def delete_webhook(
    principal: Writer, webhook_id: WebhookId, service: Service, if_match: IfMatch
) -> Response:
    """Delete a webhook subscription and its deliveries, freeing a place under the limit."""
    await service.delete(principal.organization_id, webhook_id, if_match=if_match)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{webhook_id}/rotate-secret",
    operation_id="rotateWebhookSecret",
    summary="Rotate a webhook subscription's signing secret",
    responses={
        200: {
            "description": (
                "The subscription with its new `secret`, shown this once; the one it replaced keeps signing "
                "alongside it until `previous_secret_expires_at`"
            ),
            "headers": {**_ETAG_HEADER, **_NO_STORE_HEADER},
        },
        **problems("rotateWebhookSecret", *_CALLER, WebhookNotFound),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def rotate_webhook_secret(
    principal: Writer, webhook_id: WebhookId, service: Service, response: Response
) -> schemas.WebhookWithSecret:
    """A new signing secret; deliveries carry both signatures until the old one's overlap ends."""
    rotated = await service.rotate_secret(principal.organization_id, webhook_id)
    response.headers["ETag"] = etag(rotated.version)
    response.headers.update(NO_STORE)
    return rotated


@router.get(
    "/{webhook_id}/deliveries",
    operation_id="listWebhookDeliveries",
    summary="A webhook subscription's deliveries",
    responses={
        200: {"description": "Newest first", "links": _DELIVERIES_LINKS},
        **problems("listWebhookDeliveries", *_CALLER, WebhookNotFound, InvalidRequest),
    },
    openapi_extra=secured(SCOPE_READ),
)
async def list_webhook_deliveries(
    principal: Reader, webhook_id: WebhookId, service: Service, limit: DeliveriesLimit = 100
) -> schemas.WebhookDeliveryList:
    """The events queued for the subscription and their attempts, newest first."""
    return await service.deliveries(principal.organization_id, webhook_id, limit=limit)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/resend",
    operation_id="resendWebhookDelivery",
    summary="Send a delivery's event again",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        202: {"description": "The new delivery of the same event (same `event_id`), pending and due now"},
        **problems(
            "resendWebhookDelivery",
            *_CALLER,
            WebhookNotFound,
            WebhookDeliveryNotFound,
            WebhookNotDeliverable,
            ResendLimitReached,
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def resend_webhook_delivery(
    principal: Writer, webhook_id: WebhookId, delivery_id: DeliveryId, service: Service
) -> schemas.WebhookDelivery:
    """Queue the delivery's event again for the subscription, due now."""
    return await service.resend(principal.organization_id, webhook_id, delivery_id)
