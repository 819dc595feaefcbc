"""HTTP Basic credentials: the header value, and the live check against a validation URL
(``app.tokens.static`` says what its answers mean)."""

from __future__ import annotations

import base64

from opentelemetry.trace import Tracer
from pydantic import SecretStr

from app.core.errors import InvalidRequest
from app.core.outbound import OutboundClient
from app.tokens.static import check_static
from app.tokens.types import BasicConfig, StaticCredential

__all__ = ["basic_header", "check_basic"]


def basic_header(username: str, password: SecretStr) -> str:
    """The ``Authorization`` value for ``username`` and ``password`` (RFC 7617, UTF-8)."""
    if ":" in username:
        # The server splits user-id and password at the first colon (RFC 7617 §2).
        raise InvalidRequest("a Basic authentication username must not contain ':'")
    raw = f"{username}:{password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


async def check_basic(outbound: OutboundClient, config: BasicConfig, *, tracer: Tracer | None = None) -> None:
    """``GET validation_url`` with the Basic header (``app.tokens.static.check_static``)."""
    header = basic_header(config.username, config.password)
    await check_static(
        outbound, config.validation_url, StaticCredential(headers={"Authorization": header}), tracer=tracer
    )
