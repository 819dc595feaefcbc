"""Credentials sent as they are (Basic, API keys): where they go, and their live check.

The check is deliberately narrow. Only 401 and 403 mean the credentials were refused: those are
the answers a server gives about *who* is asking. A redirect (not followed: it would carry the
credential to a host nobody checked), a 404 or a 5xx says nothing about the credentials, so it is
reported as an unreachable upstream, which is transient, rather than as a rejection, which a
connector keeps until someone changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote, unquote

from opentelemetry.trace import Span, Tracer

from app.core import tracing
from app.core.errors import CredentialsRejected, UpstreamUnreachable
from app.core.outbound import OutboundClient
from app.tokens.types import StaticCredential

__all__ = ["check_static", "with_query"]


def with_query(url: str, pairs: Sequence[tuple[str, str]]) -> str:
    """``url`` with ``pairs`` added to its query, each percent-encoded.

    A parameter already in the query under one of those names (compared once decoded) is taken
    out first, so a caller's path can neither replace nor duplicate the credential.
    """
    if not pairs:
        return url
    base, _, query = url.partition("?")
    names = {name for name, _ in pairs}
    kept = [part for part in query.split("&") if part and unquote(part.partition("=")[0]) not in names]
    kept.extend(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in pairs)
    return f"{base}?{'&'.join(kept)}"


async def check_static(
    outbound: OutboundClient, url: str, credential: StaticCredential, *, tracer: Tracer | None = None
) -> None:
    """``GET url`` with the credential: 2xx accepts, 401/403 reject.

    Raises ``CredentialsRejected``, ``UpstreamUnreachable``, ``UpstreamTimeout`` or
    ``DestinationNotAllowed``. With ``tracer``, a client span records the URL's host, the status
    and the outcome (never the query, which may hold the credential).
    """
    with tracing.outbound_span(tracer, "validation request", "GET", url) as span:
        try:
            await _check(outbound, url, credential, span)
        except CredentialsRejected:
            span.set_attribute(tracing.OUTCOME, "rejected")
            raise
        except Exception:
            span.set_attribute(tracing.OUTCOME, "unreachable")
            raise
        span.set_attribute(tracing.OUTCOME, "authorized")


async def _check(outbound: OutboundClient, url: str, credential: StaticCredential, span: Span) -> None:
    response = await outbound.request(
        "GET", with_query(url, credential.query), headers=credential.headers, kind="validation"
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
