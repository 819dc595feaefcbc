"""Connector rules (``core.ConnectorService``), with one module per concern: sealing secrets
(``sealing``), merging a PATCH of ``auth`` (``patching``), naming fields in audit events
(``audit_fields``), what events say (``payloads``), writing the statuses token requests learn
(``status``) and the work done after answering (``background``). What authorize holds in
memory is ``app.connectors.memory``."""

from app.connectors.service.background import ChangeListener
from app.connectors.service.core import (
    ConnectorService,
    DestinationChecker,
    Tokens,
    Validation,
    status_recorder,
)
from app.connectors.service.status import StatusRecorder

__all__ = [
    "ChangeListener",
    "ConnectorService",
    "DestinationChecker",
    "StatusRecorder",
    "Tokens",
    "Validation",
    "status_recorder",
]
