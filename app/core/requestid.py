"""One id per request, the service's own, paired with the caller's ``X-Request-ID`` when well-formed.

The id is set in ``app.core.context.request_id`` for the whole request, so that every log line
written while it is served, every problem body and every span can name it, and it comes back in
the response's ``X-Request-ID`` header, errors included. Every request gets an id of the
service's own: 32 lower-case hex digits, 128 random bits (from ``os.urandom``, a quarter of what
``uuid.uuid4()`` costs). A caller's id is kept in front of it (``<caller's id>.<own id>``) when
there is exactly one such header and it is 1-128 characters of ``A-Z a-z 0-9 . _ : -``: nothing
else can reach a log line or a header through it (no space, quote, control character or line
break). So a caller still finds its own id in every answer and line, and no caller can give its
requests the id of another's, whatever it sends.

Tasks a request starts (a token request, a status write) copy the context as it is when they
start, so their log lines carry the id of the request that caused them.
"""

from __future__ import annotations

import os
import re
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.context import request_id

__all__ = ["HEADER", "RequestIdMiddleware", "accepted"]

HEADER: Final = "X-Request-ID"
_HEADER_KEY: Final = b"x-request-id"
_WELL_FORMED: Final = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def accepted(value: bytes) -> str | None:
    """The caller's id as sent when it is well-formed, else None."""
    return value.decode("ascii") if _WELL_FORMED.fullmatch(value) else None


class RequestIdMiddleware:
    """Pure ASGI middleware setting the request id; add it last, so that it sits outside the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope["headers"] if name == _HEADER_KEY]
        own = os.urandom(16).hex()
        caller = accepted(sent[0]) if len(sent) == 1 else None
        value = own if caller is None else f"{caller}.{own}"
        header = (_HEADER_KEY, value.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A new list: a response object's own header list is left as it was.
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id.set(value)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
