"""Input rules written as JSON Schema patterns, for OpenAPI: those of ``app.core.urls``,
``app.connectors.schemas`` and the kinds.

The validators stay the rule; a pattern describes it so that a client (or a generated request)
can tell a valid value before sending it. Each pattern accepts only values the validator accepts;
where a rule cannot be written as a pattern, the pattern accepts a little less than the service
(URLs: RFC 3986 characters only, a top label starting with a letter, ports without leading
zeros) or the README lists the refusal the document does not show (a host name over 253
characters, a lone surrogate). ``tests/connectors/test_patterns.py`` checks both directions.

The syntax is the part of ECMA-262 that Python's ``re``, Rust's ``regex`` (schema validators)
and Hypothesis (request generators) read alike: no look-around, ``\\xHH`` and ``\\uHHHH`` escapes,
characters beyond the Basic Multilingual Plane written as themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Unicode 14.0 (Python 3.11), by category: the tests compare them with ``unicodedata``.
_FORMAT: Final = (  # Cf: soft hyphen, bidi controls, zero-width characters, tags, ...
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
_CONTROL: Final = ((0x00, 0x1F), (0x7F, 0x9F))  # Cc
_SEPARATOR: Final = ((0x2028, 0x2029),)  # Zl and Zp
_SPACE: Final = (  # Zs
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)
# What Python's ``str.strip()`` removes (``str.isspace``).
_WHITESPACE: Final = (
    (0x09, 0x0D),
    (0x1C, 0x20),
    (0x85, 0x85),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


def _char(code: int) -> str:
    if code > 0xFFFF:
        return chr(code)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _ranges(*sets: Iterable[tuple[int, int]]) -> str:
    """The inside of a character class holding every range of ``sets``."""
    merged: list[list[int]] = []
    for start, end in sorted(item for ranges in sets for item in ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return "".join(_char(a) if a == b else f"{_char(a)}-{_char(b)}" for a, b in merged)


def _anchored(body: str) -> str:
    return f"^{body}$"


# Names: 1-100 characters once white space is trimmed, with no control or invisible character
# (Cc, Cf, Zl, Zp) in what remains. White space around it may be anything ``strip()`` removes.
_WS = _ranges(_WHITESPACE)
_NAME_EDGE = f"[^{_ranges(_WHITESPACE, _CONTROL, _FORMAT, _SEPARATOR)}]"
_NAME_INNER = f"[^{_ranges(_CONTROL, _FORMAT, _SEPARATOR)}]"
NAME: Final = _anchored(f"[{_WS}]*{_NAME_EDGE}(?:{_NAME_INNER}{{0,98}}{_NAME_EDGE})?[{_WS}]*")

# Identifiers, user names, scopes and token parameter values: no control character.
NO_CONTROL: Final = _anchored(f"[^{_ranges(_CONTROL)}]*")
# A Basic user name: no control character and no ':' (RFC 7617 splits user and password there).
BASIC_USERNAME: Final = _anchored(f"[^{_ranges(_CONTROL)}:]*")
# A secret: no NUL.
SECRET: Final = _anchored("[^\\x00]*")

# Extra token parameter names: 1-64 ASCII letters, digits, '_', '-' or '.', and none that names a
# field the token request sets itself, in any case and with '.' or '-' for '_'.
TOKEN_PARAM_NAME: Final = _anchored("[A-Za-z0-9_.\\-]{1,64}")


def any_spelling_of(names: Iterable[str]) -> str:
    """A pattern matching any of ``names`` in any case, with ``.`` or ``-`` for ``_``."""

    def spelling(name: str) -> str:
        return "".join(f"[{c.upper()}{c}]" if c.isalpha() else "[_.\\-]" if c == "_" else c for c in name)

    return _anchored("(?:" + "|".join(spelling(name) for name in sorted(names)) + ")")


# URLs, as ``urls.normalise_base_url`` and ``urls.normalise_endpoint_url`` take them.
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9\\-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9\\-]{0,61}[A-Za-z0-9])?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_HOST = f"(?:(?:{_LABEL}\\.)*{_TOP_LABEL}\\.?|{_OCTET}(?:\\.{_OCTET}){{3}})"
_PORT = "(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
# A path segment is RFC 3986 characters; '.' and '%2e' are dots, '%2f' and '%5c' never appear,
# and a segment may not be one or two dots alone.
_PCHAR = "[A-Za-z0-9\\-_~!$&'()*+,;=:@]"
_ESCAPE = "%(?:[013-46-9A-Fa-f][0-9A-Fa-f]|2[0-9A-Da-d]|5[0-9ABabD-Fd-f])"
_DOT = "(?:\\.|%2[Ee])"
_OTHER = f"(?:{_PCHAR}|{_ESCAPE})"
_TOKEN = f"(?:{_OTHER}|{_DOT})"
_SEGMENT = f"(?:{_OTHER}{_TOKEN}*|{_DOT}{_OTHER}{_TOKEN}*|{_DOT}{_DOT}{_TOKEN}+)"
_PATH = f"(?:/{_SEGMENT}?)*"
_QUERY = "(?:\\?(?:[A-Za-z0-9\\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?"
BASE_URL: Final = _anchored(f"https://{_HOST}{_PORT}{_PATH}")
ENDPOINT_URL: Final = _anchored(f"https://{_HOST}{_PORT}{_PATH}{_QUERY}")

# The characters an /authorize path may hold: no control, space, invisible character, backslash
# or '#'. The rest of its rules (README, "Paths given to /authorize") are not a pattern's to say.
AUTHORIZE_PATH: Final = _anchored(f"[^{_ranges(_CONTROL, _SPACE, _FORMAT, _SEPARATOR)}\\\\#]*")
