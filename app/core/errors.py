"""One error vocabulary for the whole service.

Every expected failure is an ``AppError`` subclass carrying an HTTP status, a stable ``code`` and a
title. The HTTP layer renders them as RFC 9457 ``application/problem+json``; nothing below the
routers knows about HTTP beyond these three attributes. Messages never contain secret values.
"""

from __future__ import annotations

from typing import ClassVar


class AppError(Exception):
    """Base class of every error the service answers on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal server error"
    # Seconds a caller is asked to wait before trying again (a Retry-After header), if any.
    retry_after: ClassVar[int | None] = None

    def __init__(self, detail: str | None = None, *, status: int | None = None, **extra: object) -> None:
        # ``status`` overrides the class default where the same failure means another status in
        # another place (credentials_rejected is 422 on save but 502 on authorize).
        self.detail = detail or self.title
        self.http_status = status or self.status
        # Extra members of the problem document; only safe, non-secret strings go here.
        self.extra = extra
        super().__init__(self.detail)

    @property
    def headers(self) -> dict[str, str] | None:
        """Response headers that go with this error."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class Unauthenticated(AppError):
    status = 401
    code = "unauthenticated"
    title = "Missing, expired or invalid caller token"


class Forbidden(AppError):
    status = 403
    code = "forbidden"
    title = "The caller token lacks the required scope"


class ConnectorNotFound(AppError):
    status = 404
    code = "connector_not_found"
    title = "No such connector"


class NameTaken(AppError):
    status = 409
    code = "name_taken"
    title = "Another connector of the organization has that name"


class ConnectorLimitReached(AppError):
    status = 409
    code = "connector_limit_reached"
    title = "The organization already has its maximum number of connectors"


class WebhookNotFound(AppError):
    status = 404
    code = "webhook_not_found"
    title = "No such webhook subscription"


class WebhookDeliveryNotFound(AppError):
    status = 404
    code = "webhook_delivery_not_found"
    title = "No such delivery of this webhook subscription"


class WebhookLimitReached(AppError):
    status = 409
    code = "webhook_limit_reached"
    title = "The organization already has its maximum number of webhook subscriptions"


class WebhookNotDeliverable(AppError):
    """A resend onto a subscription that sends nothing now (disabled or failing): it would wait
    for as long as the subscription stays so."""

    status = 409
    code = "webhook_not_deliverable"
    title = "The webhook subscription is disabled or failing: fix it before resending"


class ResendLimitReached(AppError):
    status = 409
    code = "resend_limit_reached"
    title = "The webhook subscription already has its maximum of deliveries waiting"


class ConsentRequired(AppError):
    """An authorization code connector has no usable grant: an admin must connect it (again)
    at the provider's consent page (``POST /connectors/{id}/consent``)."""

    status = 409
    code = "consent_required"
    title = "The connector needs an admin to connect its account"


class WrongGrantType(AppError):
    """The operation needs a connector of another grant type (consent: authorization code)."""

    status = 409
    code = "wrong_grant_type"
    title = "The connector's grant type does not allow this"


class VersionMismatch(AppError):
    status = 412
    code = "version_mismatch"
    title = "If-Match does not match the current version"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"
    title = "The request body is too large"


class KeyChecksBusy(AppError):
    """The organization already has private keys being checked (each takes a fraction of a second
    of a worker's CPU): one organization's stream of key saves does not queue in front of the
    others'."""

    status = 429
    code = "key_checks_busy"
    title = "The organization's private keys are already being checked: try again shortly"
    retry_after = 1


class InvalidRequest(AppError):
    status = 422
    code = "invalid_request"
    title = "The request is not valid"


class SecretRequired(AppError):
    status = 422
    code = "secret_required"
    title = "This change needs the secret to be sent again"


class PathOutsideResourceDomain(AppError):
    status = 422
    code = "path_outside_resource_domain"
    title = "The path would leave the connector's resource domain"


class DestinationNotAllowed(AppError):
    """A URL's host is, or resolves to, a non-global address (422 at save, 502 at authorize)."""

    status = 422
    code = "destination_not_allowed"
    title = "The destination address is not allowed"


class CredentialsRejected(AppError):
    """The identity provider or validation URL refused the credentials (422 at save)."""

    status = 422
    code = "credentials_rejected"
    title = "The credentials were rejected"


class TokenEndpointError(AppError):
    status = 502
    code = "token_endpoint_error"
    title = "The token endpoint answered with an error"


class UpstreamUnreachable(AppError):
    status = 502
    code = "upstream_unreachable"
    title = "The upstream service could not be reached"


class NameNotResolved(AppError):
    """A URL's host name did not resolve (no such name, no answer in time, or its organization
    has too many lookups in flight); the detail names that host only."""

    status = 502
    code = "name_not_resolved"
    title = "The upstream host name could not be resolved"


class TokenEndpointTimeout(AppError):
    status = 504
    code = "token_endpoint_timeout"
    title = "The token endpoint did not answer in time"


class UpstreamTimeout(AppError):
    status = 504
    code = "upstream_timeout"
    title = "The upstream service did not answer in time"


class SecretUnreadable(AppError):
    """A stored secret cannot be decrypted with the configured key ring: a key is missing or wrong.

    A fault of the service's configuration, not of the caller's request or of an upstream, and
    not one that a retry mends: a 500 with a code of its own, so it is told apart from a bug.
    """

    status = 500
    code = "secret_unreadable"
    title = "A stored secret of the connector cannot be decrypted"


class DatabaseUnavailable(AppError):
    """The answer needs the database and it cannot be reached (or did not answer in time)."""

    status = 503
    code = "database_unavailable"
    title = "The database is unavailable"
    retry_after = 5


class Starting(AppError):
    """The process is still loading what it needs to answer quickly (``/readyz`` only)."""

    status = 503
    code = "starting"
    title = "The process is still starting"
    retry_after = 1


def _all_subclasses(cls: type[AppError]) -> list[type[AppError]]:
    found: list[type[AppError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


# Every error class by its code, for errors that travel as their code alone.
ERROR_CLASSES: dict[str, type[AppError]] = {cls.code: cls for cls in _all_subclasses(AppError)}
