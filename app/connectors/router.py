"""HTTP endpoints of the connector registry. HTTP concerns only; the rules live in the service."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from fastapi.openapi.models import Example
from pydantic import BeforeValidator, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from app.audit.schemas import AuditEventList
from app.connectors import schemas
from app.connectors.kinds import create_examples
from app.connectors.service import ConnectorService
from app.core.auth import SCOPE_AUTHORIZE, SCOPE_READ, SCOPE_WRITE
from app.core.errors import (
    AppError,
    ConnectorLimitReached,
    ConnectorNotFound,
    ConsentRequired,
    CredentialsRejected,
    DatabaseUnavailable,
    DestinationNotAllowed,
    Forbidden,
    InvalidRequest,
    KeyChecksBusy,
    NameNotResolved,
    NameTaken,
    PathOutsideResourceDomain,
    PayloadTooLarge,
    SecretRequired,
    SecretUnreadable,
    TokenEndpointError,
    TokenEndpointTimeout,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnreachable,
    VersionMismatch,
    WrongGrantType,
)
from app.core.metrics import Metrics
from app.core.openapi import ErrorSpec, problems, secured
from app.core.preconditions import IfMatch
from app.core.resources import ID_SCHEMA, NO_STORE, canonical_uuid, etag
from app.core.security import Reader, Writer, authenticate
from app.core.validation import field_errors

router = APIRouter(prefix="/connectors", tags=["connectors"], redirect_slashes=False)


async def get_service(request: Request) -> ConnectorService:
    service: ConnectorService = request.app.state.connectors
    return service


Service = Annotated[ConnectorService, Depends(get_service)]


# The one spelling of an id this service issues. ``uuid.UUID`` also reads braces, ``urn:uuid:``,
# upper case and hyphens anywhere or nowhere; accepting those would give a connector many URLs.
def _uuid(connector_id: str) -> uuid.UUID:
    parsed = canonical_uuid(connector_id)
    if parsed is None:
        raise ConnectorNotFound()
    return parsed


# The path parameter as documented: the pattern describes, ``_uuid`` decides (a 404, not a 422).
ConnectorIdText = Annotated[
    str,
    Path(
        description=(
            "The connector's id as issued: a lower-case, hyphenated UUID. Any other spelling of the same "
            "UUID answers 404, like an id that does not exist."
        ),
        json_schema_extra=ID_SCHEMA,
    ),
]


async def parse_id(connector_id: ConnectorIdText) -> uuid.UUID:
    return _uuid(connector_id)


# Endpoints declare the caller before the id: dependencies run in that order, so a caller without
# a valid token gets 401 (and one without the scope 403) before any 404.
ConnectorId = Annotated[uuid.UUID, Depends(parse_id)]


def _query_bool(value: object) -> object:
    # Only the two words: pydantic would also read yes, on, 1, t, ... as a boolean.
    if isinstance(value, bool):
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    raise ValueError("must be true or false")


Validate = Annotated[
    bool,
    BeforeValidator(_query_bool),
    Query(
        description=(
            "`false` skips the live credential check (the connector is saved `unverified`); exactly "
            "`true` or `false`"
        )
    ),
]

# What every operation on /connectors may answer, besides its own errors.
_CALLER: tuple[ErrorSpec, ...] = (Unauthenticated, Forbidden, DatabaseUnavailable)
# What a live check of credentials may answer when it fails (on create and update).
_LIVE_CHECK: tuple[ErrorSpec, ...] = (
    CredentialsRejected,
    DestinationNotAllowed,
    TokenEndpointError,
    UpstreamUnreachable,
    NameNotResolved,
    TokenEndpointTimeout,
    UpstreamTimeout,
)

_ETAG_HEADER: dict[str, Any] = {
    "ETag": {
        "description": 'The connector\'s `version` in quotes (`"3"`): send it back in `If-Match`',
        "required": True,
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    }
}
_ID_FROM_BODY = {"connector_id": "$response.body#/id"}
# From a created connector to what can be done with it; clients and test generators follow them.
_CREATED_LINKS: dict[str, Any] = {
    name: {"operationId": name, "parameters": _ID_FROM_BODY, "description": description}
    for name, description in (
        ("getConnector", "Read the connector created"),
        ("updateConnector", "Change the connector created"),
        ("deleteConnector", "Delete the connector created"),
        ("validateConnector", "Check the created connector's credentials"),
        ("getConnectorHistory", "Read the created connector's history"),
        ("authorizeConnector", "Get headers for a request through the connector created"),
        ("startConsent", "Connect the created connector's account (authorization code connectors)"),
    )
}

# One example per kind and per client-authentication method with fields of its own.
_CREATE_EXAMPLES: dict[str, Example] = {
    example.name: Example(summary=example.summary, value=example.value) for example in create_examples()
}
_PATCH_EXAMPLES: dict[str, Example] = {
    "rename": Example(summary="A new name; nothing else changes", value={"name": "Contact Center (EU)"}),
    "secretRotation": Example(
        summary="A new client secret; the other auth fields are kept",
        value={"auth": {"client_secret": "n3w-s3cret"}},
    ),
    "moveTokenURL": Example(
        summary="A URL that moves must come with every secret of the connector's kind",
        value={"auth": {"token_url": "https://login.example.com/oauth2/token", "client_secret": "s3cret"}},
    ),
    "switchType": Example(
        summary="From Basic to OAuth 2.0: a new type needs the whole new auth object",
        value={
            "auth": {
                "type": "oauth2",
                "grant_type": "client_credentials",
                "client_id": "abc",
                "client_secret": "s3cret",
                "token_url": "https://idp.example.com/oauth/token",
                "scope": "read write",
            }
        },
    ),
}


@router.post(
    "/{connector_id}/authorize",
    operation_id="authorizeConnector",
    summary="Headers for one request",
    response_model=schemas.AuthorizeResponse,
    responses={
        200: {
            "description": "The URL to call and the headers to send to `resource_origin` only",
            "headers": {
                "Cache-Control": {
                    "description": "`no-store`: the answer holds a credential",
                    "required": True,
                    "schema": {"type": "string", "enum": ["no-store"]},
                }
            },
        },
        **problems(
            "authorizeConnector",
            *_CALLER,
            ConnectorNotFound,
            PayloadTooLarge,
            InvalidRequest,
            PathOutsideResourceDomain,
            SecretUnreadable,
            ConsentRequired,
            (CredentialsRejected, 502),
            (DestinationNotAllowed, 502),
            TokenEndpointError,
            UpstreamUnreachable,
            NameNotResolved,
            TokenEndpointTimeout,
        ),
    },
    openapi_extra={
        **secured(SCOPE_AUTHORIZE),
        # The endpoint reads its body itself (see below), so the document says what it takes.
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AuthorizeRequest"}}},
        },
    },
)
async def authorize(connector_id: ConnectorIdText, request: Request) -> Response:
    """The headers for one outbound request to the connector's resource domain."""
    # The hot path: no dependencies, the body parsed and the answer serialised once by pydantic.
    # Requests reach it through ``hot_routes`` below; this declaration documents it.
    started = time.perf_counter()
    service: ConnectorService = request.app.state.connectors
    asked: tuple[str, uuid.UUID] | None = None
    try:
        principal = await authenticate(request, SCOPE_AUTHORIZE)
        raw = await _body(request)
        try:
            body = schemas.AuthorizeRequest.model_validate_json(raw) if raw else schemas.AuthorizeRequest()
        except ValidationError as error:
            raise InvalidRequest(errors=field_errors(error, rules=schemas.LOCATIONS)) from None
        asked = (principal.organization_id, _uuid(connector_id))
        result = await service.authorize(*asked, body)
    except Exception as error:
        # A cancelled call is not counted; a client gone while sending its body is its own outcome;
        # anything else but an AppError is answered as a 500.
        if isinstance(error, AppError):
            outcome = error.code
        elif isinstance(error, ClientDisconnect):
            outcome = "client_disconnected"
        else:
            outcome = "internal_error"
        auth_type = service.auth_type_of(*asked) if asked is not None else None
        _observe_authorize(request, outcome, auth_type, started)
        raise
    _observe_authorize(request, "ok", service.auth_type_of(*asked), started)
    return Response(result.model_dump_json(), media_type="application/json", headers=NO_STORE)


