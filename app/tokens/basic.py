"""HTTP Basic credentials: the header value, and the live check against a validation URL.

The check is deliberately narrow. Only 401 and 403 mean the credentials were refused: those are
the answers a server gives about *who* is asking. A redirect (not followed: it would carry the
header to a host nobody checked), a 404 or a 5xx says nothing about the credentials, so it is
reported as an unreachable upstream, which is transient, rather than as a rejection, which a
connector keeps until someone changes it.
"""

from __future__ import annotations

import base64

from opentelemetry.trace import Span, Tracer
from pydantic import SecretStr

from app.core import tracing
from app.core.errors import CredentialsRejected, InvalidRequest, UpstreamUnreachable
from app.core.outbound import OutboundClient
from app.tokens.types import BasicConfig

__all__ = ["basic_header", "check_basic"]


def basic_header(username: str, password: SecretStr) -> str:
    """The ``Authorization`` value for ``username`` and ``password`` (RFC 7617, UTF-8)."""
    if ":" in username:
        # The server splits user-id and password at the first colon (RFC 7617 §2).
        raise InvalidRequest("a Basic authentication username must not contain ':'")
    raw = f"{username}:{password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


async def check_basic(outbound: OutboundClient, config: BasicConfig, *, tracer: Tracer | None = None) -> None:
    """``GET validation_url`` with the Basic header: 2xx accepts, 401/403 reject.

    Raises ``CredentialsRejected``, ``UpstreamUnreachable``, ``UpstreamTimeout`` or
    ``DestinationNotAllowed``. With ``tracer``, a client span records the URL's host, the status
    and the outcome.
    """
    with tracing.outbound_span(tracer, "validation request", "GET", config.validation_url) as span:
        try:
            await _check(outbound, config, span)
        except CredentialsRejected:
            span.set_attribute(tracing.OUTCOME, "rejected")
            raise
        except Exception:
            span.set_attribute(tracing.OUTCOME, "unreachable")
            raise
        span.set_attribute(tracing.OUTCOME, "authorized")


async def _check(outbound: OutboundClient, config: BasicConfig, span: Span) -> None:
    response = await outbound.request(
        "GET",
        config.validation_url,
        headers={"Authorization": basic_header(config.username, config.password)},
        kind="validation",
    )
    status = response.status_code
    span.set_attribute("http.response.status_code", status)
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise CredentialsRejected(f"the validation URL answered HTTP {status}")
    if 300 <= status < 400:
        raise UpstreamUnreachable(
            f"the validation URL answered with a redirect (HTTP {status}), not followed"
        )
    raise UpstreamUnreachable(f"the validation URL answered HTTP {status}")
