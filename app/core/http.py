"""Rendering errors as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.context import request_id
from app.core.errors import AppError, PayloadTooLarge, Unauthenticated
from app.core.security import authenticate
from app.core.validation import LocationRules, field_errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# What is recorded for a request whose client left before it was read (nginx's status).
CLIENT_CLOSED_REQUEST = 499
# Paths whose every endpoint needs a caller token.
PROTECTED_PREFIX = ("/connectors", "/webhooks")
_NO_RULES = LocationRules()
_HTTP_CODES = {
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """A problem+json answer; inside a request it names the request's id (``request_id``)."""
    body: dict[str, Any] = {
        "type": f"urn:connectors:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    current = request_id.get()
    if current is not None:
        body["request_id"] = current
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def _app_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AppError)
    return _app_error_response(error)


async def _unauthenticated(request: Request) -> JSONResponse | None:
    """A 401 for a caller without a valid token on a protected path, else None.

    The framework reads and validates a body before it runs the dependencies that check the
    caller, so without this a bad body would be judged before a missing token.
    """
    if getattr(request.app.state, "verifier", None) is None or not request.url.path.startswith(
        PROTECTED_PREFIX
    ):
        return None
    try:
        await authenticate(request, None)
    except Unauthenticated as error:
        return await _app_error(request, error)
    return None


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    refused = await _unauthenticated(request)
    if refused is not None:
        return refused
    return problem(
        422,
        "invalid_request",
        "The request is not valid",
        "one or more fields are invalid",
        errors=field_errors(
            error.errors(), rules=getattr(request.app.state, "validation_rules", LocationRules())
        ),
    )


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        # An included router is one route wrapping its own (FastAPI's ``_IncludedRouter``).
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


def _allowed_methods(request: Request) -> str:
    """Every method of every route on this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    probe = {**request.scope, "method": "\x00"}
    for route in _leaf_routes(request.app.routes):
        match, _ = route.matches(probe)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    if isinstance(error.__cause__, AppError):
        # The framework wraps what failed while it read the body (a body over the limit).
        return _app_error_response(error.__cause__)
    if isinstance(error.__cause__, ClientDisconnect):
        return _client_closed()
    if error.status_code == 400:
        refused = await _unauthenticated(request)
        if refused is not None:
            return refused
        # The framework's "error parsing the body" (bytes that are not UTF-8 JSON, say) is the
        # same client error as malformed JSON, which the contract answers with a 422.
        return problem(
            422,
            "invalid_request",
            "The request is not valid",
            "the body could not be parsed",
            errors=[{"field": "body", "reason": "the body is not valid JSON"}],
        )
    code, title = _HTTP_CODES.get(error.status_code, ("http_error", "HTTP error"))
    headers = dict(error.headers or {})
    if error.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem(error.status_code, code, title, title, headers or None)


def _client_closed() -> JSONResponse:
    """What is recorded (access line, metrics) for a client gone while sending its body: nginx's
    499. Nobody reads it."""
    log.info("the client closed the connection before its request was read")
    return problem(
        CLIENT_CLOSED_REQUEST,
        "client_closed_request",
        "Client closed request",
        "the client closed the connection while sending its request",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class UnexpectedErrorMiddleware:
    """Answers an exception no handler took with a 500 problem, and keeps the connection open.

    Starlette's last-resort handler answers and then raises again, so that the server logs a
    second traceback and closes the caller's keep-alive connection. Here the error is logged once
    (its type and traceback: its text may hold anything) and the request simply ends. Add it
    before the other middleware, so that it sits inside them and they see the 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            # The client went away while sending its body: no fault of ours, and nobody to answer.
            # The status recorded (access line, metrics) is nginx's 499.
            if started:
                return
            await _client_closed()(scope, receive, send)
        except Exception as error:
            if started:
                raise  # too late to answer: the server ends the response
            log.error("unexpected error", exc_info=error)
            response = problem(500, "internal_error", "Internal server error", "an unexpected error occurred")
            await response(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with a 413 problem, declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    error = PayloadTooLarge(f"the body may have at most {self.max_bytes} bytes")
                    await _app_error_response(error)(scope, receive, send)
                    return
                break
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"the body may have at most {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _app_error_response(error: AppError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else error.headers
    return problem(error.http_status, error.code, error.title, error.detail, headers, **error.extra)