async def _body(request: Request) -> bytes:
    """The whole request body; the hot path's own loop over ``receive`` (``request.body()``
    goes through a generator and a join even for the single message of a small body)."""
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _observe_authorize(request: Request, outcome: str, auth_type: str | None, started: float) -> None:
    metrics: Metrics = request.app.state.metrics
    metrics.observe_authorize(outcome, auth_type, time.perf_counter() - started)


@router.post(
    "",
    operation_id="createConnector",
    summary="Create a connector",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "description": "Created: `status` is `authorized` after the live check, `unverified` without it",
            "headers": {
                **_ETAG_HEADER,
                "Location": {
                    "description": "The connector's URL, `/connectors/{id}`",
                    "required": True,
                    "schema": {"type": "string", "format": "uri-reference"},
                },
            },
            "links": _CREATED_LINKS,
        },
        **problems(
            "createConnector",
            *_CALLER,
            NameTaken,
            ConnectorLimitReached,
            PayloadTooLarge,
            InvalidRequest,
            KeyChecksBusy,
            *_LIVE_CHECK,
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def create_connector(
    body: Annotated[schemas.ConnectorCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    principal: Writer,
    service: Service,
    response: Response,
    validate: Validate = True,
) -> schemas.Connector:
    """Create a connector, checking its credentials live unless validate=false."""
    created = await service.create(
        principal.organization_id, body, validate=validate, actor=principal.subject
    )
    response.headers["ETag"] = etag(created.version)
    response.headers["Location"] = f"/connectors/{created.id}"
    return created


@router.get(
    "",
    operation_id="listConnectors",
    summary="List connectors",
    responses=problems("listConnectors", *_CALLER),
    openapi_extra=secured(SCOPE_READ),
)
async def list_connectors(principal: Reader, service: Service) -> schemas.ConnectorList:
    """List the organization's connectors, ordered by name."""
    return await service.list(principal.organization_id)


@router.get(
    "/{connector_id}",
    operation_id="getConnector",
    summary="Read a connector",
    responses={
        200: {"description": "The connector", "headers": _ETAG_HEADER},
        **problems("getConnector", *_CALLER, ConnectorNotFound),
    },
    openapi_extra=secured(SCOPE_READ),
)
async def get_connector(
    principal: Reader, connector_id: ConnectorId, service: Service, response: Response
) -> schemas.Connector:
    """Read one connector; the ETag names its version."""
    connector = await service.get(principal.organization_id, connector_id)
    response.headers["ETag"] = etag(connector.version)
    return connector


@router.patch(
    "/{connector_id}",
    operation_id="updateConnector",
    summary="Change a connector",
    responses={
        200: {
            "description": "The connector as changed (or as it was, when nothing changed)",
            "headers": _ETAG_HEADER,
        },
        **problems(
            "updateConnector",
            *_CALLER,
            ConnectorNotFound,
            NameTaken,
            VersionMismatch,
            PayloadTooLarge,
            InvalidRequest,
            SecretRequired,
            SecretUnreadable,
            KeyChecksBusy,
            *_LIVE_CHECK,
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def update_connector(
    principal: Writer,
    connector_id: ConnectorId,
    body: Annotated[schemas.ConnectorPatch, Body(openapi_examples=_PATCH_EXAMPLES)],
    service: Service,
    response: Response,
    if_match: IfMatch,
    validate: Validate = True,
) -> schemas.Connector:
    """Change some fields of a connector; honours If-Match."""
    updated = await service.update(
        principal.organization_id,
        connector_id,
        body,
        if_match=if_match,
        validate=validate,
        actor=principal.subject,
    )
    response.headers["ETag"] = etag(updated.version)
    return updated


@router.delete(
    "/{connector_id}",
    operation_id="deleteConnector",
    summary="Delete a connector",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        204: {"description": "Deleted; its history stays readable"},
        **problems("deleteConnector", *_CALLER, ConnectorNotFound, VersionMismatch, InvalidRequest),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def delete_connector(
    principal: Writer, connector_id: ConnectorId, service: Service, if_match: IfMatch
) -> Response:
    """Delete a connector, freeing a place under the limit."""
    await service.delete(principal.organization_id, connector_id, if_match=if_match, actor=principal.subject)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{connector_id}/validate",
    operation_id="validateConnector",
    summary="Check a connector's credentials",
    responses={
        200: {
            "description": (
                "The connector, its `status` the check's outcome (`authorized`, `rejected`, `unreachable`). "
                "With `Retry-After`, no check ran for this call: one of this version ran less than the "
                "interval ago, and `status` is its outcome."
            ),
            "headers": {
                **_ETAG_HEADER,
                "Retry-After": {
                    "description": "Whole seconds until the next live check of this version may run",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                },
            },
        },
        # 412 only when the connector kept changing while a check was being started.
        **problems("validateConnector", *_CALLER, ConnectorNotFound, VersionMismatch, SecretUnreadable),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def validate_connector(
    principal: Writer, connector_id: ConnectorId, service: Service, response: Response
) -> schemas.Connector:
    """Check the stored credentials live (at most once per interval) and record the result in status."""
    result = await service.validate(principal.organization_id, connector_id, actor=principal.subject)
    response.headers["ETag"] = etag(result.connector.version)
    if result.retry_after is not None:
        response.headers["Retry-After"] = str(result.retry_after)
    return result.connector


@router.post(
    "/{connector_id}/consent",
    operation_id="startConsent",
    summary="Start connecting an account at the provider",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "description": (
                "Open `authorization_url` in the admin's browser before `expires_at`: the provider "
                "asks them to sign in and consent, then sends the browser to `GET /oauth/callback`"
            ),
            "headers": {
                "Cache-Control": {
                    "description": "`no-store`: the URL holds the consent's state",
                    "required": True,
                    "schema": {"type": "string", "enum": ["no-store"]},
                }
            },
        },
        **problems(
            "startConsent", *_CALLER, ConnectorNotFound, WrongGrantType, PayloadTooLarge, InvalidRequest
        ),
    },
    openapi_extra=secured(SCOPE_WRITE),
)
async def start_consent(
    principal: Writer,
    connector_id: ConnectorId,
    service: Service,
    response: Response,
    body: Annotated[schemas.ConsentStartRequest | None, Body()] = None,
) -> schemas.ConsentStart:
    """Start an admin's consent for an authorization code connector (a reconnect keeps the
    connector's grant until the new one is given)."""
    started = await service.start_consent(
        principal.organization_id,
        connector_id,
        return_url=body.return_url if body is not None else None,
        actor=principal.subject,
    )
    response.headers.update(NO_STORE)
    return schemas.ConsentStart(authorization_url=started.authorization_url, expires_at=started.expires_at)


HistoryLimit = Annotated[int, Query(ge=1, le=1000, description="At most this many events, the newest")]


@router.get(
    "/{connector_id}/history",
    operation_id="getConnectorHistory",
    summary="A connector's history",
    responses={
        200: {"description": "Newest first; also after the connector was deleted"},
        **problems("getConnectorHistory", *_CALLER, ConnectorNotFound, InvalidRequest),
    },
    openapi_extra=secured(SCOPE_READ),
)
async def connector_history(
    principal: Reader, connector_id: ConnectorId, service: Service, limit: HistoryLimit = 100
) -> AuditEventList:
    """The connector's recorded changes, refused attempts and checks, newest first."""
    return await service.history(principal.organization_id, connector_id, limit=limit)


async def _authorize_endpoint(request: Request) -> Response:
    # FastAPI records only its own routes in the scope; the access line needs this template.
    request.scope["route"] = hot_routes[0]
    return await authorize(request.path_params["connector_id"], request)


# Served as plain Starlette routes, ahead of the API routes, so that the hot path skips the
# framework's per-request dependency resolution; its FastAPI declaration above stays the
# documented operation (OpenAPI) and the same function answers. Measured in benchmarks/.
hot_routes = [Route("/connectors/{connector_id}/authorize", _authorize_endpoint, methods=["POST"])]
