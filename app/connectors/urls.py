"""URL rules: normalising the URLs a connector stores, and joining a request path onto its domain.

Stored URLs are ``https`` only, with a lower-case IDNA host, no default port, no userinfo and no
fragment. The resource domain URL also has no query, because ``/authorize`` appends the caller's
path and query to it. The join refuses every way a path could leave the resource domain.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import SplitResult, unquote, urlsplit

import idna

_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f]")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_URL = 2048
_INVISIBLE = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})


class URLRuleError(ValueError):
    """A URL breaks a rule; the message names the rule, never the URL."""


def _normalise_host(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise URLRuleError("the host is not a valid IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if host.isascii():
        ascii_host = host.lower()
    else:
        # IDNA 2008 with UTS 46 mapping, non-transitional, as httpx and browsers encode a name:
        # Python's own "idna" codec (IDNA 2003) turns faß.de into fass.de, another domain.
        # Invisible characters are refused rather than silently dropped.
        if any(unicodedata.category(c) in _INVISIBLE for c in host):
            raise URLRuleError("the host contains invisible characters")
        try:
            ascii_host = idna.encode(host, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError):
            raise URLRuleError("the host is not a valid domain name") from None
    ascii_host = ascii_host.rstrip(".")
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise URLRuleError("the host is not a valid domain name")
    if labels[-1].isdigit():
        raise URLRuleError("the host is not a valid domain name")
    return ascii_host


def _split(value: str) -> SplitResult:
    if len(value) > _MAX_URL:
        raise URLRuleError(f"a URL may have at most {_MAX_URL} characters")
    if _CONTROL.search(value) or "\\" in value:
        raise URLRuleError("a URL may not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise URLRuleError("not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise URLRuleError("the URL must start with https://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise URLRuleError("the URL may not contain a user name or password")
    if parts.fragment or value.endswith("#"):
        raise URLRuleError("the URL may not contain a fragment")
    if not parts.hostname:
        raise URLRuleError("the URL must name a host")
    if port == 0:
        raise URLRuleError("the port must be between 1 and 65535")
    return parts


def _netloc(parts: SplitResult) -> str:
    raw_host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    host = _normalise_host(raw_host.lower() if raw_host.startswith("[") else raw_host)
    port = parts.port
    return host if port in (None, 443) else f"{host}:{port}"


def _check_path(path: str) -> str:
    segments = path.split("/")
    for segment in segments:
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise URLRuleError("the path may not contain dot segments or encoded slashes")
    return path


def normalise_base_url(value: str) -> str:
    """Normalise a resource domain URL: ``https://host[:port][/base/path]``, no trailing slash."""
    parts = _split(value)
    if parts.query or value.endswith("?"):
        raise URLRuleError("the URL may not contain a query")
    path = _check_path(parts.path).rstrip("/")
    return f"https://{_netloc(parts)}{path}"


def normalise_endpoint_url(value: str) -> str:
    """Normalise a token or validation URL: like a base URL, but a query is allowed."""
    parts = _split(value)
    path = _check_path(parts.path) or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"https://{_netloc(parts)}{path}{query}"


def origin_of(url: str) -> str:
    """``https://host[:port]`` of a normalised URL."""
    parts = urlsplit(url)
    return f"https://{parts.netloc}"


def join_resource_path(base_url: str, path: str | None) -> str:
    """Join a caller's path (with optional query) onto a normalised resource domain URL.

    The result always stays under the base URL's origin and base path: the path is taken as
    relative to the base path, as the HTTP Request activity builds it, and anything that could
    make an HTTP client go elsewhere is refused rather than repaired.
    """
    if not path:
        return base_url
    if len(path) > _MAX_URL or _CONTROL.search(path) or "\\" in path:
        raise URLRuleError("the path contains forbidden characters")
    if not path.isascii() and any(unicodedata.category(c) in _INVISIBLE for c in path):
        raise URLRuleError("the path contains invisible or space characters")
    if "#" in path:
        raise URLRuleError("the path may not contain a fragment")
    raw_path, question, query = path.partition("?")
    if raw_path.startswith("//") or "://" in raw_path or ":" in raw_path.split("/", 1)[0]:
        raise URLRuleError("the path must be relative to the resource domain")
    if "%" in raw_path:
        lowered = raw_path.lower()
        if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "%00" in lowered:
            raise URLRuleError("the path may not contain encoded dots, slashes or NUL")
    if "@" in raw_path.split("/", 1)[0]:
        raise URLRuleError("the path may not contain userinfo")
    segments = raw_path.lstrip("/").split("/")
    # "..;x" is a dot segment to servers that strip path parameters (Tomcat, Jetty).
    if any(segment.split(";", 1)[0] in (".", "..") for segment in segments):
        raise URLRuleError("the path may not contain dot segments")
    # "/" is the base path itself with its slash; an empty path (a query alone) adds nothing.
    joined = base_url + "/" + raw_path.lstrip("/") if raw_path else base_url
    if question:
        joined += "?" + query
    # Belt and braces: whatever the rules above missed, the result must parse back to the origin.
    check = urlsplit(joined)
    base = urlsplit(base_url)
    if check.scheme != "https" or check.netloc != base.netloc or not check.path.startswith(base.path):
        raise URLRuleError("the path would leave the resource domain")
    return joined
