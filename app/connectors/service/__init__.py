"""Connector rules (``core.ConnectorService``), with one module per concern: merging a PATCH of
``auth`` (``patching``), naming fields in audit events (``audit_fields``), what events say
(``payloads``), writing the statuses token requests learn (``status``), ``POST /authorize`` and
the memory it answers from (``authorize``), the throttled live check of ``POST /validate``
(``validation``), the work done after answering (``background``), creates, updates and deletes
(``writes``), the audit trail (``audit``) and connecting accounts by consent (``consent``).
Secrets are sealed by ``app.connectors.sealing``, grants kept by ``app.connectors.grants``.
``core`` keeps the reads and what the parts share, and builds the whole. What authorize holds in
memory is ``app.connectors.memory``."""

from app.connectors.service.background import ChangeListener
from app.connectors.service.core import ConnectorService, DestinationChecker, Tokens, status_recorder
from app.connectors.service.status import StatusRecorder
from app.connectors.service.validation import Validation

__all__ = [
    "ChangeListener",
    "ConnectorService",
    "DestinationChecker",
    "StatusRecorder",
    "Tokens",
    "Validation",
    "status_recorder",
]
