"""The interactive API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served offline.

FastAPI's own pages load their scripts, styles and favicon from public CDNs, and ReDoc's its
fonts from Google: without internet access they stay blank, and with it every visit tells those
hosts who reads the docs. Here every asset comes from the service itself, taken from the installed
``fastapi_offline`` package's static files, and the pages name no other origin (Swagger UI's
online validator, which would send the document's URL away, is off).

Both pages are sent with a ``Content-Security-Policy`` that allows scripts only from the service
and the page's own inline script (by its hash, computed per page, as its URLs depend on the
prefix the app is served under), and ``frame-ancestors 'none'``: no other site can frame the docs
and have a visitor click in them. Styles may be inline (both UIs write them as they render).

Assets live under ``/docs/assets/<package version>/<file>``: a new package version is a new URL,
so an asset never changes under its URL and browsers may keep it for a year without asking again.
Each also has an ``ETag`` (a hash of its bytes) for a conditional request. The files are read
once per process, on their first request. Like ``/openapi.json``, nothing here needs a caller
token.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.resources
import re
from dataclasses import dataclass
from typing import Final

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException

__all__ = ["ASSETS", "ASSETS_VERSION", "install_docs"]

_PACKAGE: Final = "fastapi_offline"
ASSETS_VERSION: Final = importlib.metadata.version(_PACKAGE)
# The files served, by name, with their media types (Starlette adds the charset to text types).
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_IMMUTABLE: Final = "public, max-age=31536000, immutable"


# The contents of inline scripts (no src attribute): each one allowed by its hash.
_INLINE_SCRIPT: Final = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _protected(page: HTMLResponse) -> HTMLResponse:
    """``page`` with its security headers: a CSP allowing its own inline scripts by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page.body)
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    page.headers["X-Frame-Options"] = "DENY"
    page.headers["Referrer-Policy"] = "same-origin"
    page.headers["X-Content-Type-Options"] = "nosniff"
    page.headers["Cache-Control"] = "no-cache"
    return page


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    etag: str


@functools.cache
def _asset(name: str) -> _Asset:
    body = importlib.resources.files(_PACKAGE).joinpath("static", name).read_bytes()
    return _Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def install_docs(app: FastAPI, *, path: str = "/docs", redoc_path: str = "/redoc") -> None:
    """Serve the two pages and their assets; create the app with ``docs_url=None, redoc_url=None``."""
    assets = f"{path}/assets/{ASSETS_VERSION}"

    def urls(request: Request) -> tuple[str, str]:
        # Behind a proxy that serves the app under a prefix, the pages name the prefixed paths.
        root = request.scope.get("root_path", "")
        return f"{root}{app.openapi_url}", f"{root}{assets}"

    @app.get(path, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, base = urls(request)
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}/swagger-ui.css",
            swagger_favicon_url=f"{base}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={
                **(app.swagger_ui_parameters or {}),
                # The caller token given to Authorize survives a reload of the page.
                "persistAuthorization": True,
                "validatorUrl": None,
            },
        )
        return _protected(page)

    @app.get(redoc_path, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, base = urls(request)
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}/redoc.standalone.js",
            redoc_favicon_url=f"{base}/favicon.png",
            with_google_fonts=False,
        )
        return _protected(page)

    @app.get(f"{path}/assets/{{version}}/{{name}}", include_in_schema=False)
    async def asset(version: str, name: str, request: Request) -> Response:
        media_type = ASSETS.get(name)
        if version != ASSETS_VERSION or media_type is None:
            raise HTTPException(404)
        found = _asset(name)
        headers = {"Cache-Control": _IMMUTABLE, "ETag": found.etag, "X-Content-Type-Options": "nosniff"}
        asked = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
        if asked & {found.etag, f"W/{found.etag}", "*"}:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type=media_type, headers=headers)
