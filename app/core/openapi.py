"""The OpenAPI document: security, problem schemas and what routes declare about them.

Routes declare what they answer with the helpers here: ``secured(scope)`` as their
``openapi_extra`` (the caller token's scope, as a security requirement) and
``problems(operation_id, *errors)`` among their ``responses`` (each error class by its status and
``code``). ``install_openapi(app)`` then finishes FastAPI's document once:

* the ``bearerAuth`` scheme (an HTTP bearer JWT), and on each secured operation a sentence naming
  the scope it needs;
* ``Problem`` (RFC 9457, with this service's ``code``, ``errors`` and ``request_id``) and, per
  operation, ``<OperationId>Problem``: a ``Problem`` whose ``code`` and ``status`` list exactly
  what that operation answers, so a generated client gets a typed error for each status;
* an inline answer titled like a component (those problems, ``Liveness``, ``Readiness``) made
  one, so that generated classes are named after it;
* FastAPI's own 422 answer (``HTTPValidationError``) removed: every error here is a problem.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.core.errors import AppError, DatabaseUnavailable, Starting
from app.core.http import PROBLEM_JSON

__all__ = [
    "BEARER",
    "ErrorSpec",
    "install_openapi",
    "liveness_responses",
    "problems",
    "readiness_responses",
    "secured",
]

BEARER: Final = "bearerAuth"
_REF: Final = "#/components/schemas/"
# A title that names a component (FastAPI titles its inline schemas "Response Something").
_COMPONENT_NAME: Final = re.compile(r"[A-Z][A-Za-z0-9]*")
_PROBLEM_FIELDS: Final = ("type", "title", "status", "detail", "code")

# An error an operation answers, with the status it has there when that is not its class's own
# (credentials_rejected is 422 on save but 502 on authorize).
ErrorSpec = type[AppError] | tuple[type[AppError], int]

_SECURITY_SCHEME: Final = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": (
        "A caller JWT: its organization claim names the caller's organization, its `scope` claim grants "
        "`connectors:read`, `connectors:write` and/or `connectors:authorize`. Each operation's security "
        "requirement names the scope it needs; without a valid token it answers 401, without the scope 403."
    ),
}

_SCHEMAS: Final[dict[str, Any]] = {
    "Problem": {
        "title": "Problem",
        "type": "object",
        "description": (
            "An error, as RFC 9457 problem details (`application/problem+json`). `code` is stable and "
            "is what to branch on; `title` and `detail` are for people."
        ),
        "required": list(_PROBLEM_FIELDS),
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": "`urn:connectors:problem:<code>`",
                "examples": ["urn:connectors:problem:invalid_request"],
            },
            "title": {"type": "string", "description": "A short summary of the kind of error"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599, "description": "The HTTP status"},
            "detail": {"type": "string", "description": "What went wrong with this request"},
            "code": {"type": "string", "description": "The stable error code"},
            "errors": {
                "type": "array",
                "items": {"$ref": _REF + "FieldError"},
                "description": "For `invalid_request` and `secret_required`: each field refused and why",
            },
            "provider_error": {
                "type": "string",
                "description": "The identity provider's RFC 6749 `error` code, when it gave a usable one",
            },
            "request_id": {
                "type": "string",
                "description": (
                    "The request's id (the `X-Request-ID` answered: the service's own, after the "
                    "caller's and a dot when the caller sent one), for finding it in the logs"
                ),
            },
        },
        "additionalProperties": True,
    },
    "FieldError": {
        "title": "FieldError",
        "type": "object",
        "description": "A field refused; `reason` never repeats the value sent",
        "required": ["field", "reason"],
        "properties": {
            "field": {
                "type": "string",
                "description": "A dotted path (`auth.token_url`); `*` stands for a name the caller chose",
                "examples": ["auth.token_url"],
            },
            "reason": {"type": "string", "examples": ["the URL must start with https://"]},
        },
    },
}

_PROBLEM_HEADERS: Final[dict[int, dict[str, Any]]] = {
    401: {
        "WWW-Authenticate": {
            "description": "`Bearer`: the scheme a caller token must use",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    503: {
        "Retry-After": {
            "description": "Whole seconds to wait before trying again",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def secured(scope: str) -> dict[str, Any]:
    """A route's ``openapi_extra``: it needs a caller token granting ``scope``."""
    return {"security": [{BEARER: [scope]}]}


def _status_and_class(spec: ErrorSpec) -> tuple[int, type[AppError]]:
    if isinstance(spec, tuple):
        error, status = spec
        return status, error
    return spec.status, spec


