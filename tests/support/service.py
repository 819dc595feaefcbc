"""The service as a real process: ``python -m app migrate`` and ``python -m app serve``.

``service_env`` builds the environment explicitly (nothing ``CONNECTORS_*`` leaks in from the
machine running the tests). ``running_service`` starts ``serve``, waits until ``/readyz`` answers
and, whatever happens in the test, kills the process on the way out. Its stderr goes to a file,
not a pipe: a chatty server must never block on a pipe nobody reads.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.core.auth import mint_token
from app.core.config import Settings

ALL_SCOPES = ("connectors:read", "connectors:write", "connectors:authorize")
START_TIMEOUT_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of one service process; ``extra`` maps setting names (without prefix)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTORS_")}
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    env = {
        **base,
        "CONNECTORS_DATABASE_URL": database_url,
        "CONNECTORS_DATA_DIR": str(data_dir),
        "CONNECTORS_JWT_SECRET": secrets.token_urlsafe(32),
        "CONNECTORS_ENCRYPTION_KEYS": f"k1:{key}",
        "CONNECTORS_PORT": str(free_port()),
        "CONNECTORS_ALLOW_PRIVATE_DESTINATIONS": "true",
    }
    env.update({f"CONNECTORS_{name.upper()}": value for name, value in extra.items()})
    return env


def caller_token(env: Mapping[str, str], org: str, scopes: tuple[str, ...] = ALL_SCOPES) -> str:
    """A caller JWT the service started with ``env`` accepts."""
    settings = Settings(
        jwt_secret=env["CONNECTORS_JWT_SECRET"], encryption_keys=env["CONNECTORS_ENCRYPTION_KEYS"]
    )
    return mint_token(settings, organization_id=org, scopes=scopes, ttl_seconds=600)


def migrate(env: Mapping[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@dataclass
class ServiceProcess:
    """One ``serve`` process; ``log`` is the file its stderr (JSON lines) goes to."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def port(self) -> int:
        return int(self.env["CONNECTORS_PORT"])

    def signal(self, signum: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL to the process and every process it started (workers, key checks): no
        shutdown code runs, exactly like a machine losing them."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """Every stderr line parsed as JSON; a line that is not JSON fails the test."""
        records = []
        for line in self.stderr().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"a stderr line is not a JSON log record: {line!r}") from None
        return records

    def wait_for_log(self, message: str, timeout: float = 10.0) -> None:
        """Wait until a log record's message contains ``message``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if message in self.stderr():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line with {message!r}; stderr:\n{self.stderr()[-3000:]}")


def _wait_ready(service: ServiceProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(
                f"serve exited with {service.process.returncode} before it was ready:\n{service.stderr()}"
            )
        try:
            if httpx.get(f"{service.base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"serve was not ready within {timeout} s:\n{service.stderr()}")


@contextmanager
def running_service(env: dict[str, str], log: Path) -> Iterator[ServiceProcess]:
    """``python -m app serve`` with ``env``, ready to answer; killed on exit if still running."""
    with log.open("ab") as sink:
        # A session of its own: whatever it starts (workers, key checks) goes with it at the end.
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            start_new_session=True,
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{env['CONNECTORS_PORT']}", log, env)
    try:
        _wait_ready(service, START_TIMEOUT_SECONDS)
        yield service
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
