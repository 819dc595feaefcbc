"""HTTP endpoints of the connector registry. HTTP concerns only; the rules live in the service."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from pydantic import BeforeValidator, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from app.audit.schemas import AuditEventList
from app.connectors import schemas
from app.connectors.service import ConnectorService
from app.core.auth import SCOPE_AUTHORIZE
from app.core.errors import AppError, ConnectorNotFound, InvalidRequest, VersionMismatch
from app.core.http import PROBLEM_JSON
from app.core.metrics import Metrics
from app.core.security import Reader, Writer, authenticate
from app.core.validation import field_errors

router = APIRouter(prefix="/connectors", tags=["connectors"], redirect_slashes=False)


async def get_service(request: Request) -> ConnectorService:
    service: ConnectorService = request.app.state.connectors
    return service


Service = Annotated[ConnectorService, Depends(get_service)]


# The one spelling of an id this service issues. ``uuid.UUID`` also reads braces, ``urn:uuid:``,
# upper case and hyphens anywhere or nowhere; accepting those would give a connector many URLs.
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(connector_id: str) -> uuid.UUID:
    # Any other spelling, like a malformed id, is an id that does not exist: the same 404.
    if _CANONICAL_ID.fullmatch(connector_id) is None:
        raise ConnectorNotFound()
    return uuid.UUID(connector_id)


async def parse_id(connector_id: str) -> uuid.UUID:
    return _uuid(connector_id)


# Endpoints declare the caller before the id: dependencies run in that order, so a caller without
# a valid token gets 401 (and one without the scope 403) before any 404.
ConnectorId = Annotated[uuid.UUID, Depends(parse_id)]


async def parse_if_match(if_match: Annotated[str | None, Header()] = None) -> frozenset[int] | None:
    """The version an ``If-Match`` header names; ``*`` or no header means any version.

    A list names several; the current version must be one of them. Weak tags never match
    (RFC 9110 compares If-Match strongly), nor does anything this service did not issue.
    """
    if if_match is None:
        return None
    tags = [tag.strip() for tag in if_match.split(",") if tag.strip()]
    if "*" in tags:
        return None
    versions = frozenset(
        int(tag[1:-1])
        for tag in tags
        if len(tag) <= 20 and tag[:1] == tag[-1:] == '"' and tag[1:-1].isdigit()
    )
    if not versions:
        raise VersionMismatch("If-Match must name an ETag returned by this service")
    return versions


IfMatch = Annotated[frozenset[int] | None, Depends(parse_if_match)]


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
    bool, BeforeValidator(_query_bool), Query(description="false skips the live credential check")
]


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {}}}


_COMMON: dict[int | str, dict[str, Any]] = {
    401: _problem("Missing, expired or invalid caller token"),
    403: _problem("The caller token lacks the scope"),
    422: _problem("Invalid request"),
}
_ONE: dict[int | str, dict[str, Any]] = {**_COMMON, 404: _problem("No such connector")}
_UPSTREAM: dict[int | str, dict[str, Any]] = {
    502: _problem("The identity provider or validation URL failed"),
    504: _problem("The identity provider or validation URL timed out"),
}


_NO_STORE = {"Cache-Control": "no-store"}


def _etag(version: int) -> str:
    return f'"{version}"'


@router.post(
    "/{connector_id}/authorize",
    response_model=schemas.AuthorizeResponse,
    responses={**_ONE, **_UPSTREAM},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schemas.AuthorizeRequest.model_json_schema()}},
        }
    },
)
async def authorize(connector_id: str, request: Request) -> Response:
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
        # A cancelled call is not counted; anything but an AppError is answered as a 500.
        outcome = error.code if isinstance(error, AppError) else "internal_error"
        auth_type = service.auth_type_of(*asked) if asked is not None else None
        _observe_authorize(request, outcome, auth_type, started)
        raise
    # Only Basic answers carry no expiry.
    _observe_authorize(request, "ok", "basic" if result.expires_at is None else "oauth2", started)
    return Response(result.model_dump_json(), media_type="application/json", headers=_NO_STORE)


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
    status_code=status.HTTP_201_CREATED,
    responses={**_COMMON, **_UPSTREAM, 409: _problem("Name taken or limit reached")},
)
async def create_connector(
    body: schemas.ConnectorCreate,
    principal: Writer,
    service: Service,
    response: Response,
    validate: Validate = True,
) -> schemas.ConnectorOut:
    """Create a connector, checking its credentials live unless validate=false."""
    created = await service.create(
        principal.organization_id, body, validate=validate, actor=principal.subject
    )
    response.headers["ETag"] = _etag(created.version)
    response.headers["Location"] = f"/connectors/{created.id}"
    return created


@router.get("", responses=_COMMON)
async def list_connectors(principal: Reader, service: Service) -> schemas.ConnectorList:
    """List the organization's connectors, ordered by name."""
    return await service.list(principal.organization_id)


@router.get("/{connector_id}", responses=_ONE)
async def get_connector(
    principal: Reader, connector_id: ConnectorId, service: Service, response: Response
) -> schemas.ConnectorOut:
    """Read one connector; the ETag names its version."""
    connector = await service.get(principal.organization_id, connector_id)
    response.headers["ETag"] = _etag(connector.version)
    return connector


@router.patch(
    "/{connector_id}",
    responses={**_ONE, **_UPSTREAM, 409: _problem("Name taken"), 412: _problem("Stale version")},
)
async def update_connector(
    principal: Writer,
    connector_id: ConnectorId,
    body: schemas.ConnectorPatch,
    service: Service,
    response: Response,
    if_match: IfMatch,
    validate: Validate = True,
) -> schemas.ConnectorOut:
    """Change some fields of a connector; honours If-Match."""
    updated = await service.update(
        principal.organization_id,
        connector_id,
        body,
        if_match=if_match,
        validate=validate,
        actor=principal.subject,
    )
    response.headers["ETag"] = _etag(updated.version)
    return updated


@router.delete(
    "/{connector_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_ONE, 412: _problem("Stale version")},
)
async def delete_connector(
    principal: Writer, connector_id: ConnectorId, service: Service, if_match: IfMatch
) -> Response:
    """Delete a connector, freeing a place under the limit."""
    await service.delete(principal.organization_id, connector_id, if_match=if_match, actor=principal.subject)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_CHECKED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The connector with its status; Retry-After when no check ran for this call",
        "headers": {
            "Retry-After": {
                "description": "Whole seconds until the next live check of this version may run",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}


@router.post("/{connector_id}/validate", responses={**_CHECKED, **_ONE})
async def validate_connector(
    principal: Writer, connector_id: ConnectorId, service: Service, response: Response
) -> schemas.ConnectorOut:
    """Check the stored credentials live (at most once per interval) and record the result in status."""
    result = await service.validate(principal.organization_id, connector_id, actor=principal.subject)
    response.headers["ETag"] = _etag(result.connector.version)
    if result.retry_after is not None:
        response.headers["Retry-After"] = str(result.retry_after)
    return result.connector


HistoryLimit = Annotated[int, Query(ge=1, le=1000, description="at most this many events, the newest")]


@router.get("/{connector_id}/history", responses=_ONE)
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
