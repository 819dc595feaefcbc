"""What connector events say: identifiers, names, kinds, versions and states, never a secret.

The bodies of ``connector.created``, ``connector.updated``, ``connector.deleted`` and
``connector.status_changed`` (``app.connectors.events``), built here for every writer of them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.connectors.models import Connector
from app.core.clock import rfc3339

__all__ = ["event_data", "status_change", "status_data"]


def event_data(row: Connector) -> dict[str, Any]:
    """What connector events say of a connector: identifiers, name, kind, version, state."""
    return {
        "connector_id": str(row.id),
        "organization_id": row.organization_id,
        "name": row.name,
        "auth_type": row.auth_type,
        "version": row.version,
        "status": row.status_state,
    }


def status_change(was: str, state: str, detail: str | None, at: datetime) -> dict[str, Any]:
    """``connector.status_changed``: the previous and new state, the error code, when."""
    code, _, provider = (detail or "").partition(": ")
    return {
        "previous_state": was,
        "state": state,
        "error_code": code or None,
        "provider_error": provider or None,
        "changed_at": rfc3339(at),
    }


def status_data(row: Connector, was: str, detail: str | None, at: datetime) -> dict[str, Any]:
    return {
        "connector_id": str(row.id),
        "organization_id": row.organization_id,
        "version": row.version,
        **status_change(was, row.status_state, detail, at),
    }
