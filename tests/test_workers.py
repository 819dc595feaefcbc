"""``serve`` with several worker processes (``CONNECTORS_WORKERS``, ``--workers``), on SQLite and
PostgreSQL: both workers answer on the one port, a change made through one is followed by the
other, a worker that dies is replaced, a stop ends every worker gracefully, and a worker never
outlives a ``serve`` process that was killed."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _truncate_postgres, run_sync
from tests.support.service import ServiceProcess, caller_token, migrate, running_service, service_env

WORKERS = 2


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceProcess]:
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}"
    else:
        database_url = request.getfixturevalue("postgres_server")
        run_sync(_truncate_postgres(database_url))
    env = service_env(database_url, tmp_path, workers=str(WORKERS))
    migrate(env)
    with running_service(env, tmp_path / "service.log") as running:
        yield running


def workers_of(service: ServiceProcess) -> set[int]:
    """The worker processes ``serve`` started (its children that serve, not its helpers)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == service.process.pid and b"spawn_main" in command:
            found.add(int(entry))
    return found


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process still running (not ended, nor a zombie awaiting its reaper)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def answered_by(service: ServiceProcess, request_ids: set[str]) -> set[int]:
    """The processes whose access log lines answered these requests."""
    return {
        record["pid"]
        for record in service.log_records()
        if record.get("logger") == "connectors.access" and record.get("request_id") in request_ids
    }


def basic(password: str) -> dict[str, Any]:
    return {
        "name": "CRM",
        "resource_domain_url": "https://crm.example.com",
        "auth": {
            "type": "basic",
            "username": "svc",
            "password": password,
            "validation_url": "https://crm.example.com/check",
        },
    }


def authorize_on_new_connections(
    service: ServiceProcess, token: str, url: str, times: int
) -> list[httpx.Response]:
    """Each call on a connection of its own, so the workers share them as the kernel hands out."""
    answers = []
    for _ in range(times):
        with httpx.Client(base_url=service.base_url, timeout=10) as fresh:
            answers.append(
                fresh.post(f"{url}/authorize", json={}, headers={"Authorization": f"Bearer {token}"})
            )
    return answers


def test_every_worker_answers_and_follows_a_change_made_through_another(service: ServiceProcess) -> None:
    assert (
        len(wait_for(lambda: len(workers_of(service)) == WORKERS and workers_of(service), "workers"))
        == WORKERS
    )
    token = caller_token(service.env, "acme")
    with httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as api:
        created = api.post("/connectors", json=basic("CANARY-first"), params={"validate": "false"})
        assert created.status_code == 201, created.text
        url = f"/connectors/{created.json()['id']}"

        # Both workers answer: calls on new connections until each has logged one.
        ids: set[str] = set()

        def both_answered() -> bool:
            answers = authorize_on_new_connections(service, token, url, 8)
            assert all(answer.status_code == 200 for answer in answers)
            ids.update(answer.headers["x-request-id"] for answer in answers)
            return len(answered_by(service, ids)) == WORKERS

        wait_for(both_answered, "an answer from each worker")

        # A new password, saved through whichever worker: every worker gives it out soon after.
        version = api.get(url).json()["version"]
        changed = api.patch(
            url,
            json={"auth": {"password": "CANARY-second"}},
            headers={"If-Match": f'"{version}"'},
            params={"validate": "false"},
        )
        assert changed.status_code == 200, changed.text
        expected = "Basic " + base64.b64encode(b"svc:CANARY-second").decode()

        # Each worker follows the change on its own (within its poll interval): wait until each
        # has answered with the new password once; a worker never goes back afterwards.
        fresh: set[str] = set()

        def everyone_has_it() -> bool:
            answers = authorize_on_new_connections(service, token, url, 8)
            fresh.update(
                answer.headers["x-request-id"]
                for answer in answers
                if answer.json()["headers"]["Authorization"] == expected
            )
            return len(answered_by(service, fresh)) == WORKERS

        wait_for(everyone_has_it, "the new password from every worker")
        ids = set()
        for _ in range(10):
            answers = authorize_on_new_connections(service, token, url, 8)
            assert [answer.json()["headers"]["Authorization"] for answer in answers] == [expected] * 8
            ids.update(answer.headers["x-request-id"] for answer in answers)
            if len(answered_by(service, ids)) == WORKERS:
                break
        assert len(answered_by(service, ids)) == WORKERS
    assert "CANARY" not in service.stderr()


def test_a_dead_worker_is_replaced_and_a_stop_ends_every_worker(service: ServiceProcess) -> None:
    first = wait_for(lambda: len(workers_of(service)) == WORKERS and workers_of(service), "workers")
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (now := workers_of(service)) and len(now) == WORKERS and victim not in now and now,
        "a replacement",
    )
    wait_for(lambda: httpx.get(f"{service.base_url}/healthz", timeout=5).status_code == 200, "answers")

    # SIGTERM: each worker stops gracefully, then serve ends with status 0.
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=40) == 0
    assert not any(alive(pid) for pid in replaced)
    shutdowns = [r for r in service.log_records() if r["message"] == "Application shutdown complete."]
    assert {record["pid"] for record in shutdowns} >= replaced


def test_workers_end_when_serve_is_killed(tmp_path: Path) -> None:
    env = service_env(f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}", tmp_path, workers=str(WORKERS))
    migrate(env)
    with running_service(env, tmp_path / "service.log") as service:
        workers = wait_for(lambda: len(workers_of(service)) == WORKERS and workers_of(service), "workers")
        # Only serve itself (not its process group, as a test's cleanup does): its workers follow.
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to end")
        # The port is free again.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", service.port))


@pytest.mark.parametrize(
    ("given", "said"), [(["--workers", "0"], "CONNECTORS_WORKERS"), ([], "address already")]
)
def test_serve_with_workers_refuses_in_one_line(tmp_path: Path, given: list[str], said: str) -> None:
    env = service_env(f"sqlite+aiosqlite:///{tmp_path / 'connectors.db'}", tmp_path, workers=str(WORKERS))
    migrate(env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["CONNECTORS_PORT"])))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "app", "serve", *given],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert said in lines[-1], done.stderr
