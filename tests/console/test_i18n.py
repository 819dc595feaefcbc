"""The console in Hungarian: every string of the pages has a translation, pages follow
``Accept-Language`` and the switch, and dates are written the Hungarian way."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from html import unescape
from pathlib import Path

import httpx

from app.connectors.service.consent import OUTCOME_WORDS
from app.console import forms, i18n, oidc, pages
from app.console.i18n import Language
from tests.support.servers import Reply, ScriptedServer

TEMPLATES = Path(pages.__file__).parent / "templates"
SOURCES = [Path(pages.__file__).parent / name for name in ("router.py", "webhooks.py", "pages.py", "oidc.py")]


def _messages() -> set[str]:
    """Every message the pages show: literal ``_("...")`` calls and form labels and hints in the
    templates, the words of choices and states, and the titles and messages of the routes."""
    found: set[str] = set()
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        found.update(re.findall(r'_\("((?:[^"\\]|\\.)*)"\)', text))
        found.update(re.findall(r"_\('((?:[^'\\]|\\.)*)'\)", text))
        for call in re.finditer(r"\{\{ (?:field|area|choice)\(([^)]*)\)", text):
            arguments = re.findall(r'"([^"]*)"', call.group(1))
            found.update(arguments[1:2])
            found.update(a for a in arguments[2:3] if a not in ("url", "password", "text"))
        found.update(re.findall(r'secret_hint = "([^"]*)"', text))
    for choices in (forms.AUTH_TYPES, forms.GRANT_TYPES, forms.CLIENT_AUTH_METHODS, forms.API_KEY_PLACES):
        found.update(words for _, words in choices)
    found.update(pages.STATE_WORDS.values())
    found.update(pages.KIND_WORDS.values())
    found.update(pages.DETAIL_WORDS.values())
    found.update(OUTCOME_WORDS.values())
    for source in SOURCES:
        text = source.read_text()
        found.update(re.findall(r'(?:title|message)="([^"]+)"', text))
    # The sign-in refusals, constants of their module (``_NOT_STARTED``, ...).
    constants = {name: value for name, value in vars(oidc).items() if re.fullmatch(r"_[A-Z_]+", name)}
    found.update(value for value in constants.values() if isinstance(value, str) and " " in value)
    return found


def test_every_message_of_the_pages_has_a_hungarian_translation() -> None:
    hungarian = Language("hu")
    missing = sorted(
        message
        for message in _messages()
        if hungarian.gettext(message) == message
        and message not in {"OAuth 2.0", "URL", "Webhook", "Token URL"}
    )
    assert not missing, missing
    # Placeholders survive translation.
    for message in _messages():
        assert set(re.findall(r"%\((\w+)\)s", message)) == set(
            re.findall(r"%\((\w+)\)s", hungarian.gettext(message))
        ), message


def test_dates_and_numbers_follow_the_language() -> None:
    at = datetime(2026, 12, 7, 9, 5, tzinfo=UTC)
    assert Language("en").when(at) == "Dec 7, 2026, 9:05:00\u202fAM UTC"
    assert Language("hu").when(at).startswith("2026. dec. 7.")
    assert Language("hu").number(12345.5) == "12\xa0345,5"
    assert Language("en").number(12345.5) == "12,345.5"


def test_the_language_comes_from_the_switch_then_the_cookie_then_accept_language() -> None:
    assert i18n.language(None, None, "hu-HU,hu;q=0.9,en;q=0.8").code == "hu"
    assert i18n.language(None, None, "de-DE,de;q=0.9,hu;q=0.5").code == "hu"
    assert i18n.language(None, None, "de-DE").code == "en"
    assert i18n.language(None, "hu", "en").code == "hu"
    switched = i18n.language("en", "hu", "hu")
    assert switched.code == "en" and switched.switched


async def test_pages_in_hungarian_and_the_switch(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]],
) -> None:
    client = await browser_for()
    page = await client.get("/console/", headers={"Accept-Language": "hu-HU,hu;q=0.9"})
    assert '<html lang="hu">' in page.text and "<h1>Csatlakozók</h1>" in page.text
    assert "Egyéni csatlakozó" in page.text and "Beállítás" in page.text
    switched = await client.get("/console/", params={"lang": "en"}, headers={"Accept-Language": "hu"})
    assert (
        '<html lang="en">' in switched.text and "connectors_console_lang=en" in switched.headers["set-cookie"]
    )
    # The cookie holds over Accept-Language afterwards.
    assert '<html lang="en">' in (await client.get("/console/", headers={"Accept-Language": "hu"})).text
    form = await client.get("/console/connectors/new", params={"lang": "hu"})
    assert "Hitelesítés típusa" in form.text and "Erőforrás-tartomány URL-je" in form.text


def test_a_refusal_written_with_a_value_is_translated_by_its_pattern() -> None:
    hungarian = Language("hu")
    said = hungarian.gettext("the validation URL answered HTTP 401")
    assert said == "az ellenőrző URL HTTP 401 választ adott"
    assert (
        hungarian.gettext("the token endpoint answered HTTP 400 with error invalid_client")
        == "a token-végpont HTTP 400 választ adott, invalid_client hibával"
    )
    said = hungarian.gettext("String should have at most 100 characters")
    assert said == "legfeljebb 100 karakter hosszú lehet"
    # Without a translation (or in English) a message stays as written.
    assert hungarian.gettext("no such message 401") == "no such message 401"
    english = "the validation URL answered HTTP 401"
    assert Language("en").gettext(english) == english


async def test_a_refused_save_in_hungarian_says_every_reason_in_hungarian(
    browser_for: Callable[..., Awaitable[httpx.AsyncClient]], scripted_server: ScriptedServer
) -> None:
    """The refusals an admin meets when filling in each kind of connector wrongly, and a live check
    that fails: each is shown in Hungarian, none in the words of the service's rules."""
    scripted_server.set_default(Reply(status=401))
    client = await browser_for()
    form = await client.get("/console/connectors/new", params={"lang": "hu"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    wrong = [
        {"type": "basic", "name": "", "resource_domain_url": "http://crm.example.com", "username": "a:b"},
        {"type": "basic", "name": "x" * 101, "resource_domain_url": "https://crm.example.com"},
        {
            "type": "oauth2",
            "grant_type": "authorization_code",
            "name": "Orders",
            "resource_domain_url": "https://orders.example.com",
            "client_id": "c",
            "client_secret": "s",
            "token_url": "https://id.example.com/token",
            "scope": "a\u00a0b",
            "authorization_url": "https://id.example.com/authorize?state=1",
        },
        {
            "type": "api_key",
            "name": "Keys",
            "resource_domain_url": "https://api.example.com",
            "key": "has space",
            "key_in": "header",
            "key_name": "bad name",
        },
    ]
    live = {
        "type": "basic",
        "name": "CRM",
        "resource_domain_url": "https://crm.example.com",
        "username": "svc",
        "password": "CANARY-pw",
        "validation_url": scripted_server.url("/check"),
    }
    shown: list[str] = []
    for values in [*wrong, live]:
        page = await client.post("/console/connectors", data={"csrf": csrf.group(1), **values})
        assert page.status_code in (409, 422), page.text
        assert "Semmi sem lett mentve." in page.text, page.text
        beside = re.findall(r'<p class="error" id="[^"]*">([^<]*)</p>', page.text)
        shown += [unescape(text) for text in beside]
        problem = re.search(r'<div class="problem"[^>]*>\s*<p>([^<]*)</p>', page.text)
        assert problem is not None
        shown.append(unescape(problem.group(1)))
    assert shown[-1] == "Semmi sem lett mentve. Az ellenőrző URL HTTP 401 választ adott"
    english = re.compile(r"\b(must|may not|the|should|required|answered|field)\b", re.IGNORECASE)
    assert len(shown) >= 10
    assert [message for message in shown if english.search(message)] == []
