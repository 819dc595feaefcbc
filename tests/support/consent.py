"""An admin at a provider's pages, as a browser without JavaScript would be: it follows the
authorization URL, fills in the sign-in form, answers the consent page and stops at the redirect
back to the service, whose ``Location`` it returns (the test then delivers it where it wants).

The pages are the test authorization server's (``tests.support.authserver``); the browser tests
(``tests/test_consent_browser.py``) drive the same pages in Chromium.
"""

from __future__ import annotations

import re
import ssl
from html import unescape
from pathlib import Path
from urllib.parse import urljoin

import httpx

_FORM = re.compile(r'<form method="post" action="([^"]*)">')
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


class ProviderBrowser:
    def __init__(self, ca_bundle: Path) -> None:
        self._http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_bundle)), timeout=10)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def consent(
        self, authorization_url: str, *, username: str, password: str, decision: str = "allow"
    ) -> str:
        """Sign in, answer the consent page, and return where the provider redirects to."""
        page = await self._http.get(authorization_url)
        assert page.status_code == 200, page.text
        if "Sign in" in page.text:
            action, hidden = self._form(page)
            signed_in = await self._http.post(
                urljoin(str(page.url), action), data={**hidden, "username": username, "password": password}
            )
            assert signed_in.status_code == 302, signed_in.text
            page = await self._http.get(urljoin(str(page.url), signed_in.headers["location"]))
            assert page.status_code == 200, page.text
        assert "Allow access?" in page.text, page.text
        action, _ = self._form(page)
        answered = await self._http.post(urljoin(str(page.url), action), data={"decision": decision})
        assert answered.status_code == 302, answered.text
        return answered.headers["location"]

    @staticmethod
    def _form(page: httpx.Response) -> tuple[str, dict[str, str]]:
        found = _FORM.search(page.text)
        assert found is not None, page.text
        hidden = {name: unescape(value) for name, value in _HIDDEN.findall(page.text)}
        return unescape(found.group(1)), hidden
