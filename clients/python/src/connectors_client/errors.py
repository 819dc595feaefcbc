"""What the client raises.

Everything derives from ``ConnectorsError``. An answer of the service in
``application/problem+json`` (RFC 9457) raises a ``ProblemError``: first by status family
(``ClientProblem``, ``ServerProblem``), then by status (``NotFound``, ``Conflict``,
``PreconditionFailed``...), then by the problem's stable ``code`` (``ConnectorNotFound``,
``NameTaken``, ``VersionMismatch``...). A code the service answers with two statuses
(``credentials_rejected`` and ``destination_not_allowed``: 422 when a connector is saved, 502 at
authorize) raises an exception that is an instance of both the code's class and the status's
class. Codes this client does not know raise the class of their status.

Anything else is not a problem document and is said so: ``UnexpectedResponse`` (an error page
of a proxy, a body that does not fit the documented shape), ``TransportFailure`` (the service
could not be reached or did not answer in time) and ``DestinationRefused`` (``ConnectorAuth``
will not put a connector's credentials on a request to that URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

PROBLEM_JSON = "application/problem+json"
_KNOWN_MEMBERS = frozenset({"type", "title", "status", "detail", "code", "errors", "request_id"})


class ConnectorsError(Exception):
    """Base class of every error this client raises."""


class TransportFailure(ConnectorsError):
    """The service could not be reached, or did not answer in time; the cause is httpx's error."""


class UnexpectedResponse(ConnectorsError):
    """An answer that is neither the documented success nor a problem document."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(message)
        self.status = response.status_code
        self.content_type = response.headers.get("content-type")
        self.request_id = response.headers.get("x-request-id")
        self.response = response


class DestinationRefused(ConnectorsError):
    """``ConnectorAuth`` refused to attach credentials: the URL is not under the connector's
    resource domain (another scheme, host or port, or outside its base path)."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One failing field of an ``invalid_request``; the service never echoes the value sent."""

    field: str
    reason: str


class ProblemError(ConnectorsError):
    """An ``application/problem+json`` answer of the service.

    ``status``, ``code``, ``title``, ``detail`` and ``type`` are the problem's members,
    ``errors`` its failing fields, ``request_id`` the id the service gave the request (from the
    body, else the ``X-Request-ID`` header; ``None`` when it names none), ``extensions`` every
    other member, ``retry_after`` the ``Retry-After`` header in seconds, and ``response`` the
    response itself.
    """

    # The code a subclass stands for.
    code_name: ClassVar[str] = ""

    def __init__(self, response: httpx.Response, body: dict[str, Any]) -> None:
        self.response = response
        status = body.get("status")
        self.status: int = status if isinstance(status, int) else response.status_code
        self.code: str = _text(body.get("code"))
        self.title: str = _text(body.get("title"))
        self.detail: str = _text(body.get("detail"))
        self.type: str = _text(body.get("type")) or "about:blank"
        self.errors: list[FieldError] = _field_errors(body.get("errors"))
        request_id = body.get("request_id")
        self.request_id: str | None = (
            request_id if isinstance(request_id, str) else response.headers.get("x-request-id")
        )
        self.extensions: dict[str, Any] = {k: v for k, v in body.items() if k not in _KNOWN_MEMBERS}
        self.retry_after: int | None = retry_after(response)
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status} {self.code or 'problem'}: {self.detail or self.title}"
        if self.errors:
            text += " (" + "; ".join(f"{e.field}: {e.reason}" for e in self.errors) + ")"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


# By status family and status ------------------------------------------------------------------


class ClientProblem(ProblemError):
    """A 4xx problem: the request was refused and changed nothing."""


class ServerProblem(ProblemError):
    """A 5xx problem: the service or an upstream it called failed."""


class Unauthenticated(ClientProblem):
    """401: missing, expired or invalid caller token."""


class Forbidden(ClientProblem):
    """403: the caller token lacks the scope."""


class NotFound(ClientProblem):
    """404."""


class Conflict(ClientProblem):
    """409."""


class PreconditionFailed(ClientProblem):
    """412."""


class Unprocessable(ClientProblem):
    """422: the request is not valid, or the credentials or path it carries are refused."""


class BadGateway(ServerProblem):
    """502: an identity provider or validation URL refused or failed."""


class ServiceUnavailable(ServerProblem):
    """503: see ``retry_after``."""


class GatewayTimeout(ServerProblem):
    """504: an identity provider or validation URL did not answer in time."""


# By code --------------------------------------------------------------------------------------


class ConnectorNotFound(NotFound):
    code_name: ClassVar[str] = "connector_not_found"


class NameTaken(Conflict):
    code_name: ClassVar[str] = "name_taken"


class ConnectorLimitReached(Conflict):
    code_name: ClassVar[str] = "connector_limit_reached"