def problems(operation_id: str, *errors: ErrorSpec) -> dict[int | str, dict[str, Any]]:
    """The error ``responses`` of an operation: one per status, each naming its codes.

    Every response refers to the operation's problem schema (``<OperationId>Problem``, made a
    component by ``install_openapi``), whose ``code`` and ``status`` list all of them.
    """
    by_status: dict[int, list[type[AppError]]] = {}
    for spec in errors:
        status, error = _status_and_class(spec)
        by_status.setdefault(status, []).append(error)
    name = operation_id[:1].upper() + operation_id[1:] + "Problem"
    schema = {
        "title": name,
        "allOf": [
            {"$ref": _REF + "Problem"},
            {
                "type": "object",
                "properties": {
                    "status": {"type": "integer", "enum": sorted(by_status)},
                    "code": {
                        "type": "string",
                        "enum": sorted({error.code for found in by_status.values() for error in found}),
                    },
                },
            },
        ],
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status):
        lines = [f"`{error.code}`: {error.title}" for error in by_status[status]]
        response: dict[str, Any] = {
            "description": "\n\n".join(lines),
            "content": {PROBLEM_JSON: {"schema": copy.deepcopy(schema)}},
        }
        if status in _PROBLEM_HEADERS:
            response["headers"] = copy.deepcopy(_PROBLEM_HEADERS[status])
        responses[status] = response
    return responses


def liveness_responses() -> dict[int | str, dict[str, Any]]:
    """What ``GET /healthz`` answers."""
    return {
        200: {
            "description": "The process answers",
            "content": {
                "application/json": {
                    "schema": {
                        "title": "Liveness",
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"type": "string", "enum": ["ok"]}},
                    }
                }
            },
        }
    }


def readiness_responses() -> dict[int | str, dict[str, Any]]:
    """What ``GET /readyz`` answers."""
    return {
        200: {
            "description": "Ready, or degraded: the database is away but authorize still answers from memory",
            "content": {
                "application/json": {
                    "schema": {
                        "title": "Readiness",
                        "type": "object",
                        "required": ["status"],
                        "properties": {
                            "status": {"type": "string", "enum": ["ready", "degraded"]},
                            "database": {"type": "string", "enum": ["unavailable"]},
                            "memory_valid_for_s": {
                                "type": "number",
                                "description": "Seconds authorize may still answer from memory",
                            },
                        },
                    }
                }
            },
        },
        **problems("getReadiness", DatabaseUnavailable, Starting),
    }


def install_openapi(app: FastAPI, *, models: Sequence[type[BaseModel]] = ()) -> None:
    """Finish the app's document as the module docstring says; ``models`` are schemas routes
    refer to that FastAPI does not know (a body the route reads itself)."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    finished: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        # FastAPI builds the document again when routes were added; finish each build once.
        document = generate()
        if not finished or finished[0] is not document:
            _finish(document, models)
            finished[:] = [document]
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _finish(document: dict[str, Any], models: Sequence[type[BaseModel]]) -> None:
    components = document.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    schemas.update(copy.deepcopy(_SCHEMAS))
    if models:
        _, definitions = models_json_schema(
            [(model, "validation") for model in models], ref_template=_REF + "{model}"
        )
        schemas.update(definitions.get("$defs", {}))
    components["securitySchemes"] = {BEARER: copy.deepcopy(_SECURITY_SCHEME)}
    for operation in _operations(document):
        scopes = [
            scope for requirement in operation.get("security", []) for scope in requirement.get(BEARER, [])
        ]
        if scopes:
            needs = " and ".join(f"`{scope}`" for scope in scopes)
            sentence = f"Needs a caller token (bearer JWT) with the {needs} scope."
            description = operation.get("description", "").rstrip()
            operation["description"] = f"{description}\n\n{sentence}" if description else sentence
        responses: dict[str, Any] = operation.get("responses", {})
        for status, response in list(responses.items()):
            content = response.get("content", {})
            if _is_framework_422(content):
                del responses[status]
                continue
            for media in content.values():
                _hoist(media, schemas)
    for name in ("HTTPValidationError", "ValidationError"):
        if not _refers_to(document, _REF + name):
            schemas.pop(name, None)
    components["schemas"] = dict(sorted(schemas.items()))


def _operations(document: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                yield operation


def _is_framework_422(content: Mapping[str, Any]) -> bool:
    schema = content.get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == _REF + "HTTPValidationError")


def _hoist(media: dict[str, Any], schemas: dict[str, Any]) -> None:
    """An inline schema titled like a component (a problem, a health answer) becomes a component
    of that name, referred to: generated clients then name its class after it."""
    schema = media.get("schema")
    if not isinstance(schema, dict) or "$ref" in schema:
        return
    name = schema.get("title")
    if not isinstance(name, str) or _COMPONENT_NAME.fullmatch(name) is None:
        return
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different schemas are both named {name}")
    media["schema"] = {"$ref": _REF + name}


def _refers_to(node: object, ref: str) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_refers_to(value, ref) for value in node.values())
    if isinstance(node, list):
        return any(_refers_to(value, ref) for value in node)
    return False
