"""The registry of client-authentication methods of OAuth 2.0 connectors.

Adding a method: a module here with its ``ClientAuth`` and a ``ClientAuthMethod`` (see
``client_secret_post`` for the smallest), and one line in ``METHODS``.
"""

from __future__ import annotations

from app.connectors.kinds.client_auth import (
    client_secret_basic,
    client_secret_post,
    private_key_jwt,
    tls_client_auth,
)
from app.connectors.kinds.client_auth.base import ClientAuthMethod

__all__ = ["METHODS", "ClientAuthMethod", "default_method", "method_of"]

METHODS: tuple[ClientAuthMethod, ...] = (
    client_secret_basic.METHOD,
    client_secret_post.METHOD,
    private_key_jwt.METHOD,
    tls_client_auth.METHOD,
)
_BY_NAME = {method.name: method for method in METHODS}


def method_of(name: str) -> ClientAuthMethod:
    return _BY_NAME[name]


def default_method() -> ClientAuthMethod:
    return next(method for method in METHODS if method.default)
