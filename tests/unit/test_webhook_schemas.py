"""Webhook subscription bodies and read models without the app (``app.webhooks.schemas``);
``tests/webhooks/test_api.py`` holds a few of each through the real app, on both databases."""

from __future__ import annotations

import re
from typing import Any

import pytest

from app.webhooks.schemas import EVENT_TYPES, Webhook, WebhookCreate, WebhookPatch, WebhookWithSecret
from app.webhooks.secrets import generate_secret
from tests.unit.refusals import fields, refusal

URL = "https://hooks.example.com/connectors"


def test_a_url_alone_subscribes_to_every_event_type_enabled() -> None:
    body = WebhookCreate.model_validate({"url": URL})
    assert (body.url, body.event_types, body.enabled) == (URL, [], True)


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://Hooks.Example.COM:443/in?source=x", "https://hooks.example.com/in?source=x"),
        ("https://faß.de/hooks", "https://xn--fa-hia.de/hooks"),
        ("https://127.0.0.1:8443/hooks", "https://127.0.0.1:8443/hooks"),
    ],
)
def test_urls_are_stored_normalised(url: str, stored: str) -> None:
    assert WebhookCreate.model_validate({"url": url}).url == stored


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/in",
        "https://user:pw@hooks.example.com/in",
        "https://hooks.example.com/in#frag",
        "https://hooks.example.com/a/../in",
        "ftp://hooks.example.com",
        "https://",
        "https://hooks example.com",
        "https://hooks.example.com:99999",
        "hooks.example.com/in",
        "https://hooks.example.com/" + "a" * 2048,
    ],
)
def test_malformed_and_plain_http_urls_are_refused(url: str) -> None:
    assert fields(refusal(WebhookCreate, {"url": url})) == ["url"]
    assert fields(refusal(WebhookPatch, {"url": url})) == ["url"]


def test_the_documented_url_pattern_agrees_with_the_rule() -> None:
    pattern = WebhookCreate.model_json_schema()["properties"]["url"]["pattern"]
    assert re.search(pattern, URL)
    assert not re.search(pattern, "http://hooks.example.com/in")
    assert not re.search(pattern, "https://user@hooks.example.com/in")


@pytest.mark.parametrize(
    ("event_types", "field"),
    [
        (["connector.created", "connector.created"], "event_types"),
        (["connector.renamed"], "event_types.0"),
        (["connector.created", "Connector.Updated"], "event_types.1"),
        ("connector.created", "event_types"),
        ([None], "event_types.0"),
    ],
)
def test_unknown_and_repeated_event_types_are_refused(event_types: Any, field: str) -> None:
    assert fields(refusal(WebhookCreate, {"url": URL, "event_types": event_types})) == [field]
    assert fields(refusal(WebhookPatch, {"event_types": event_types})) == [field]


def test_every_event_type_may_be_named() -> None:
    body = WebhookCreate.model_validate({"url": URL, "event_types": list(EVENT_TYPES)})
    assert body.event_types == list(EVENT_TYPES)


@pytest.mark.parametrize("enabled", ["true", 1, 0, "false", None])
def test_enabled_is_a_json_boolean(enabled: Any) -> None:
    assert fields(refusal(WebhookCreate, {"url": URL, "enabled": enabled})) == ["enabled"]


def test_unknown_fields_and_a_missing_url_are_refused() -> None:
    assert fields(refusal(WebhookCreate, {"url": URL, "secret": "whsec_x"})) == ["*"]
    assert fields(refusal(WebhookCreate, {"event_types": []})) == ["url"]
    assert fields(refusal(WebhookPatch, {"state": "active"})) == ["*"]


def test_a_patch_sends_what_it_changes_and_no_nulls() -> None:
    patch = WebhookPatch.model_validate({"enabled": True})
    assert patch.model_fields_set == {"enabled"}
    assert WebhookPatch.model_validate({"event_types": []}).event_types == []
    for name in ("url", "event_types", "enabled"):
        assert fields(refusal(WebhookPatch, {name: None})) == [name]
    properties = WebhookPatch.model_json_schema()["properties"]
    assert all("default" not in field and "anyOf" not in field for field in properties.values())


def test_the_read_model_has_no_place_for_a_secret_and_the_answer_hides_it_from_repr() -> None:
    assert not {name for name in Webhook.model_fields if "secret" in name} - {"previous_secret_expires_at"}
    secret = generate_secret().get_secret_value()
    answer = WebhookWithSecret(
        id="8d3c2b1a-6f4e-4d5c-9b8a-7e6f5d4c3b2a",
        url=URL,
        event_types=[],
        enabled=True,
        state="active",
        failing_since=None,
        previous_secret_expires_at=None,
        version=1,
        created_at="2026-11-30T09:00:00Z",
        updated_at="2026-11-30T09:00:00Z",
        secret=secret,
    )
    assert answer.model_dump()["secret"] == secret
    assert secret not in repr(answer) and secret not in str(answer)
    schema = WebhookWithSecret.model_json_schema()["properties"]["secret"]
    assert re.search(schema["pattern"], secret)