class ConsentRequired(Conflict):
    """An authorization code connector has no usable grant: an admin must connect its account
    (again) with ``consent``; ``authorize`` fails at once, without calling the provider."""

    code_name: ClassVar[str] = "consent_required"


class WrongGrantType(Conflict):
    code_name: ClassVar[str] = "wrong_grant_type"


class VersionMismatch(PreconditionFailed):
    """``If-Match`` named a version that is no longer current: read the connector again."""

    code_name: ClassVar[str] = "version_mismatch"


class InvalidRequest(Unprocessable):
    """The request is malformed; ``errors`` names the failing fields."""

    code_name: ClassVar[str] = "invalid_request"


class SecretRequired(Unprocessable):
    code_name: ClassVar[str] = "secret_required"


class PathOutsideResourceDomain(Unprocessable):
    code_name: ClassVar[str] = "path_outside_resource_domain"


class TokenEndpointError(BadGateway):
    code_name: ClassVar[str] = "token_endpoint_error"


class UpstreamUnreachable(BadGateway):
    code_name: ClassVar[str] = "upstream_unreachable"


class DatabaseUnavailable(ServiceUnavailable):
    code_name: ClassVar[str] = "database_unavailable"


class TokenEndpointTimeout(GatewayTimeout):
    code_name: ClassVar[str] = "token_endpoint_timeout"


class UpstreamTimeout(GatewayTimeout):
    code_name: ClassVar[str] = "upstream_timeout"


class CredentialsRejected(ProblemError):
    """The identity provider or validation URL refused the credentials (422 on save, 502 at
    authorize); an instance is also an ``Unprocessable`` or a ``BadGateway``."""

    code_name: ClassVar[str] = "credentials_rejected"


class DestinationNotAllowed(ProblemError):
    """A URL's host is, or resolves to, a non-global address (422 on save, 502 at authorize)."""

    code_name: ClassVar[str] = "destination_not_allowed"


_BY_STATUS: dict[int, type[ProblemError]] = {
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    422: Unprocessable,
    502: BadGateway,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}
_BY_CODE: dict[str, type[ProblemError]] = {
    cls.code_name: cls
    for cls in (
        ConnectorNotFound,
        NameTaken,
        ConnectorLimitReached,
        ConsentRequired,
        WrongGrantType,
        VersionMismatch,
        InvalidRequest,
        SecretRequired,
        PathOutsideResourceDomain,
        TokenEndpointError,
        UpstreamUnreachable,
        DatabaseUnavailable,
        TokenEndpointTimeout,
        UpstreamTimeout,
        CredentialsRejected,
        DestinationNotAllowed,
    )
}


def problem_class(status: int, code: str) -> type[ProblemError]:
    """The exception class for a problem with this status and code."""
    if status in _BY_STATUS:
        by_status = _BY_STATUS[status]
    elif 400 <= status < 500:
        by_status = ClientProblem
    elif 500 <= status < 600:
        by_status = ServerProblem
    else:
        by_status = ProblemError
    by_code = _BY_CODE.get(code)
    if by_code is None:
        return by_status
    if issubclass(by_code, by_status):
        return by_code
    if by_code.__bases__ == (ProblemError,):
        return _both(by_code, by_status)
    # A known code with a status it is never answered with: trust the status.
    return by_status


# Classes made by ``_both``, so that each pair is one class (``except`` and ``type(e) is`` agree).
_COMBINED: dict[tuple[type[ProblemError], type[ProblemError]], type[ProblemError]] = {}


def _both(by_code: type[ProblemError], by_status: type[ProblemError]) -> type[ProblemError]:
    combined = _COMBINED.get((by_code, by_status))
    if combined is None:
        combined = type(by_code.__name__, (by_code, by_status), {"__module__": __name__})
        combined.__qualname__ = by_code.__qualname__
        combined = _COMBINED.setdefault((by_code, by_status), combined)
    return combined


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the ``ProblemError`` (or ``UnexpectedResponse``) of an answer that is not a success."""
    if response.is_success:
        return
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == PROBLEM_JSON:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            problem = problem_class(response.status_code, _text(body.get("code")))
            raise problem(response, body)
    raise UnexpectedResponse(
        f"HTTP {response.status_code} with a {media_type or 'missing'} content type: not a problem document",
        response,
    )


def retry_after(response: httpx.Response) -> int | None:
    """The ``Retry-After`` header in whole seconds, when it gives them."""
    value = response.headers.get("retry-after", "").strip()
    return int(value) if value.isdigit() else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _field_errors(value: object) -> list[FieldError]:
    if not isinstance(value, list):
        return []
    return [
        FieldError(_text(item.get("field")), _text(item.get("reason")))
        for item in value
        if isinstance(item, dict)
    ]
