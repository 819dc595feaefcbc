"""The printed form of every object holding a token shows no token (a log line or a traceback's
locals would otherwise carry it)."""

from __future__ import annotations

from datetime import UTC, datetime

from app.tokens.cache.entries import _Entry, _Token
from app.tokens.shared import SharedToken
from app.tokens.types import IssuedToken, TokenGrant
from tests.conftest import canary


def test_token_objects_print_no_token() -> None:
    access, refresh, stale = canary("access"), canary("refresh"), canary("stale")
    issued = IssuedToken(access, datetime(2026, 12, 7, tzinfo=UTC))
    objects: list[object] = [
        TokenGrant(access, 3600, refresh),
        issued,
        _Entry(1, _Token(issued, 1.0, 2.0, 0.0), refresh_token=refresh, stale=stale),
        SharedToken(access, 3600, 0.0),
    ]
    for printed in [*map(repr, objects), *map(str, objects)]:
        assert access not in printed and refresh not in printed and stale not in printed, printed
    assert "expires_in=3600" in repr(objects[0])
