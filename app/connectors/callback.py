"""``GET /oauth/callback``: where providers send an admin's browser back after consent.

No caller token: the ``state`` is the credential (``app.connectors.service.consent``). The
query (code, state) is read here and handed to the service, never logged, traced (the access line
and spans name the route template only) or echoed: a malformed one gets the same page as an
unknown state. Answers go to a browser: a 303 to the consent's ``return_url`` with the outcome in
its query, or a small page in words; neither may be cached, leak the URL in a ``Referer`` or run
anything (``Cache-Control: no-store``, ``Referrer-Policy: no-referrer``, a CSP that allows
nothing).
"""

from __future__ import annotations

import html
from typing import Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Request, Response

from app.connectors.service import ConnectorService
from app.connectors.service.consent import OUTCOME_WORDS, ConsentOutcome
from app.core.metrics import Metrics

router = APIRouter(tags=["consent"])

PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
# A consent started from the console binds itself to the admin's browser with this cookie
# (``Consenting.start_consent``'s ``binding``); sent to the callback only.
BINDING_COOKIE: Final = "connectors_consent"
# Longer values are not a provider's: the callback refuses them unread.
_MAX_VALUE: Final = 4096
_QUERY: Final = ("state", "code", "error", "iss")


def _param(name: str, description: str) -> dict[str, object]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


@router.get(
    "/oauth/callback",
    operation_id="consentCallback",
    summary="The provider sends the admin's browser back here",
    response_class=Response,
    responses={
        200: {
            "description": "Connected, and the consent had no `return_url`: a page saying so",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
        303: {
            "description": (
                "To the consent's `return_url`, with `connector_id` and `result=connected`, or "
                "`result=error` and `error`: one of " + ", ".join(f"`{code}`" for code in OUTCOME_WORDS)
            ),
            "headers": {"Location": {"required": True, "schema": {"type": "string", "format": "uri"}}},
        },
        400: {
            "description": "Not connected, and no `return_url` to go to: a page saying why, in words",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
    },
    openapi_extra={
        # No caller token: the state is the credential.
        "parameters": [
            _param("state", "The consent's state, as sent to the provider"),
            _param("code", "The authorization code"),
            _param("error", "The provider's error code, when it granted nothing (`access_denied`, ...)"),
            _param("iss", "The authorization server's issuer identifier (RFC 9207)"),
        ],
    },
)
async def consent_callback(request: Request) -> Response:
    """Finish a consent: exchange the code and keep the grant, or say why not."""
    service: ConnectorService = request.app.state.connectors
    values: dict[str, str | None] = {}
    for name in _QUERY:
        found = request.query_params.getlist(name)
        # Sent twice, or far too long: not from a provider that follows RFC 6749 §3.1.
        values[name] = None if len(found) != 1 or len(found[0]) > _MAX_VALUE else found[0]
    if any(len(request.query_params.getlist(name)) > 1 for name in _QUERY):
        values["state"] = None
    outcome = await service.finish_consent(
        state=values["state"],
        code=values["code"],
        error=values["error"],
        issuer=values["iss"],
        binding=request.cookies.get(BINDING_COOKIE),
    )
    metrics: Metrics = request.app.state.metrics
    metrics.consents.labels(outcome.error or "connected").inc()
    if outcome.return_url is not None:
        response = Response(status_code=303, headers={**PAGE_HEADERS, "Location": _back_to(outcome)})
    else:
        response = Response(
            _page(outcome),
            status_code=200 if outcome.error is None else 400,
            media_type="text/html; charset=utf-8",
            headers=PAGE_HEADERS,
        )
    if BINDING_COOKIE in request.cookies:
        response.delete_cookie(BINDING_COOKIE, path="/oauth/callback")
    return response


def _back_to(outcome: ConsentOutcome) -> str:
    assert outcome.return_url is not None
    parts = urlsplit(outcome.return_url)
    added = {
        "connector_id": str(outcome.connector_id),
        "result": "connected" if outcome.error is None else "error",
    }
    if outcome.error is not None:
        added["error"] = outcome.error
    query = f"{parts.query}&{urlencode(added)}" if parts.query else urlencode(added)
    return urlunsplit(parts._replace(query=query, fragment=""))


def _page(outcome: ConsentOutcome) -> str:
    title = "Account connected" if outcome.error is None else "The account was not connected"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head><body><main>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(outcome.words)}</p>"
        "</main></body></html>"
    )
