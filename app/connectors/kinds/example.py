"""A request body that shows a kind (or a client-authentication method) in the API document."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BodyExample:
    """A named example of ``POST /connectors``: ``name`` is its key in the document."""

    name: str
    summary: str
    value: Mapping[str, Any]
