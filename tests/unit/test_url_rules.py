"""URL rules without the app: the resource domain URL a create body may carry, and the paths
``/authorize`` joins onto it (``app.core.urls``). ``tests/connectors`` holds a few of each
through the real app, on both databases."""

from __future__ import annotations

import json

import pytest

from app.connectors.schemas import AuthorizeRequest, ConnectorCreate
from app.core.urls import URLRuleError, join_resource_path
from tests.connectors import payloads
from tests.unit.refusals import fields, refusal


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.com",
        "https://user:pw@api.example.com",
        "https://api.example.com/?q=1",
        "https://api.example.com/#frag",
        "https://api.example.com/a/../b",
        "ftp://api.example.com",
        "https://",
        "https://api example.com",
        "https://api.example.com:0",
        "https://api.example.com:99999",
    ],
)
def test_bad_resource_domain_urls_are_refused(url: str) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = url
    assert fields(refusal(ConnectorCreate, body)) == ["resource_domain_url"]


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://faß.de/x", "https://xn--fa-hia.de/x"),
        ("https://Bu\u0308cher.example", "https://xn--bcher-kva.example"),
        ("https://xn--fa-hia.de", "https://xn--fa-hia.de"),
    ],
)
def test_international_hosts_are_stored_as_clients_would_encode_them(url: str, stored: str) -> None:
    body = payloads.basic()
    body["resource_domain_url"] = url
    assert ConnectorCreate.model_validate(body).resource_domain_url == stored


def _stored(resource_domain_url: str) -> str:
    """The resource domain URL of a connector created with this one."""
    body = payloads.basic()
    body["resource_domain_url"] = resource_domain_url
    return ConnectorCreate.model_validate(body).resource_domain_url


def _sent(path: str) -> str:
    """The path of an ``/authorize`` body, which takes it as it is: the path is judged when it is
    joined onto the stored URL (a ``URLRuleError`` is the 422 ``path_outside_resource_domain``)."""
    sent = AuthorizeRequest.model_validate_json(json.dumps({"path": path})).path
    assert sent == path
    return sent


@pytest.mark.parametrize(
    "path",
    [
        "https://evil.example.com/x",
        "//evil.example.com/x",
        "\\\\evil.example.com",
        "/..",
        "/a/../../x",
        "/%2e%2e/x",
        "/a%2fb",
        "/x\r\nHost: evil",
        "@evil.example.com",
        "/x#frag",
        "http:/x",
        "/..;/admin",
        "/a/.;x/b",
        "/x\u00a0y",
        "/x\u2028y",
        "/\ufeffx",
    ],
)
def test_paths_leaving_the_resource_domain_are_refused(path: str) -> None:
    base_url, sent = _stored(payloads.basic()["resource_domain_url"]), _sent(path)
    with pytest.raises(URLRuleError):
        join_resource_path(base_url, sent)


@pytest.mark.parametrize(
    ("path", "url"),
    [
        ("/", "https://api.example.com/base/"),
        ("", "https://api.example.com/base"),
        ("?q=1", "https://api.example.com/base?q=1"),
        ("items/7", "https://api.example.com/base/items/7"),
        ("//", None),
    ],
)
def test_paths_join_as_an_http_client_would(path: str, url: str | None) -> None:
    base_url, sent = _stored("https://api.example.com/base"), _sent(path)
    if url is None:
        with pytest.raises(URLRuleError):
            join_resource_path(base_url, sent)
    else:
        assert join_resource_path(base_url, sent) == url
