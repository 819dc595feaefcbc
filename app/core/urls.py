"""URL rules: normalising the URLs a connector stores, and joining a request path onto its domain.

Stored URLs are ``https`` only, with a lower-case IDNA host, no default port, no userinfo and no
fragment. The resource domain URL also has no query, because ``/authorize`` appends the caller's
path and query to it. The join refuses every way a path could leave the resource domain.

A resource server may decode a path more than once, or normalise it (NFKC) before or after
decoding, so the path is judged in every form it can take that way, not only as sent: the rules
that refuse ``/..`` also refuse ``/%252e%252e``, two FULLWIDTH FULL STOPs (NFKC ``..``) and
their UTF-8 escapes ``/%EF%BC%8E%EF%BC%8E``; and no form of the path or the query may hold a
control character (``%0d%0a`` is a header break to a server that decodes it). A path that is
plain ASCII without ``%`` has no other form, so it pays for none of this.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import SplitResult, unquote, urlsplit

import idna

_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f]")
# What a decoded or normalised form may not hold: a control character or a line separator. A
# space may appear there: it was sent as %20.
_DECODED_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Dot, slash and backslash percent-encoded (also in the %uXXXX form some servers decode).
_ENCODED_STEP = re.compile(r"%(?:2e|2f|5c|u002e|u002f|u005c)", re.IGNORECASE)
# Overlong UTF-8 (%C0%AE is "." to a lenient decoder); no valid UTF-8 starts this way.
_OVERLONG = re.compile(r"%(?:c[01]%[89ab][0-9a-f]|e0%[89][0-9a-f]|f0%8[0-9a-f])", re.IGNORECASE)
_ESCAPE_RUN = re.compile(r"%u([0-9a-fA-F]{4})|((?:%[0-9a-fA-F]{2})+)")
_SEGMENT_END = re.compile(r"[;?#]")
# A "%" that does not start the escape of a printable ASCII character other than "%" itself.
_DEEP_ESCAPE = re.compile(r"%(?![2-6][0-9a-fA-F]|7[0-9a-eA-E])|%25")
_ASCII_ESCAPE = re.compile(r"%[0-7][0-9a-fA-F]")
_ASCII_BY_ESCAPE = {
    f"%{high}{low}": chr(code)
    for code in range(128)
    for high in {f"{code >> 4:x}", f"{code >> 4:X}"}
    for low in {f"{code & 15:x}", f"{code & 15:X}"}
}
# Forms of one path or query, beyond which it is refused as encoded too many times (a real path
# has two or three), and their length: NFKC makes some characters 18 long, which would only cost
# time to check.
_MAX_FORMS = 16
_MAX_FORM_LENGTH = 4096
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


def web_origin(url: str) -> str:
    """The origin of any ``http(s)`` URL as browsers compare them: ``scheme://host[:port]``, the
    scheme and host in lower case, the scheme's default port left out. ValueError for a URL
    without one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    shown = "" if port is None or port == {"https": 443, "http": 80}[scheme] else f":{port}"
    return f"{scheme}://{host}{shown}"


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _percent_decode(text: str) -> str:
    """One round of percent-decoding, as a lenient server does it: UTF-8, and ``%uXXXX`` too."""
    return _ESCAPE_RUN.sub(_decode_escape, text) if "%" in text else text


def _decode_escape(match: re.Match[str]) -> str:
    if match.group(1):
        return chr(int(match.group(1), 16))
    return bytes.fromhex(match.group(2).replace("%", "")).decode("utf-8", "replace")


def _ascii_escape(match: re.Match[str]) -> str:
    return _ASCII_BY_ESCAPE[match[0]]


def _other_forms(text: str) -> set[str]:
    """What ``text`` becomes under NFKC and percent-decoding, in any order, any number of times."""
    if text.isascii() and not _DEEP_ESCAPE.search(text):
        # The common case: one decoding gives printable ASCII without "%", which stays as it is.
        decoded = _ASCII_ESCAPE.sub(_ascii_escape, text)
        return {decoded} if decoded != text else set()
    seen = {text}
    pending = [text]
    while pending:
        form = pending.pop()
        normalised = form if form.isascii() else unicodedata.normalize("NFKC", form)
        for other in (normalised, _percent_decode(form)):
            if other not in seen:
                if len(seen) >= _MAX_FORMS:
                    raise URLRuleError("the path is encoded too many times")
                if len(other) > _MAX_FORM_LENGTH:
                    raise URLRuleError(
                        f"the path is longer than {_MAX_FORM_LENGTH} characters once normalised"
                    )
                seen.add(other)
                pending.append(other)
    seen.discard(text)
    return seen


def _check_relative_path(path: str) -> None:
    """The rules for the path part (no query), applied to the path as sent and to its other forms."""
    if "\\" in path:
        raise URLRuleError("the path may not contain backslashes")
    first = path.split("/", 1)[0]
    if path.startswith("//") or "://" in path or ":" in first:
        raise URLRuleError("the path must be relative to the resource domain")
    if "@" in first:
        raise URLRuleError("the path may not contain userinfo")
    if "%" in path and (_ENCODED_STEP.search(path) or _OVERLONG.search(path)):
        raise URLRuleError("the path may not contain encoded dots, slashes or backslashes")
    if "." in path:
        for segment in path.split("/"):
            # "..;x" is a dot segment to servers that strip path parameters (Tomcat, Jetty), and
            # ".. " or "..." one to servers that trim trailing dots and spaces (Windows).
            name = _SEGMENT_END.split(segment, 1)[0] if "." in segment else ""
            if name and not name.strip(". "):
                raise URLRuleError("the path may not contain dot segments")


def _check_other_forms(path: str, query: str) -> None:
    if "%" in path or not path.isascii():
        for form in _other_forms(path):
            if _DECODED_CONTROL.search(form):
                raise URLRuleError("the path may not contain control characters, encoded or not")
            _check_relative_path(form)
    # A query whose escapes all stand for printable ASCII has no other form that matters here.
    if not query.isascii() or _DEEP_ESCAPE.search(query):
        for form in (query, *_other_forms(query)):
            if _DECODED_CONTROL.search(form):
                raise URLRuleError("the query may not contain control characters, encoded or not")
            if "%" in form and _OVERLONG.search(form):
                raise URLRuleError("the query may not contain overlong encodings")


def join_resource_path(base_url: str, path: str | None) -> str:
    """Join a caller's path (with optional query) onto a normalised resource domain URL.

    The result always stays under the base URL's origin and base path: the path is taken as
    relative to the base path, as the HTTP Request activity builds it, and anything that could
    make an HTTP client go elsewhere is refused rather than repaired. The query is not a path
    (``..`` there means nothing), but it may not carry a control character in any form either.
    """
    if not path:
        return base_url
    if len(path) > _MAX_URL or _CONTROL.search(path) or "\\" in path:
        raise URLRuleError("the path contains forbidden characters")
    plain = path.isascii()
    if not plain and any(unicodedata.category(c) in _INVISIBLE for c in path):
        raise URLRuleError("the path contains invisible or space characters")
    if "#" in path:
        raise URLRuleError("the path may not contain a fragment")
    raw_path, question, query = path.partition("?")
    _check_relative_path(raw_path)
    if not plain or "%" in path:
        _check_other_forms(raw_path, query)
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
