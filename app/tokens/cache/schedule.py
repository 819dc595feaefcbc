"""When a cached token is handed out and when it is renewed.

Expiry
    A token's expiry is absolute and measured on the monotonic clock from the moment its request
    was *sent*, not from when the answer arrived: ``expires = sent_at + expires_in``. Time spent
    on the wire only ever shortens what the cache believes, never lengthens it.

    A token is handed out only while ``now < expires - leeway``, with
    ``leeway = min(60 s, 10 % of the lifetime)``. The caller still has to use the token, and the
    resource server's clock may run ahead of ours; a minute covers both for ordinary tokens, while
    the 10 % cap keeps short-lived tokens useful (a 30 s token is handed out for 27 s instead of
    never, a 3600 s token for 3540 s). ``IssuedToken.expires_at`` is that same last moment,
    converted to wall-clock time: a caller may rely on it.

Refresh ahead
    Once a token is past its refresh point, ``min(300 s, 20 % of the lifetime)`` before it stops
    being handed out (70 % into a 30 s token, 90 % into a 3600 s one), the next caller starts one
    background renewal and, like every caller after it, gets the cached token at once. Only when
    the token is no longer usable do callers wait for a token request. A steady stream of calls
    therefore never waits on the identity provider, and a burst after a quiet period waits once.
"""

from __future__ import annotations

import math

LEEWAY_MAX_SECONDS = 60.0
LEEWAY_FRACTION = 0.1
REFRESH_AHEAD_MAX_SECONDS = 300.0
REFRESH_AHEAD_FRACTION = 0.2
# Longer lifetimes are cut to this, so wall-clock arithmetic cannot overflow.
MAX_LIFETIME_SECONDS = 366 * 86_400.0


def token_schedule(expires_in: float, sent_at: float) -> tuple[float, float]:
    """The monotonic times until which a token is handed out and from which it is renewed."""
    lifetime = _clamp_lifetime(expires_in)
    usable_until = sent_at + lifetime - min(LEEWAY_MAX_SECONDS, lifetime * LEEWAY_FRACTION)
    refresh_at = usable_until - min(REFRESH_AHEAD_MAX_SECONDS, lifetime * REFRESH_AHEAD_FRACTION)
    return usable_until, refresh_at


def _clamp_lifetime(expires_in: float) -> float:
    if math.isnan(expires_in) or expires_in <= 0:
        return 0.0
    return min(expires_in, MAX_LIFETIME_SECONDS)
