"""FastAPI dependencies that turn the Bearer header into a ``Principal`` with a required scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from app.core.auth import SCOPE_AUTHORIZE, SCOPE_READ, SCOPE_WRITE, Principal, TokenVerifier
from app.core.errors import Forbidden, Unauthenticated
from app.core.outbound import outbound_tenant


async def authenticate(request: Request, scope: str | None) -> Principal:
    """The caller of ``request``, who must hold ``scope`` (any scope when None)."""
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthenticated("missing bearer token")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected a bearer token")
    verifier: TokenVerifier = request.app.state.verifier
    principal = await verifier.verify(token.strip())
    # For the access line (app.core.logs); the scope's state dict, without Starlette's wrapper.
    request.scope.setdefault("state", {})["organization_id"] = principal.organization_id
    # Outbound calls this request makes, and the tasks it starts, count against its organization
    # (name lookups in flight, app.core.outbound.lookups).
    outbound_tenant.set(principal.organization_id)
    if scope is not None and scope not in principal.scopes:
        raise Forbidden(f"this call needs the {scope} scope")
    return principal


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    async def dependency(request: Request) -> Principal:
        return await authenticate(request, scope)

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


Reader = Annotated[Principal, Depends(require_scope(SCOPE_READ))]
Writer = Annotated[Principal, Depends(require_scope(SCOPE_WRITE))]
Authorizer = Annotated[Principal, Depends(require_scope(SCOPE_AUTHORIZE))]
