"""What every resource's routes share on the wire: ids as issued, ETags, ``no-store``."""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

# The one spelling of an id this service issues. Any other spelling of the same UUID, like a
# malformed id, is an id that does not exist: the route answers its 404, not a 422.
CANONICAL_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# How the document states it: the pattern describes, ``canonical_uuid`` decides.
ID_SCHEMA: Final[dict[str, Any]] = {"pattern": f"^{CANONICAL_ID.pattern}$", "format": "uuid"}
# Answers holding a credential or a secret.
NO_STORE: Final = {"Cache-Control": "no-store"}


def canonical_uuid(value: str) -> uuid.UUID | None:
    """The UUID ``value`` names if it is spelled as issued, else None."""
    return uuid.UUID(value) if CANONICAL_ID.fullmatch(value) is not None else None


def etag(version: int) -> str:
    """The strong ETag of a configuration version: the number in quotes."""
    return f'"{version}"'
