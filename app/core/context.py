"""Per-request context that outlives no request: the request id, for logs, problems and spans."""

from __future__ import annotations

from contextvars import ContextVar

# Set by the request-id middleware for the request being served; None outside a request.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
