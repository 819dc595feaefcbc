"""Request bodies for connector tests; every secret is a canary."""

from __future__ import annotations

from typing import Any

from tests.conftest import canary


def basic(
    name: str = "Basic One", validation_url: str = "https://127.0.0.1:9/auth/check", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "basic",
            "username": "svc-user",
            "password": canary("basic"),
            "validation_url": validation_url,
        },
        **extra,
    }


def client_credentials(
    name: str = "OAuth One", token_url: str = "https://127.0.0.1:9/oauth/token", **auth: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "resource_domain_url": "https://api.example.com/base",
        "auth": {
            "type": "oauth2",
            "grant_type": "client_credentials",
            "client_id": "client-1",
            "client_secret": canary("client"),
            "token_url": token_url,
            "scope": "read write",
            **auth,
        },
    }


def password_grant(
    name: str = "OAuth Password", token_url: str = "https://127.0.0.1:9/oauth/token", **auth: Any
) -> dict[str, Any]:
    body = client_credentials(name, token_url, **auth)
    body["auth"].update(grant_type="password", username="svc-user", password=canary("pw"))
    return body


def authorization_code(
    name: str = "OAuth Consent",
    token_url: str = "https://127.0.0.1:9/oauth/token",
    authorization_url: str = "https://127.0.0.1:9/oauth/authorize",
    **auth: Any,
) -> dict[str, Any]:
    body = client_credentials(name, token_url, **auth)
    body["auth"].update(grant_type="authorization_code", authorization_url=authorization_url)
    body["auth"].setdefault("scope", "read")
    return body
