"""Private keys are checked in full off the event loop, and only once a save passed everything
cheaper. The database plays no part: SQLite only (the module's own ``settings``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from app.connectors.kinds.client_auth import tls_client_auth
from app.core import keychecks
from app.core.config import Settings
from app.core.keychecks import KeyChecks, private_key_refusal
from tests.conftest import sqlite_settings
from tests.connectors.test_crud import assert_problem
from tests.connectors.test_private_key_jwt import signed
from tests.support.tls import LocalCA
from tests.tokens.test_private_key_jwt import pem_of

NO_CHECK = {"validate": "false"}


@pytest.fixture
def settings(tmp_path: Path, local_ca: LocalCA) -> Settings:
    return sqlite_settings(tmp_path, local_ca, max_connectors_per_org=1)


def damaged_rsa_pem() -> str:
    """An RSA key whose public part is sound but whose private numbers do not make a key: it
    passes every cheap check (type, size, PEM) and fails only the full one."""
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    broken = rsa.RSAPrivateNumbers(
        p=good.p,
        q=good.q,
        d=good.d,
        dmp1=good.dmp1 ^ 2,
        dmq1=good.dmq1,
        iqmp=good.iqmp,
        public_numbers=good.public_numbers,
    )
    return pem_of(broken.private_key(unsafe_skip_rsa_key_validation=True))


class CountingKeyChecks(KeyChecks):
    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    async def refusal(self, organization_id: str, pem: str) -> str | None:
        self.checked += 1
        return await super().refusal(organization_id, pem)


class GatedKeyChecks(KeyChecks):
    """Checks that wait for ``gate`` before running (as a long queue of them would)."""

    def __init__(self) -> None:
        super().__init__(per_organization=2)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def _run(self, pem: str) -> str | None:
        self.waiting += 1
        await self.gate.wait()
        return await super()._run(pem)


@pytest.fixture
def no_full_check_here(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Fails a test whose process (the event loop's) loads a private key with its numbers checked;
    the worker processes are started afresh and are not patched."""
    full_loads: list[bool] = []

    def watched(data: bytes, password: bytes | None = None, **options: Any) -> Any:
        if not options.get("unsafe_skip_rsa_key_validation"):
            full_loads.append(True)
        return load_pem_private_key(data, password, **options)

    monkeypatch.setattr(serialization, "load_pem_private_key", watched)
    monkeypatch.setattr(tls_client_auth, "load_pem_private_key", watched)
    # The worker's own function too: run in this process by mistake, it would be seen.
    monkeypatch.setattr(keychecks, "load_pem_private_key", watched)
    return full_loads


def test_a_key_whose_numbers_do_not_make_a_key_fails_the_full_check() -> None:
    assert private_key_refusal(damaged_rsa_pem().encode()) is not None
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert private_key_refusal(pem_of(good).encode()) is None


async def test_the_full_check_refuses_a_damaged_key_off_the_loop_and_saves_nothing(
    client: httpx.AsyncClient, app: Any, no_full_check_here: list[bool]
) -> None:
    counting = app.state.connectors.key_checks = CountingKeyChecks()
    body = signed("https://127.0.0.1:9/oauth/token", "client-1", damaged_rsa_pem())
    refused = assert_problem(
        await client.post("/connectors", json=body, params=NO_CHECK), 422, "invalid_request"
    )
    assert [error["field"] for error in refused["errors"]] == ["auth.private_key"]
    assert (await client.get("/connectors")).json()["items"] == []
    assert counting.checked == 1

    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = signed("https://127.0.0.1:9/oauth/token", "client-1", pem_of(good))
    created = await client.post("/connectors", json=body, params=NO_CHECK)
    assert created.status_code == 201, created.text
    assert counting.checked == 2
    # Neither save loaded a key with its numbers checked in this process.
    assert no_full_check_here == []


