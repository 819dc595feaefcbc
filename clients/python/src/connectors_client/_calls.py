"""Each API operation as a description of its request and a reader of its response.

No I/O here: the sync and the async client send the same ``Call`` and hand the response back to
it, so both speak the API identically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote
from uuid import UUID

import httpx
from pydantic import BaseModel, ValidationError

from connectors_client.errors import UnexpectedResponse, raise_for_problem, retry_after
from connectors_client.models import (
    AuditEventList,
    Authorization,
    Connector,
    ConnectorCreate,
    ConnectorList,
    ConnectorPatch,
    ConsentStart,
    ValidationResult,
    wire,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
ConnectorId = str | UUID


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def result(self, response: httpx.Response) -> T:
        raise_for_problem(response)
        return self.read(response)


def _path(connector_id: ConnectorId, tail: str = "") -> str:
    # Quoted whole, so no id can reach another route.
    return f"/connectors/{quote(str(connector_id), safe='')}{tail}"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        # Locations only: the message never repeats what the body held.
        where = ", ".join(".".join(str(part) for part in e["loc"]) or "body" for e in error.errors()[:3])
        raise UnexpectedResponse(
            f"HTTP {response.status_code}: the body is not a valid {model.__name__} ({where})", response
        ) from None


def _connector(response: httpx.Response) -> Connector:
    connector = _parse(Connector, response)
    etag = response.headers.get("etag")
    # Kept only when it is not the tag of the version, so that a connector read by ``get`` and
    # the same one read by ``list`` (no ETag there) compare equal.
    if etag is not None and etag != connector.etag:
        connector._etag = etag
    return connector


def _nothing(response: httpx.Response) -> None:
    return None


def _if_match(value: str | None) -> dict[str, str]:
    return {} if value is None else {"If-Match": value}


def create(body: ConnectorCreate, *, validate: bool) -> Call[Connector]:
    return Call("POST", "/connectors", _connector, params={"validate": _flag(validate)}, json=wire(body))


def list_connectors() -> Call[ConnectorList]:
    return Call("GET", "/connectors", lambda response: _parse(ConnectorList, response))


def get(connector_id: ConnectorId) -> Call[Connector]:
    return Call("GET", _path(connector_id), _connector)


def update(
    connector_id: ConnectorId, patch: ConnectorPatch, *, if_match: str | None, validate: bool
) -> Call[Connector]:
    return Call(
        "PATCH",
        _path(connector_id),
        _connector,
        params={"validate": _flag(validate)},
        json=wire(patch, only_set=True),
        headers=_if_match(if_match),
    )


def delete(connector_id: ConnectorId, *, if_match: str | None) -> Call[None]:
    return Call("DELETE", _path(connector_id), _nothing, headers=_if_match(if_match))


def validate(connector_id: ConnectorId) -> Call[ValidationResult]:
    def read(response: httpx.Response) -> ValidationResult:
        return ValidationResult(_connector(response), retry_after(response))

    return Call("POST", _path(connector_id, "/validate"), read)


def consent(connector_id: ConnectorId, *, return_url: str | None) -> Call[ConsentStart]:
    return Call(
        "POST",
        _path(connector_id, "/consent"),
        lambda response: _parse(ConsentStart, response),
        json={} if return_url is None else {"return_url": return_url},
    )


def history(connector_id: ConnectorId, *, limit: int | None) -> Call[AuditEventList]:
    return Call(
        "GET",
        _path(connector_id, "/history"),
        lambda response: _parse(AuditEventList, response),
        params={} if limit is None else {"limit": str(limit)},
    )


def authorize(connector_id: ConnectorId, *, path: str | None, force_refresh: bool) -> Call[Authorization]:
    body: dict[str, Any] = {}
    if path is not None:
        body["path"] = path
    if force_refresh:
        body["force_refresh"] = True
    return Call(
        "POST", _path(connector_id, "/authorize"), lambda response: _parse(Authorization, response), json=body
    )
