"""Connector rules (``core.ConnectorService``), with one module per concern: sealing secrets
(``sealing``), merging a PATCH of ``auth`` (``patching``) and naming fields in audit events
(``audit_fields``). What authorize holds in memory is ``app.connectors.memory``."""

from app.connectors.service.core import (
    ChangeListener,
    ConnectorService,
    DestinationChecker,
    Tokens,
    Validation,
)

__all__ = ["ChangeListener", "ConnectorService", "DestinationChecker", "Tokens", "Validation"]