async def test_a_save_refused_for_cheaper_reasons_costs_no_full_check(
    client: httpx.AsyncClient, app: Any
) -> None:
    counting = app.state.connectors.key_checks = CountingKeyChecks()
    first = signed("https://127.0.0.1:9/oauth/token", "client-1", damaged_rsa_pem())
    first["auth"]["private_key"] = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert (await client.post("/connectors", json=first, params=NO_CHECK)).status_code == 201
    assert counting.checked == 1
    # At the organization's limit (1 here): refused before the key is checked.
    second = signed("https://127.0.0.1:9/oauth/token", "client-2", damaged_rsa_pem())
    assert_problem(
        await client.post("/connectors", json=second, params=NO_CHECK), 409, "connector_limit_reached"
    )
    # A body that fails a cheap rule: refused before as well.
    third = signed("https://127.0.0.1:9/oauth/token", "client-3", damaged_rsa_pem(), signing_alg="ES256")
    assert_problem(await client.post("/connectors", json=third, params=NO_CHECK), 422, "invalid_request")
    assert counting.checked == 1


async def test_a_patch_checks_only_a_key_it_sends(client: httpx.AsyncClient, app: Any) -> None:
    counting = app.state.connectors.key_checks = CountingKeyChecks()
    body = signed(
        "https://127.0.0.1:9/oauth/token",
        "client-1",
        pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    )
    created = (await client.post("/connectors", json=body, params=NO_CHECK)).json()
    url = f"/connectors/{created['id']}"
    renamed = await client.patch(
        url, json={"auth": {"assertion_audience": "https://idp.example"}}, params=NO_CHECK
    )
    assert renamed.status_code == 200, renamed.text
    assert counting.checked == 1
    refused = await client.patch(url, json={"auth": {"private_key": damaged_rsa_pem()}}, params=NO_CHECK)
    assert_problem(refused, 422, "invalid_request")
    assert counting.checked == 2
    assert (await client.get(url)).json()["version"] == 2


async def test_one_organization_cannot_queue_key_checks_in_front_of_another(
    client_for: Callable[..., httpx.AsyncClient], app: Any, settings: Settings
) -> None:
    """B has its maximum of checks waiting: its next save is refused at once (429, nothing
    saved), while A's save is checked and saved."""
    gated = app.state.connectors.key_checks = GatedKeyChecks()
    a, b = client_for("org-a"), client_for("org-b")
    pem = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def body(client_id: str) -> dict[str, Any]:
        return signed("https://127.0.0.1:9/oauth/token", client_id, pem)

    # B's limit is 1 connector here: its two held saves are checked in parallel, one then fits.
    waiting = [
        asyncio.create_task(b.post("/connectors", json=body(f"b-{i}"), params=NO_CHECK)) for i in range(2)
    ]
    while gated.waiting < 2:
        await asyncio.sleep(0.01)
    busy = await b.post("/connectors", json=body("b-3"), params=NO_CHECK)
    assert_problem(busy, 429, "key_checks_busy")
    assert busy.headers["retry-after"] == "1"
    a_save = asyncio.create_task(a.post("/connectors", json=body("a-1"), params=NO_CHECK))
    while gated.waiting < 3:
        await asyncio.sleep(0.01)
    gated.gate.set()
    assert (await a_save).status_code == 201
    answers = sorted(response.status_code for response in await asyncio.gather(*waiting))
    assert answers == [201, 409]  # one fits B's limit of one connector


def _spin(started: Any, seconds: float) -> None:
    import time as clock

    started.set()
    until = clock.monotonic() + seconds
    while clock.monotonic() < until:
        pass


async def test_a_check_starved_by_a_busy_machine_is_raised_and_ends() -> None:
    """Every core busy at normal priority: an idle-class worker gets no CPU at all, so a check
    still running after a second is raised to nice 10, and ends."""
    import multiprocessing
    import os

    context = multiprocessing.get_context("spawn")
    checks = KeyChecks()
    pem = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=4096))
    # The worker first, idle (its first check starts it), then every core taken.
    assert await checks.refusal("org-a", pem) is None
    events = [context.Event() for _ in range(os.cpu_count() or 2)]
    hogs = [context.Process(target=_spin, args=(event, 60.0)) for event in events]
    for hog in hogs:
        hog.start()
    try:
        for event in events:
            assert await asyncio.to_thread(event.wait, 30)
        refusal = await asyncio.wait_for(checks.refusal("org-a", pem), 45)
        assert refusal is None
        assert not checks._raised, "the workers went back to the idle class"
    finally:
        checks.close()
        for hog in hogs:
            hog.kill()
            hog.join()
