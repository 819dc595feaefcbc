"""A PostgreSQL server of a test's (or a benchmark's) own, that it can stop and start again.

The shared server (``postgres_server`` in ``tests/conftest.py``) is for tests that only need a
database. A test that needs to take the database away (a restart under load, a failover, a
connection pool that must notice) starts one of these instead: ``initdb`` into a fresh temporary
directory, then ``pg_ctl`` on a free port of 127.0.0.1, with its Unix sockets in that directory
too, so it never meets the machine's own server or ``/var/run/postgresql``.

PostgreSQL refuses to run as root. When this process is root, every server command runs as the
``postgres`` OS user (``runuser``), and the directory is handed to that user first. The cluster
trusts every local connection and does not fsync: a test has no secrets and survives no power
cut. A stop is still a real stop, though: committed rows survive ``stop()`` in either mode,
because the write-ahead log reaches the kernel before a commit returns.

Nothing here imports pytest but the fixture at the end, so a benchmark can write::

    with PostgresServer() as server:
        run_benchmark(server.create_database("bench"))
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

import pytest

# Generous: on a busy 2-core machine initdb alone can take several seconds.
START_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 60

# Speed over durability; a benchmark measuring writes may pass ``settings={"fsync": "on"}``.
DEFAULT_SETTINGS: Mapping[str, str] = {"fsync": "off"}

StopMode = Literal["smart", "fast", "immediate"]


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when the server is not installed.

    ``pg_config --bindir`` first, then the newest Debian ``/usr/lib/postgresql/<version>/bin``,
    then ``PATH``. Debian's ``pg_config`` comes with libpq and may name a version whose server
    is not installed, so each candidate must hold the server programs.
    """
    candidates: list[Path] = []
    if (pg_config := shutil.which("pg_config")) is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(result.stdout.strip()))
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(path) for path in sorted(debian, key=_version_key, reverse=True)]
    if (initdb := shutil.which("initdb")) is not None:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all((bindir / program).is_file() for program in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def why_unavailable() -> str | None:
    """Why a server of one's own cannot run on this machine, or None when it can."""
    if find_bindir() is None:
        return "PostgreSQL server programs (initdb, pg_ctl) not found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not installed"
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf_value(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgresServer:
    """A PostgreSQL cluster in its own temporary directory, on a free port of 127.0.0.1.

    ``start()`` runs ``initdb`` the first time; later starts reuse the data directory and the
    port, so a test can stop the server, check what its clients do, and start it again with
    every committed row still there. ``close()`` (or leaving the ``with`` block) stops the server
    and deletes the directory. Each call blocks until the server is up or down; an async test that
    needs its event loop meanwhile can run them in ``asyncio.to_thread``.
    """

    def __init__(self, *, settings: Mapping[str, str] | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server programs (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.port = _free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.directory = Path(tempfile.mkdtemp(prefix="own-postgres-"))
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory / "sockets"
        self.log_path = self.directory / "postgres.log"
        # Root may not run PostgreSQL: hand the directory to the postgres user and run as it.
        self._as_user: list[str] = []
        self.socket_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.directory, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``postgres`` database."""
        return self.url_for("postgres")

    @property
    def dsn(self) -> str:
        """The libpq-style URL of the ``postgres`` database, as asyncpg and psql take it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        """The SQLAlchemy URL of one database of this server."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{quote(database, safe='')}"

    @property
    def is_running(self) -> bool:
        """Whether a postmaster is running on this data directory (``pg_ctl status``)."""
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections; ``initdb`` the first time."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",  # also keeps the postmaster off our pipes, which would otherwise never close
            str(self.log_path),
            "-w",
            "-t",
            str(START_TIMEOUT_SECONDS),
            timeout=START_TIMEOUT_SECONDS + 30,
        )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is gone; nothing happens when it is not running.

        ``fast`` (the default) ends every session at once, rolls back what is open and writes a
        checkpoint. ``immediate`` kills the processes like a crash: the next start replays the
        write-ahead log. ``smart`` waits for every client to disconnect first.
        """
        if not self.is_running:
            return
        self._run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(STOP_TIMEOUT_SECONDS),
            timeout=STOP_TIMEOUT_SECONDS + 30,
        )

    def create_database(self, name: str) -> str:
        """Create a database on the running server and return its SQLAlchemy URL."""
        # Over TCP, so any OS user may run it: the cluster trusts 127.0.0.1.
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-w", name, as_user=False
        )
        return self.url_for(name)

    def close(self) -> None:
        """Stop the server, however it is doing, and delete its directory."""
        try:
            self.stop("immediate")
        except (RuntimeError, OSError, subprocess.SubprocessError):
            self._kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",  # independent of this machine's LANG, which may name a missing locale
            "--no-sync",
            timeout=START_TIMEOUT_SECONDS,
        )
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        # Appending keeps the file's owner; later lines override initdb's.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# PostgresServer\n")
            conf.writelines(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())

    def _run(
        self, program: str, *args: str, check: bool = True, as_user: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        command = [*(self._as_user if as_user else []), str(self.bindir / program), *args]
        # PG* variables (PGDATA, PGHOST, PGOPTIONS...) of the caller must not steer this cluster.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        # The postgres user may not enter the caller's working directory; its own one it may.
        result = subprocess.run(
            command, cwd=self.directory, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} {args[0] if args else ''} failed ({result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}\n{self._log_tail()}"
            )
        return result

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log:\n" + "\n".join(text.splitlines()[-lines:])

    def _kill(self) -> None:
        """The last resort of ``close()``: SIGKILL the postmaster; its children follow it."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A started PostgreSQL server of this test's own; stopped and deleted afterwards."""
    if (reason := why_unavailable()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} and CI=true")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server
