"""The path rule of ``/authorize``: every form a resource server could make of a path is judged.

Each refused form is listed with its plain counterpart: the plain form was always refused, and
the test holds that what decodes or normalises (NFKC) to it is refused as well.
"""

from __future__ import annotations

import httpx
import pytest

from app.core.urls import URLRuleError, join_resource_path
from tests.connectors import payloads
from tests.connectors.test_authorize import authorize
from tests.connectors.test_crud import NO_CHECK, assert_problem

BASE = "https://api.example.com/base"

FORMS_OF_REFUSED_PATHS = [
    # Characters NFKC maps to ".", "/", "\", ":", "@", ";" or "%".
    pytest.param("/a/\uff0e\uff0e/x", "/a/../x", id="fullwidth-full-stop"),
    pytest.param("/a/\u2024\u2024/x", "/a/../x", id="one-dot-leader"),
    pytest.param("/a/\u2025/x", "/a/../x", id="two-dot-leader"),
    pytest.param("/a/\ufe30/x", "/a/../x", id="vertical-two-dot-leader"),
    pytest.param("/a/\ufe52\ufe52", "/a/..", id="small-full-stop"),
    pytest.param("/a/.\uff0e/x", "/a/../x", id="half-fullwidth-dots"),
    pytest.param("/a\uff0f..\uff0f..\uff0fx", "/a/../../x", id="fullwidth-solidus"),
    pytest.param("\uff0f\uff0fevil.example.com", "//evil.example.com", id="fullwidth-network-path"),
    pytest.param("/\uff0fevil.example.com", "//evil.example.com", id="half-fullwidth-network-path"),
    pytest.param("\ufe68\ufe68evil.example.com", "\\\\evil.example.com", id="small-reverse-solidus"),
    pytest.param("/a\uff3cb", "/a\\b", id="fullwidth-reverse-solidus"),
    pytest.param(
        "\uff48\uff54\uff54\uff50\uff53\uff1a\uff0f\uff0fevil.example.com",
        "https://evil.example.com",
        id="fullwidth-absolute-url",
    ),
    pytest.param("evil.example.com\ufe55x", "evil.example.com:x", id="small-colon"),
    pytest.param("\uff20evil.example.com", "@evil.example.com", id="fullwidth-at"),
    pytest.param("/a/\uff0e\uff0e\uff1bx/b", "/a/..;x/b", id="fullwidth-semicolon"),
    pytest.param("/a/..\u037ex/b", "/a/..;x/b", id="greek-question-mark"),
    pytest.param("/\uff05\uff12\uff45\uff05\uff12\uff45/x", "/%2e%2e/x", id="fullwidth-percent"),
    pytest.param("/\ufe6a2e\ufe6a2e/x", "/%2e%2e/x", id="small-percent"),
    # Their UTF-8 escapes, which a server decodes and then normalises.
    pytest.param("/a/%EF%BC%8E%EF%BC%8E/x", "/a/../x", id="escaped-fullwidth-full-stop"),
    pytest.param("/a/%E2%80%A5/x", "/a/../x", id="escaped-two-dot-leader"),
    pytest.param("/a%EF%BC%8F..%EF%BC%8F..%EF%BC%8Fx", "/a/../../x", id="escaped-fullwidth-solidus"),
    pytest.param("/a%EF%BC%BCb", "/a\\b", id="escaped-fullwidth-reverse-solidus"),
    # Double (and deeper) percent-encoding.
    pytest.param("/%252e%252e%252fx", "/%2e%2e%2fx", id="double-encoded-dots-and-slash"),
    pytest.param("/%25%32%65%25%32%65/x", "/%2e%2e/x", id="double-encoded-digits"),
    pytest.param("/%%32%65%%32%65/x", "/%2e%2e/x", id="half-encoded-escape"),
    pytest.param("/%25252e%25252e/x", "/%2e%2e/x", id="triple-encoded-dots"),
    pytest.param("/a%252fb", "/a%2fb", id="double-encoded-slash"),
    pytest.param("/a%255cb", "/a%5cb", id="double-encoded-backslash"),
    pytest.param("/" + "%25" * 20 + "2e", "/%2e", id="encoded-too-many-times"),
    # Other encodings lenient servers decode.
    pytest.param("/%u002e%u002e/x", "/../x", id="u-escape-dots"),
    pytest.param("/..%u002fx", "/..%2fx", id="u-escape-slash"),
    pytest.param("/%c0%ae%c0%ae/x", "/../x", id="overlong-2-byte-dots"),
    pytest.param("/%e0%80%ae%e0%80%ae/x", "/../x", id="overlong-3-byte-dots"),
    pytest.param("/a%c0%afb", "/a%2fb", id="overlong-slash"),
    # Dot segments a server sees once it decodes, cuts parameters or trims trailing spaces.
    pytest.param("/a/..%20/b", "/a/../b", id="dots-and-encoded-space"),
    pytest.param("/a/..%3bx/b", "/a/..;x/b", id="dots-and-encoded-semicolon"),
    pytest.param("/a/..%3f/b", "/a/..", id="dots-and-encoded-question-mark"),
    pytest.param("/a/..%23", "/a/..", id="dots-and-encoded-number-sign"),
    # Control characters: a header break, or a truncation, to a server that decodes them.
    pytest.param("/x%0d%0aHost:%20evil", "/x\r\nHost: evil", id="encoded-crlf"),
    pytest.param("/x%0ay", "/x\ny", id="encoded-lf"),
    pytest.param("/x%00.json", "/x\x00.json", id="encoded-nul"),
    pytest.param("/x%09y", "/x\ty", id="encoded-tab"),
    pytest.param("/x%7fy", "/x\x7fy", id="encoded-del"),
    pytest.param("/x%C2%85y", "/x\x85y", id="encoded-next-line"),
    pytest.param("/x%E2%80%A8y", "/x\u2028y", id="encoded-line-separator"),
    pytest.param("/x%250d%250a", "/x\r\n", id="double-encoded-crlf"),
    pytest.param("/x%2500", "/x\x00", id="double-encoded-nul"),
    pytest.param("/x%2509y", "/x\ty", id="double-encoded-tab"),
    pytest.param("/x%257fy", "/x\x7fy", id="double-encoded-del"),
    pytest.param("/x%25%30%64", "/x\r", id="double-encoded-cr-digits"),
    pytest.param("/x%u000d%u000a", "/x\r\n", id="u-escape-crlf"),
    pytest.param("/x%c0%8a", "/x\n", id="overlong-lf"),
    pytest.param("/x\uff05\uff10\uff44\uff05\uff10\uff41", "/x\r\n", id="fullwidth-escaped-crlf"),
    # The query is not a path, but a header break there is one all the same.
    pytest.param("/x?q=%0d%0aSet-Cookie:%20a=b", "/x?q=\r\nSet-Cookie: a=b", id="query-encoded-crlf"),
    pytest.param("?q=%00", "?q=\x00", id="query-encoded-nul"),
    pytest.param("?q=%09", "?q=\t", id="query-encoded-tab"),
    pytest.param("?q=%7f", "?q=\x7f", id="query-encoded-del"),
    pytest.param("?q=%250d%250a", "?q=\r\n", id="query-double-encoded-crlf"),
    pytest.param("?q=%2500", "?q=\x00", id="query-double-encoded-nul"),
    pytest.param("?q=%u000a", "?q=\n", id="query-u-escape-lf"),
    pytest.param("?q=%c0%8a", "?q=\n", id="query-overlong-lf"),
    pytest.param("?q=\uff05\uff10\uff41", "?q=\n", id="query-fullwidth-escaped-lf"),
    pytest.param("?q=%EF%BC%85%EF%BC%90%EF%BD%81", "?q=\n", id="query-escaped-fullwidth-escaped-lf"),
]

