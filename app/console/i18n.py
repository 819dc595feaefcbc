"""The console's languages: English (the messages as written) and Hungarian (``locales/hu.po``).

A page is in the language the admin picked with the switch on every page (a cookie), else the
first of ``Accept-Language`` the console speaks, else English. Every string of the pages goes
through the catalog, messages from the service's rules (field errors) included, where one has a
translation; dates and numbers are formatted by Babel for the language (in UTC).
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Final

from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal
from babel.support import NullTranslations, Translations

__all__ = ["LANGUAGES", "Language", "choose", "current", "language"]

LANGUAGES: Final = ("en", "hu")
NAMES: Final = {"en": "English", "hu": "Magyar"}
COOKIE: Final = "connectors_console_lang"


_PLACEHOLDER: Final = re.compile(r"%\((\w+)\)s")


@dataclasses.dataclass(frozen=True, slots=True)
class _Catalog:
    """A language's translations, and its messages with placeholders as patterns: a refusal
    written with a value in it (``the validation URL answered HTTP 401``) is translated by the
    entry written with a placeholder (``... HTTP %(status)s``)."""

    translations: NullTranslations
    patterns: tuple[tuple[re.Pattern[str], str], ...] = ()

    def gettext(self, message: str) -> str:
        translated = self.translations.gettext(message)
        if translated != message or not self.patterns:
            return translated
        for pattern, template in self.patterns:
            found = pattern.fullmatch(message)
            if found:
                return template % found.groupdict()
        return message


def _pattern(message_id: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(message_id)
    # split() alternates literal text and placeholder names.
    return re.compile(
        "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+?)" for i, part in enumerate(parts))
    )


def _load(code: str) -> _Catalog:
    path = Path(__file__).parent / "locales" / f"{code}.po"
    if not path.exists():
        return _Catalog(NullTranslations())
    with path.open("rb") as source:
        catalog = read_po(source, locale=code)
    compiled = BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    templates = [
        (message.id, str(message.string))
        for message in catalog
        if isinstance(message.id, str) and message.string and _PLACEHOLDER.search(message.id)
    ]
    # The most specific first: "... HTTP %(status)s with error %(code)s" before "... HTTP %(status)s".
    templates.sort(key=lambda entry: -len(_PLACEHOLDER.sub("", entry[0])))
    patterns = tuple((_pattern(message_id), translated) for message_id, translated in templates)
    return _Catalog(Translations(fp=compiled), patterns)


_CATALOGS: Final = {code: _load(code) for code in LANGUAGES}


@dataclasses.dataclass(frozen=True, slots=True)
class Language:
    code: str
    # True when picked with the switch on this request: the answer remembers it (a cookie).
    switched: bool = False

    def gettext(self, message: str) -> str:
        return _CATALOGS[self.code].gettext(message)

    def when(self, at: datetime | None) -> str:
        if at is None:
            return self.gettext("never")
        return format_datetime(at.astimezone(UTC), format="medium", tzinfo=UTC, locale=self.code) + " UTC"

    def number(self, value: int | float) -> str:
        return format_decimal(value, locale=self.code)


_ENGLISH: Final = Language("en")
_current: contextvars.ContextVar[Language | None] = contextvars.ContextVar("console_language", default=None)


def language(query: str | None, cookie: str | None, accept: str | None) -> Language:
    """The language of a request: the switch (``?lang=``), the cookie, ``Accept-Language``."""
    if query in LANGUAGES:
        return Language(query, switched=query != cookie)
    if cookie in LANGUAGES:
        return Language(cookie)
    return Language(_negotiate(accept or ""))


def _negotiate(accept: str) -> str:
    wanted: list[tuple[float, str]] = []
    for position, part in enumerate(accept.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0:
            wanted.append((-quality + position * 1e-6, tag.replace("-", "_")))
    for _, tag in sorted(wanted):
        try:
            found = Locale.parse(tag).language
        except (ValueError, UnknownLocaleError):
            continue
        if found in LANGUAGES:
            return found
    return "en"


def choose(chosen: Language) -> None:
    _current.set(chosen)


def current() -> Language:
    return _current.get() or _ENGLISH
