"""One organization cannot stop another: the real app, a DNS server of the test's own on loopback
that never answers organization B's names, and organization A's token server found by name.

The database plays no part in what is shown here, so it runs on SQLite only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import sqlite_settings
from tests.connectors import payloads
from tests.connectors.test_authorize import counter_tokens
from tests.support.dns import DNSServer
from tests.support.servers import ScriptedServer
from tests.support.tls import LocalCA

ClientFor = Callable[..., httpx.AsyncClient]
DARK = "dark.example.test"


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer({"idp.example.test": ["127.0.0.1"]}, silent=[DARK]) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, local_ca: LocalCA, dns_server: DNSServer) -> Settings:
    """The suite's settings on SQLite, resolving names with the test's DNS server."""
    return sqlite_settings(
        tmp_path,
        local_ca,
        outbound_timeout_seconds=3.0,
        max_connectors_per_org=20,
        dns_servers=(dns_server.address,),
        dns_timeout_seconds=1.0,
        # B asks again at once after each failure, so its lookups stay in flight all along.
        dns_negative_ttl_seconds=0,
        dns_max_lookups_per_organization=8,
    )


async def test_unanswered_names_of_one_organization_stop_nothing_of_another(
    client_for: ClientFor, scripted_server: ScriptedServer, dns_server: DNSServer
) -> None:
    a = client_for("org-a")
    b = client_for("org-b")
    # A's identity provider is found by name and gives 2 s tokens; each token request opens a new
    # connection (the server closes it), so each needs a name lookup.
    scripted_server.set_default(counter_tokens("a-token", expires_in=2))
    token_url = scripted_server.url("/oauth/token", host="idp.example.test")
    body = payloads.client_credentials(token_url=token_url)
    created = await a.post("/connectors?validate=false", json=body)
    assert created.status_code == 201, created.text
    a_id = created.json()["id"]

    # B: twenty connectors whose token URL hosts never answer. Saving them waits for no lookup
    # to succeed (a name that does not resolve now is not refused).
    bodies = [
        payloads.client_credentials(name=f"B {i}", token_url=f"https://h{i}.{DARK}/oauth/token")
        for i in range(20)
    ]
    saved = await asyncio.gather(*(b.post("/connectors?validate=false", json=body) for body in bodies))
    assert [r.status_code for r in saved] == [201] * 20
    b_ids = [r.json()["id"] for r in saved]

    stop = asyncio.Event()
    b_answers: list[httpx.Response] = []

    async def b_storm(connector_id: str) -> None:
        while not stop.is_set():
            b_answers.append(await b.post(f"/connectors/{connector_id}/authorize", json={}))
            # In process, an answer given at once never suspends: yield as a socket read would.
            await asyncio.sleep(0)

    storm = [asyncio.create_task(b_storm(connector_id)) for connector_id in b_ids]
    try:
        # Wait until B's lookups fill its cap at the DNS server.
        while sum(dns_server.asked(f"h{i}.{DARK}") for i in range(20)) < 8:
            await asyncio.sleep(0.01)
        a_answers = []
        for _ in range(60):
            a_answers.append(await a.post(f"/connectors/{a_id}/authorize", json={}))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*storm)

    failed = [r.text for r in a_answers if r.status_code != 200]
    assert not failed, failed
    # Three seconds of calls: the first token and renewals of it, all while B's lookups hung.
    assert scripted_server.count >= 2
    assert dns_server.asked("idp.example.test") >= 1
    # B's calls failed with the name's own error, naming B's own host and never A's.
    assert b_answers
    for answer in b_answers:
        problem = answer.json()
        assert answer.status_code == 502, problem
        assert problem["code"] == "name_not_resolved"
        assert DARK in problem["detail"]
        assert "idp.example.test" not in problem["detail"]
    assert sum(dns_server.asked(f"h{i}.{DARK}") for i in range(20)) >= 8

    # B's connectors say what is wrong with them, in their own status.
    status = (await b.get(f"/connectors/{b_ids[0]}")).json()["status"]
    for _ in range(200):
        if status["state"] == "unreachable":
            break
        await asyncio.sleep(0.01)
        status = (await b.get(f"/connectors/{b_ids[0]}")).json()["status"]
    assert status["state"] == "unreachable"
