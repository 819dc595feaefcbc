"""The in-process OAuth token cache: absolute expiry, single flight, refresh ahead.

One entry per connector, keyed by ``(connector id, connector version)``. A newer version is a new
entry and replaces the older one, so a changed connector never gets a token obtained with its old
configuration and the cache never grows beyond one entry per connector. At most ``capacity``
entries are kept (more only while the extra ones have a token request under way): when full,
the least recently used entry without a request under way goes. A request for a version
older than the newest one seen (a caller holding a stale snapshot) is answered by a token request
of its own that is shared by its concurrent callers but never cached.

One job per module:

``schedule``
    When a token is handed out and when it is renewed: absolute expiry, leeway, refresh ahead.
``entries``
    What is kept per connector: the token with its schedule, the refresh token, the one token
    request under way, and the failure to replay.
``core``
    :class:`TokenCache`: the hot path, flights, refresh tokens, failures and the replicas' shared
    store.
"""

from app.tokens.cache.core import TokenCache
from app.tokens.cache.entries import CacheKey
from app.tokens.cache.schedule import (
    LEEWAY_FRACTION,
    LEEWAY_MAX_SECONDS,
    MAX_LIFETIME_SECONDS,
    REFRESH_AHEAD_FRACTION,
    REFRESH_AHEAD_MAX_SECONDS,
    token_schedule,
)

__all__ = [
    "LEEWAY_FRACTION",
    "LEEWAY_MAX_SECONDS",
    "MAX_LIFETIME_SECONDS",
    "REFRESH_AHEAD_FRACTION",
    "REFRESH_AHEAD_MAX_SECONDS",
    "CacheKey",
    "TokenCache",
    "token_schedule",
]
