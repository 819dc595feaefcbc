"""Slow clients against a real ``serve`` process: headers within a time limit, a cap on open
connections, idle keep-alive closed. SQLite only: the database plays no part.

Nothing here asserts a duration. A connection closed "at once" is one closed long before the
header time limit, which the test sets far above anything a loaded machine could take.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import _sqlite_database, run_sync
from tests.support.service import ServiceProcess, migrate, running_service, service_env

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextmanager
def sqlite_service(tmp_path: Path, **settings: str) -> Iterator[ServiceProcess]:
    env = service_env(run_sync(_sqlite_database(tmp_path)), tmp_path, **settings)
    migrate(env)
    with running_service(env, tmp_path / "serve.log") as service:
        yield service


def open_partial(port: int, *, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(PARTIAL)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk


@pytest.fixture(scope="module")
def quick_headers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with sqlite_service(
        tmp_path_factory.mktemp("slow"),
        header_timeout_seconds="1",
        max_connections="200",
        keep_alive_seconds="1",
    ) as service:
        yield service


def test_headers_that_never_finish_get_408_and_a_closed_connection(quick_headers: ServiceProcess) -> None:
    slow = [open_partial(quick_headers.port, timeout=30) for _ in range(100)]
    try:
        # While they are open (far below the cap), everyone else is served.
        assert httpx.get(f"{quick_headers.base_url}/healthz").status_code == 200
        for sock in slow:
            assert read_all(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    finally:
        for sock in slow:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed(quick_headers: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", quick_headers.port), timeout=30) as sock:
        assert read_all(sock).startswith(b"HTTP/1.1 408")


def test_the_next_request_on_a_kept_alive_connection_has_the_same_limit(
    quick_headers: ServiceProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", quick_headers.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(PARTIAL)
        assert b"408 Request Timeout" in read_all(sock)


def test_an_idle_kept_alive_connection_is_closed(quick_headers: ServiceProcess) -> None:
    # 1 s here; uvicorn's own default (5 s) would run out the socket's 4 s and fail the test.
    with socket.create_connection(("127.0.0.1", quick_headers.port), timeout=4) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_all(sock)  # the answer, then the close once idle for keep_alive_seconds
    assert answer.startswith(b"HTTP/1.1 200") and b"408" not in answer


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    with sqlite_service(tmp_path, header_timeout_seconds="60", max_connections="20") as service:
        # The readiness check's connection may not be closed on the server's side yet: whether
        # the last held one or only the extra is refused, the extra one is.
        held: list[socket.socket] = []
        try:
            while len(held) < 20:
                held.append(open_partial(service.port, timeout=30))
            extra = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            with extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                try:
                    closed = extra.recv(4096)
                except ConnectionResetError:
                    closed = b""
            # Closed without an answer, long before the 60 s header limit of the held ones.
            assert closed == b""
        finally:
            for sock in held:
                sock.close()
        assert "connections refused: too many open connections" in service.stderr()
