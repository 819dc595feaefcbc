"""Structured logs: one JSON object per line, and one access line per request.

The access line carries method, route template, status, duration and organization. It never
carries a header, a query string, a body or a path parameter's value beyond the route template.
Every line written while a request is served, by any logger, names the request's ``request_id``
(``app.core.requestid``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.context import request_id

access_log = logging.getLogger("connectors.access")

# Record attributes that are not extra fields (uvicorn adds an ANSI-coloured copy of its message).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            # Which process wrote it: the workers of `serve --workers N` share one stderr.
            "pid": record.process,
        }
        # Read when the line is written, which for this handler is when it is logged: every line
        # written while a request is served names it, whichever logger wrote it.
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: an exception's text can hold anything, including a secret.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


# Libraries whose records below these levels carry values: SQL statements and result rows
# (SQLAlchemy), each call with its parameters (aiosqlite), request URLs and headers (httpx,
# httpcore, hpack/h2), a WebSocket handshake's request headers (websockets, through
# uvicorn.error), pub/sub messages (redis). They stay at these levels whatever level is asked for.
_QUIETEST = {
    "sqlalchemy": logging.WARNING,
    "aiosqlite": logging.INFO,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "hpack": logging.INFO,
    "h2": logging.INFO,
    "websockets": logging.INFO,
    "uvicorn.error": logging.INFO,
    "redis": logging.INFO,
    "push_response": logging.INFO,
    "alembic": logging.WARNING,
}


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for name, quietest in _QUIETEST.items():
        logging.getLogger(name).setLevel(max(quietest, root.level))


class AccessLogMiddleware:
    """Pure ASGI middleware writing the request's access line after the response started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            state = scope.get("state") or {}
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "route": getattr(route, "path", None) or "unmatched",
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "organization": state.get("organization_id"),
                },
            )
