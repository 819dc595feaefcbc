"""The document's patterns say what the validators decide.

Each pattern only accepts what its validator accepts (values drawn from the pattern pass), and
refuses what the validator refuses, for the refusals a pattern can state. The Unicode classes are
compared with ``unicodedata`` over every code point.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.connectors.fields import RESERVED_TOKEN_PARAM
from app.connectors.schemas import _name
from app.core import patterns
from app.core.urls import URLRuleError, normalise_base_url, normalise_endpoint_url
from app.tokens.oauth import RESERVED_TOKEN_PARAMS, token_param_key

_DRAWS = settings(max_examples=200, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
_URL_DRAWS = settings(_DRAWS, max_examples=60)
_EVERY_CHARACTER = "".join(chr(code) for code in range(sys.maxunicode + 1) if not 0xD800 <= code <= 0xDFFF)


def _accepts(rule: Callable[[str], object], value: str) -> bool:
    try:
        rule(value)
    except (ValueError, URLRuleError):
        return False
    return True


def _matches(pattern: str, value: str) -> bool:
    return re.search(pattern, value) is not None


def _class_members(character_class: str) -> str:
    return "".join(re.findall(character_class, _EVERY_CHARACTER))


def test_the_unicode_data_is_the_one_the_classes_were_written_from() -> None:
    # A newer Python may assign new characters; then the ranges in app.core.patterns need
    # looking at again (this test and the next say which).
    assert unicodedata.unidata_version == "14.0.0"


def test_character_classes_match_the_validators_categories() -> None:
    categories = [unicodedata.category(c) for c in _EVERY_CHARACTER]

    def every(keep: Callable[[str, str], bool]) -> str:
        return "".join(
            c for c, category in zip(_EVERY_CHARACTER, categories, strict=True) if keep(c, category)
        )

    hidden = ("Cc", "Cf", "Zl", "Zp")
    assert _class_members(patterns._NAME_INNER) == every(lambda c, category: category not in hidden)
    assert _class_members(patterns._NAME_EDGE) == every(
        lambda c, category: category not in hidden and not c.isspace()
    )
    assert _class_members(f"[{patterns._WS}]") == every(lambda c, category: c.isspace())
    path_class = patterns.AUTHORIZE_PATH[1:-2]  # "^[...]*$" without its anchors and repetition
    assert _class_members(path_class) == every(
        lambda c, category: category not in (*hidden, "Zs") and c not in "\\#"
    )


@_DRAWS
@given(st.from_regex(patterns.NAME, fullmatch=True))
def test_a_name_the_pattern_takes_is_taken(name: str) -> None:
    assert _accepts(_name, name), ascii(name)


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("Contact Center Connector", True),
        ("  padded\t", True),
        ("\u3000Ünïcödé \U0001f600\u3000", True),
        ("x" * 100, True),
        (" " + "x" * 100 + "\n", True),
        ("x" * 101, False),
        ("", False),
        (" \t\u2028 ", False),
        ("a\u200bb", False),
        ("a\nb", False),
        ("a\u202eb", False),
        ("tag\U000e0041", False),
    ],
)
def test_names_refused_by_the_validator_are_refused_by_the_pattern(name: str, taken: bool) -> None:
    assert _accepts(_name, name) is taken
    assert _matches(patterns.NAME, name) is taken


@_URL_DRAWS
@given(st.from_regex(patterns.BASE_URL, fullmatch=True))
def test_a_resource_domain_url_the_pattern_takes_is_taken(url: str) -> None:
    if len(url.split("//", 1)[1].split("/", 1)[0].split(":", 1)[0]) > 253:
        return  # a host name over 253 characters: the README lists it
    assert _accepts(normalise_base_url, url), url


@_URL_DRAWS
@given(st.from_regex(patterns.ENDPOINT_URL, fullmatch=True))
def test_a_token_or_validation_url_the_pattern_takes_is_taken(url: str) -> None:
    if len(url.split("//", 1)[1].split("/", 1)[0].split("?", 1)[0].split(":", 1)[0]) > 253:
        return
    assert _accepts(normalise_endpoint_url, url), url


URLS = [
    ("https://api.example.com", True, True),
    ("https://API.Example.com:8443/base/v1/", True, True),
    ("https://10.0.0.1", True, True),
    ("https://localhost./x", True, True),
    ("https://api.example.com/a%20b/c~d/e.f/..x/.%2ex/%41", True, True),
    ("https://idp.example.com/token?tenant=a&x=%2F..", False, True),
    ("https://api.example.com/a/../b", False, False),
    ("https://api.example.com/a/./b", False, False),
    ("https://api.example.com/%2e%2E/b", False, False),
    ("https://api.example.com/a%2fb", False, False),
    ("https://api.example.com/a%5Cb", False, False),
    ("https://api.example.com/a b", False, False),
    ("https://api.example.com/a\\b", False, False),
    ("https://user:pw@api.example.com", False, False),
    ("https://api.example.com#frag", False, False),
    ("https://api.example.com:0", False, False),
    ("https://api.example.com:65536", False, False),
    ("https://-bad.example.com", False, False),
    ("https://example.123", False, False),
    ("https://1.2.3.256", False, False),
    ("http://api.example.com", False, False),
    ("https://", False, False),
]


@pytest.mark.parametrize(("url", "base", "endpoint"), URLS)
def test_urls_as_the_validators_and_the_patterns_judge_them(url: str, base: bool, endpoint: bool) -> None:
    assert _accepts(normalise_base_url, url) is base
    assert _matches(patterns.BASE_URL, url) is base
    assert _accepts(normalise_endpoint_url, url) is endpoint
    assert _matches(patterns.ENDPOINT_URL, url) is endpoint


@_DRAWS
@given(st.from_regex(patterns.TOKEN_PARAM_NAME, fullmatch=True))
def test_reserved_token_parameter_names_are_what_the_pattern_says(name: str) -> None:
    assert _matches(RESERVED_TOKEN_PARAM, name) is (token_param_key(name) in RESERVED_TOKEN_PARAMS)


@pytest.mark.parametrize("name", sorted(RESERVED_TOKEN_PARAMS))
def test_every_reserved_name_is_in_the_pattern_in_any_case(name: str) -> None:
    for spelling in (name, name.upper(), name.replace("_", "."), name.title().replace("_", "-")):
        assert _matches(RESERVED_TOKEN_PARAM, spelling), spelling
    assert not _matches(RESERVED_TOKEN_PARAM, name + "x")


def test_the_no_control_patterns() -> None:
    assert _matches(patterns.NO_CONTROL, "svc user:1 é")
    assert not _matches(patterns.NO_CONTROL, "a\x85b")
    assert _matches(patterns.BASIC_USERNAME, "svc user")
    assert not _matches(patterns.BASIC_USERNAME, "svc:user")
    assert _matches(patterns.SECRET, "s3cret \x01")
    assert not _matches(patterns.SECRET, "a\x00b")