ALLOWED_PATHS = [
    ("/café", f"{BASE}/café"),
    ("/cafe\u0301", f"{BASE}/cafe\u0301"),
    ("/東京/ﾃｽﾄ", f"{BASE}/東京/ﾃｽﾄ"),
    ("/ﬁles/report\uff0epdf", f"{BASE}/ﬁles/report\uff0epdf"),
    ("/v1/%E2%82%AC", f"{BASE}/v1/%E2%82%AC"),
    ("/a%20b", f"{BASE}/a%20b"),
    ("/a%2Bb", f"{BASE}/a%2Bb"),
    ("/a%2541", f"{BASE}/a%2541"),
    ("/discount/100%", f"{BASE}/discount/100%"),
    ("/%C1lvaro", f"{BASE}/%C1lvaro"),
    ("/v1.2/x..y/...z", f"{BASE}/v1.2/x..y/...z"),
    ("/urn%3Aisbn%3A1", f"{BASE}/urn%3Aisbn%3A1"),
    ("/tags/%23python", f"{BASE}/tags/%23python"),
    ("?q=a%2Fb", f"{BASE}?q=a%2Fb"),
    ("?next=../../admin", f"{BASE}?next=../../admin"),
    ("?q=%2e%2e%2f%5c", f"{BASE}?q=%2e%2e%2f%5c"),
    ("?q=%E9t%E9&r=%25", f"{BASE}?q=%E9t%E9&r=%25"),
    ("/東京?q=%E2%82%AC", f"{BASE}/東京?q=%E2%82%AC"),
]


@pytest.mark.parametrize(("form", "plain"), FORMS_OF_REFUSED_PATHS)
def test_a_form_of_a_refused_path_is_refused_too(form: str, plain: str) -> None:
    with pytest.raises(URLRuleError):
        join_resource_path(BASE, plain)
    with pytest.raises(URLRuleError):
        join_resource_path(BASE, form)


@pytest.mark.parametrize(("path", "url"), ALLOWED_PATHS)
def test_paths_that_stay_under_the_base_path_pass_unchanged(path: str, url: str) -> None:
    assert join_resource_path(BASE, path) == url


def test_a_path_is_judged_up_to_a_bounded_length_once_normalised() -> None:
    # U+FDFA is 18 characters under NFKC.
    assert join_resource_path(BASE, "/" + "\ufdfa" * 200) == f"{BASE}/" + "\ufdfa" * 200
    with pytest.raises(URLRuleError):
        join_resource_path(BASE, "/" + "\ufdfa" * 300)


def test_the_refusal_names_the_rule_not_the_path() -> None:
    with pytest.raises(URLRuleError) as refused:
        join_resource_path(BASE, "/CANARY/%252e%252e/x")
    assert "CANARY" not in str(refused.value)


async def test_authorize_refuses_encoded_and_lookalike_forms(client: httpx.AsyncClient) -> None:
    created = await client.post("/connectors", json=payloads.basic(), params=NO_CHECK)
    connector_id = created.json()["id"]
    for path in ("/a/\uff0e\uff0e/x", "/%252e%252e%252fadmin", "/x%0d%0aHost:%20evil", "?q=%250a"):
        problem = assert_problem(
            await authorize(client, connector_id, path=path), 422, "path_outside_resource_domain"
        )
        assert path not in repr(problem)
    allowed = await authorize(client, connector_id, path="/café/%E2%82%AC?q=a%2Fb&next=../x")
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["url"] == "https://api.example.com/café/%E2%82%AC?q=a%2Fb&next=../x"
