"""``/docs`` and ``/redoc`` work without internet: every URL the pages name is the service's own,
and each answers, without a caller token, with the installed ``fastapi_offline`` package's file."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.core.docs import ASSETS_VERSION

PAGES = ["/docs", "/redoc"]
# What each referenced URL must answer: its media type and a size below which it is no real asset.
EXPECTED = {
    ".js": ("text/javascript", 100_000),
    ".css": ("text/css", 10_000),
    ".png": ("image/png", 1_000),
    ".json": ("application/json", 1_000),
}
# A quoted string in an inline script.
_STRING = re.compile(r"""(["'])((?:(?!\1).)*)\1""")


class _Page(HTMLParser):
    """Every URL-like attribute value (``src``, ``href``, ``spec-url``...) and each inline script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is not None and (name in ("src", "href", "action") or name.endswith("url")):
                self.urls.append(value)
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.scripts.append(data)


def _referenced(html: str) -> list[str]:
    page = _Page()
    page.feed(html)
    urls = list(page.urls)
    for script in page.scripts:
        urls += [m.group(2) for m in _STRING.finditer(script) if "/" in m.group(2) or ":" in m.group(2)]
    return urls


def _anonymous(app: Any, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.mark.parametrize("page", PAGES)
async def test_a_docs_page_names_only_urls_of_the_service(app: Any, page: str) -> None:
    async with _anonymous(app) as client:
        response = await client.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        html = response.text
        for outside in ("cdn.", "https://", "http://", "//fonts", "googleapis", "jsdelivr", "unpkg"):
            assert outside not in html, outside
        urls = _referenced(html)
        assert "/openapi.json" in urls
        assert any(url.endswith(".js") for url in urls)
        assert any(url.endswith(".png") for url in urls)
        for url in urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc and url.startswith("/"), url
            # Each answers a caller without a token, with the right type and a real body.
            asset = await client.get(url)
            assert asset.status_code == 200, (url, asset.text[:200])
            media_type, smallest = EXPECTED["." + url.rsplit(".", 1)[-1]]
            assert asset.headers["content-type"].split(";")[0] == media_type, url
            assert len(asset.content) >= smallest, url


async def test_swagger_ui_keeps_the_token_and_sends_nothing_to_the_validator(app: Any) -> None:
    async with _anonymous(app) as client:
        (script,) = [s for s in _scripts((await client.get("/docs")).text) if "SwaggerUIBundle(" in s]
    assert '"persistAuthorization": true' in script
    assert '"validatorUrl": null' in script


def _scripts(html: str) -> list[str]:
    page = _Page()
    page.feed(html)
    return page.scripts


async def test_assets_are_the_installed_packages_files_cached_by_version(app: Any) -> None:
    static = importlib.resources.files("fastapi_offline").joinpath("static")
    base = f"/docs/assets/{ASSETS_VERSION}"
    async with _anonymous(app) as client:
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
            response = await client.get(f"{base}/{name}")
            assert response.status_code == 200
            assert response.content == static.joinpath(name).read_bytes()
            assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert response.headers["x-content-type-options"] == "nosniff"
            etag = response.headers["etag"]
            again = await client.get(f"{base}/{name}", headers={"If-None-Match": etag})
            assert again.status_code == 304
            assert again.content == b""
            assert again.headers["etag"] == etag
            other = await client.get(f"{base}/{name}", headers={"If-None-Match": '"0"'})
            assert other.status_code == 200
        # Another version's URL, or a file that is not an asset, is an unknown path.
        for path in (
            "/docs/assets/0.0.0/favicon.png",
            f"{base}/core.py",
            f"{base}/..%2Fcore.py",
            f"{base}/static",
            f"{base}/",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"


async def test_behind_a_path_prefix_the_pages_name_prefixed_urls(app: Any) -> None:
    async with _anonymous(app, root_path="/api") as client:
        for page in PAGES:
            urls = _referenced((await client.get(page)).text)
            assert urls and all(url.startswith("/api/") for url in urls), urls


async def test_the_docs_are_not_operations_of_the_api(app: Any) -> None:
    async with _anonymous(app) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]


@pytest.mark.parametrize(("page", "root_path"), [("/docs", ""), ("/redoc", ""), ("/docs", "/connectors-api")])
async def test_docs_pages_cannot_be_framed_and_run_only_their_own_scripts(
    app: Any, page: str, root_path: str
) -> None:
    async with _anonymous(app, root_path) as client:
        response = await client.get(page)
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "same-origin"
    # Scripts: the service's own files, and each inline script of this very page by its hash.
    allowed = policy["script-src"].split()
    assert "'unsafe-inline'" not in allowed and "*" not in allowed
    inline = _scripts(response.text)
    expected = {
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in inline
    }
    assert set(allowed) == {"'self'", *expected}
    assert len(expected) == (1 if page == "/docs" else 0)
