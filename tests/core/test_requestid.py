"""Request ids through the real app: a caller's well-formed ``X-Request-ID`` is kept, any other is
replaced, and the id is on every answer, in every problem body and in every log line of the
request, including lines of the tasks it started."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from app.core.context import request_id
from app.core.logs import JSONFormatter
from tests.connectors import payloads
from tests.core.test_logs import CapturedLog, debug_log  # noqa: F401
from tests.support.servers import Reply, ScriptedServer

ClientFor = Callable[..., httpx.AsyncClient]
GENERATED = re.compile(r"[0-9a-f]{32}")

WELL_FORMED = ["a", "A" * 128, "0f8b1c1e-5b7a-4a8d-9a67-1f0a3f0a2c11", "req.1_2:3-4", "0"]
MALFORMED = [
    b"",
    b"a" * 129,
    b"a b",
    b"a\r\nx-injected: 1",
    b"abc\n",
    b"a\tb",
    b"a\x00b",
    "caf\u00e9".encode(),
    b"a/b",
    b'"abc"',
    b"a,b",
    b"a;b",
]


async def raw_request(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    more_body: bool = False,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request straight through the ASGI interface, headers exactly as given (no client
    library in between to refuse or repair them). ``more_body``: ``body`` is only the start,
    and then the client goes away."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": more_body}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    assert start["type"] == "http.response.start"
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in messages[1:])


def _ids(headers: list[tuple[bytes, bytes]]) -> list[str]:
    return [value.decode() for name, value in headers if name.lower() == b"x-request-id"]


@pytest.mark.parametrize("value", WELL_FORMED)
async def test_a_well_formed_id_is_kept(app: Any, value: str) -> None:
    status, headers, _ = await raw_request(app, "GET", "/healthz", [(b"x-request-id", value.encode())])
    assert status == 200
    (first,) = _ids(headers)
    caller, _, own = first.rpartition(".")
    assert (caller, GENERATED.fullmatch(own) is not None) == (value, True)
    status, headers, body = await raw_request(app, "GET", "/nowhere", [(b"x-request-id", value.encode())])
    assert status == 404
    (second,) = _ids(headers)
    assert second.startswith(f"{value}.") and GENERATED.fullmatch(second.rpartition(".")[2])
    assert json.loads(body)["request_id"] == second
    # The same id sent twice (by one caller or by another copying it) names two requests.
    assert second != first


@pytest.mark.parametrize("value", MALFORMED, ids=repr)
async def test_a_malformed_id_is_replaced(app: Any, value: bytes) -> None:
    status, headers, body = await raw_request(app, "GET", "/nowhere", [(b"x-request-id", value)])
    assert status == 404
    (answered,) = _ids(headers)
    assert GENERATED.fullmatch(answered)
    assert json.loads(body)["request_id"] == answered
    assert not [name for name, _ in headers if name == b"x-injected"]


async def test_two_ids_are_replaced_by_one(app: Any) -> None:
    sent = [(b"x-request-id", b"first"), (b"x-request-id", b"second")]
    _, headers, _ = await raw_request(app, "GET", "/healthz", sent)
    (answered,) = _ids(headers)
    assert GENERATED.fullmatch(answered)


async def test_an_id_is_generated_for_each_request_without_one(app: Any) -> None:
    seen = []
    for _ in range(200):
        status, headers, _ = await raw_request(app, "GET", "/healthz", [])
        assert status == 200
        (answered,) = _ids(headers)
        assert GENERATED.fullmatch(answered)
        seen.append(answered)
    assert len(set(seen)) == len(seen)
    assert request_id.get() is None  # nothing outlives the request


async def test_every_answer_and_every_problem_names_the_id(
    app: Any, client_for: ClientFor, scripted_server: ScriptedServer
) -> None:
    async def boom(_request: Request) -> Response:
        raise RuntimeError("unexpected")

    app.router.add_route("/boom", boom)
    client = client_for()
    anonymous = client_for()
    anonymous.headers.pop("Authorization")
    basic = await client.post("/connectors", json=payloads.basic(), params={"validate": "false"})
    assert basic.status_code == 201
    connector = basic.json()["id"]
    missing = "00000000-0000-4000-8000-000000000000"
    cases: list[tuple[httpx.AsyncClient, str, str, dict[str, Any], int, str | None]] = [
        (anonymous, "GET", "/healthz", {}, 200, None),
        (client, "POST", f"/connectors/{connector}/authorize", {"json": {}}, 200, None),
        (anonymous, "POST", f"/connectors/{connector}/authorize", {"json": {}}, 401, "unauthenticated"),
        (anonymous, "GET", "/connectors", {}, 401, "unauthenticated"),
        (client, "GET", f"/connectors/{missing}", {}, 404, "connector_not_found"),
        (client, "POST", f"/connectors/{missing}/authorize", {"json": {}}, 404, "connector_not_found"),
        (client, "GET", "/nowhere", {}, 404, "not_found"),
        (client, "PUT", "/connectors", {}, 405, "method_not_allowed"),
        (client, "POST", "/connectors", {"content": b"{not json"}, 422, "invalid_request"),
        (client, "POST", f"/connectors/{connector}/authorize", {"json": {"path": 1}}, 422, "invalid_request"),
        (anonymous, "POST", "/connectors", {"content": b"x" * (64 * 1024 + 1)}, 413, "payload_too_large"),
        (client, "GET", "/boom", {}, 500, "internal_error"),
    ]
    for number, (caller, method, path, extra, status, code) in enumerate(cases):
        sent = f"case-{number}"
        response = await caller.request(method, path, headers={"X-Request-ID": sent}, **extra)
        assert response.status_code == status, (path, response.text)
        (paired,) = response.headers.get_list("x-request-id")
        assert paired.startswith(f"{sent}.") and GENERATED.fullmatch(paired.rpartition(".")[2]), path
        if code is not None:
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == code
            assert response.json()["request_id"] == paired, path
        # Without one of its own, the caller gets a generated id, in the header and the body alike.
        generated = await caller.request(method, path, **extra)
        (answered,) = generated.headers.get_list("x-request-id")
        assert GENERATED.fullmatch(answered)
        if code is not None:
            assert generated.json()["request_id"] == answered


def _during(log: CapturedLog, before: int) -> list[dict[str, Any]]:
    return log.lines()[before:]


async def test_every_log_line_of_a_request_names_it(
    debug_log: CapturedLog,  # noqa: F811
    app: Any,
    client_for: ClientFor,
    scripted_server: ScriptedServer,
) -> None:
    async def boom(_request: Request) -> Response:
        logging.getLogger("tests.requestid").info("about to fail")
        raise RuntimeError("unexpected")

    app.router.add_route("/boom", boom)
    client = client_for()
    scripted_server.set_default(Reply.json({"error": "invalid_client"}, status=401))
    body = payloads.client_credentials(token_url=scripted_server.url("/oauth/token"))
    created = await client.post("/connectors", json=body, params={"validate": "false"})
    assert created.status_code == 201

    # The token request runs in a task of its own; its line names the request that started it.
    before = len(debug_log.lines())
    answer = await client.post(
        f"/connectors/{created.json()['id']}/authorize", json={}, headers={"X-Request-ID": "authorize-1"}
    )
    assert answer.status_code == 502
    lines = _during(debug_log, before)
    loggers = {line["logger"] for line in lines}
    assert {"connectors.access", "app.tokens.cache"} <= loggers, lines
    assert [line for line in lines if line.get("request_id") != answer.headers["x-request-id"]] == []
    assert answer.headers["x-request-id"].startswith("authorize-1.")

    before = len(debug_log.lines())
    failed = await client.get("/boom")
    lines = _during(debug_log, before)
    assert {"tests.requestid", "app.core.http", "connectors.access"} <= {line["logger"] for line in lines}
    assert {line.get("request_id") for line in lines} == {failed.headers["x-request-id"]}

    # Outside a request, a line names none.
    logging.getLogger("tests.requestid").info("between requests")
    assert "request_id" not in debug_log.lines()[-1]


def test_the_formatter_names_the_current_request_only() -> None:
    record = logging.LogRecord("any.logger", logging.INFO, __file__, 1, "a line", None, None)
    assert "request_id" not in json.loads(JSONFormatter().format(record))
    token = request_id.set("req-7")
    try:
        assert json.loads(JSONFormatter().format(record))["request_id"] == "req-7"
    finally:
        request_id.reset(token)
    assert "request_id" not in json.loads(JSONFormatter().format(record))
