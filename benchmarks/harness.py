"""What every benchmark mode needs: the server as production runs it, pinned cores, load runs.

- ``Bench`` owns a temporary directory and everything started in it (server, helpers,
  PostgreSQL servers) and stops all of it on the way out, Ctrl-C, SIGTERM or failure included.
  Children run in sessions of their own, so a Ctrl-C reaches only this process, which then stops
  them in order.
- ``Server`` is ``python -m app serve`` started as ``make run`` starts it (uvicorn, access log on,
  its JSON lines written to a file), under ``taskset -c 0``: the service gets core 0 alone. This
  process, the load generator, token servers and a PostgreSQL of the benchmark's own share core 1.
- ``load`` runs ``benchmarks.loadgen`` under ``taskset -c 1`` and returns its result.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import httpx

from app.core.auth import mint_token
from app.core.config import Settings
from app.core.crypto import KeyRing

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
HELPER_CPU = 1
ALL_SCOPES = ("connectors:read", "connectors:write", "connectors:authorize")
START_TIMEOUT_SECONDS = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` (0: this one) to ``cpu``; its later threads follow."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in os.listdir(tasks):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, still running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command may hold spaces and parentheses: the parent id follows the last ')'.
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def pin_tree(pid: int, cpu: int) -> None:
    """Pin ``pid`` and every process it started (PostgreSQL: the postmaster and its helpers)."""
    pin(pid, cpu)
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            pin(child, cpu)


def unsupported_reason() -> str | None:
    """Why the benchmarks cannot run here (they pin two cores), or None."""
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        return "needs 2 cores and taskset (util-linux)"
    return None


def machine_note() -> str:
    """Load average and the code measured, printed with every result."""
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return (
        f"code: {commit or '?'}{' with uncommitted changes in app/' if dirty else ''};"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


class Keys:
    """The JWT secret and key ring one server gets, and caller tokens it accepts."""

    def __init__(self) -> None:
        self.jwt_secret = secrets.token_urlsafe(32)
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        self.encryption_keys = f"k1:{key}"
        self.settings = Settings(jwt_secret=self.jwt_secret, encryption_keys=self.encryption_keys)
        self.keyring = KeyRing.from_settings(self.settings)

    def token(self, organization: str, scopes: Sequence[str] = ALL_SCOPES, ttl: int = 4 * 3600) -> str:
        return mint_token(self.settings, organization_id=organization, scopes=scopes, ttl_seconds=ttl)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Bench(contextlib.ExitStack):
    """A temporary directory and everything started for one benchmark; all undone on exit."""

    def __init__(self, prefix: str = "connectors-bench-") -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.callback(shutil.rmtree, self.work, ignore_errors=True)
        # SIGTERM and SIGHUP end the benchmark like Ctrl-C: through every cleanup below.
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        self.callback(lambda: [signal.signal(sig, handler) for sig, handler in previous.items()])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        # Further Ctrl-C while cleaning up would leave servers behind: finish the cleanup first.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return bool(super().__exit__(exc_type, exc, tb))
        finally:
            signal.signal(signal.SIGINT, previous)

    def process(
        self, command: Sequence[str], *, cpu: int | str | None, log: Path | None = None, **kw: Any
    ) -> Any:
        """Start ``command`` (pinned to ``cpu``, a core or a taskset list); terminated, then killed,
        on exit."""
        argv = [*(["taskset", "-c", str(cpu)] if cpu is not None else []), *command]
        sink = log.open("ab") if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True, **kw
        )
        if log is not None:
            self.callback(sink.close)  # type: ignore[union-attr]
        self.callback(stop_process, process)
        return process


def stop_process(process: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Server:
    """One ``python -m app serve`` process on core 0."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        # taskset execs the command: the same process.
        return self.process.pid

    def rss_mib(self) -> float:
        """Resident memory now (VmRSS of /proc/<pid>/status), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far: every thread of it and of the processes it started
        (workers), running or ended (utime + stime, and cutime + cstime, of /proc/<pid>/stat)."""
        total = 0.0
        for pid in [self.pid, *descendants(self.pid)]:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used = int(fields[11]) + int(fields[12])
                if pid == self.pid:
                    used += int(fields[13]) + int(fields[14])  # its ended children
                total += used / CLOCK_TICKS
        return total

    def stop(self) -> None:
        stop_process(self.process)

    def metric(self, name: str) -> float | None:
        """One unlabelled series of ``/metrics`` (None if absent); not while measuring: a scrape
        also counts the stored connectors with one query."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=60).text
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    def access_lines(self) -> int:
        with self.log.open("rb") as handle:
            return sum(1 for line in handle if b'"connectors.access"' in line)


def server_env(bench: Bench, keys: Keys, database_url: str, **settings: str) -> dict[str, str]:
    """The server's environment: nothing ``CONNECTORS_*`` from this machine leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTORS_")}
    env.update(
        CONNECTORS_PORT=str(free_port()),
        CONNECTORS_DATABASE_URL=database_url,
        CONNECTORS_DATA_DIR=str(bench.work),
        CONNECTORS_JWT_SECRET=keys.jwt_secret,
        CONNECTORS_ENCRYPTION_KEYS=keys.encryption_keys,
        CONNECTORS_ALLOW_PRIVATE_DESTINATIONS="true",
    )
    env.update({f"CONNECTORS_{name.upper()}": value for name, value in settings.items()})
    return env


def migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed: {done.stderr.strip()[-2000:]}")


SERVE = (sys.executable, "-m", "app", "serve")


def start_server(
    bench: Bench,
    env: dict[str, str],
    name: str = "server",
    command: Sequence[str] = SERVE,
    cpus: str = str(SERVER_CPU),
) -> Server:
    """``python -m app serve`` (or ``command``) pinned to core 0 (or ``cpus``, a taskset list);
    returns once ``/healthz`` answers."""
    log = bench.work / f"{name}.log"
    process = bench.process(command, cpu=cpus, log=log, env=env)
    server = Server(process, int(env["CONNECTORS_PORT"]), log, env)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"serve did not answer within {START_TIMEOUT_SECONDS} s:\n{log.read_text()[-3000:]}")


# Load --------------------------------------------------------------------------------------------


def write_targets(path: Path, tokens: Sequence[str], targets: Sequence[tuple[str, str, str, int]]) -> Path:
    """A loadgen targets file: (method, path, body, token index) each, JSON bodies."""
    spec = {"headers": {"Content-Type": "application/json"}, "tokens": list(tokens), "targets": list(targets)}
    path.write_text(json.dumps(spec))
    return path


def load_job(server: Server, connections: int, **job: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": server.port, "connections": connections, **job}


def load(job: dict[str, Any], server: Server | None = None) -> dict[str, Any]:
    """Run the load generator on core 1 and return its result.

    With ``server``, the result also says how much CPU the server used per answered request
    (``server_cpu_us_per_request``) and what share of its core it got (``server_cpu_share``): a
    figure that a busy machine disturbs much less than throughput.
    """
    cpu_before = server.cpu_seconds() if server is not None else 0.0
    done = subprocess.run(
        ["taskset", "-c", str(HELPER_CPU), sys.executable, "-m", "benchmarks.loadgen"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    if server is not None:
        # Includes the generator's start and the wait for the last answers: a small overestimate.
        used = server.cpu_seconds() - cpu_before
        result["server_cpu_us_per_request"] = (
            round(used / result["requests"] * 1e6, 1) if result["requests"] else 0.0
        )
        result["server_cpu_share"] = round(used / result["seconds"], 3) if result["seconds"] else 0.0
    return result


def start_load(bench: Bench, job: dict[str, Any]) -> tuple[subprocess.Popen[str], Path]:
    """Start the load generator in the background; ``finish_load`` collects its result."""
    out = bench.work / f"load-{time.monotonic_ns()}.json"
    (bench.work / "job.json").write_text(json.dumps(job))
    with (bench.work / "job.json").open() as stdin, out.open("w") as stdout:
        process = subprocess.Popen(
            ["taskset", "-c", str(HELPER_CPU), sys.executable, "-m", "benchmarks.loadgen"],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
    bench.callback(stop_process, process, 5.0)
    return process, out


def finish_load(process: subprocess.Popen[str], out: Path, timeout: float) -> dict[str, Any]:
    if process.wait(timeout=timeout) != 0:
        raise RuntimeError(f"loadgen exited with {process.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over the rounds (requests and errors are summed)."""
    keys = [key for key, value in runs[0].items() if isinstance(value, int | float)]
    merged: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in keys}
    merged["errors"] = sum(run["errors"] for run in runs)
    merged["requests"] = sum(run["requests"] for run in runs)
    merged["rounds"] = len(runs)
    return merged


@dataclass
class Route:
    """One measured route of a rounds comparison: a name and the job of one round."""

    name: str
    job: Callable[[float], dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    # Requests continue the cycle of targets from one round to the next.
    next: int = 0


def measure_rounds(
    routes: Sequence[Route], rounds: int, seconds: float, server: Server
) -> dict[str, dict[str, Any]]:
    """The routes take turns, ``rounds`` times ``seconds / rounds`` each; medians per route.

    Slow drifts of a shared machine then weigh on every route alike.
    """
    for _ in range(rounds):
        for route in routes:
            job = route.job(seconds / rounds)
            job["start"] = route.next
            result = load(job, server)
            route.next = int(result["next"])
            route.runs.append(result)
    return {route.name: median_of(route.runs) for route in routes}


def loadgen_capacity(
    bench: Bench, request: dict[str, Any], connections: int, seconds: float
) -> dict[str, Any]:
    """What the load generator reaches against ``benchmarks.null_server`` on core 0."""
    port = free_port()
    process = bench.process([sys.executable, "-m", "benchmarks.null_server", str(port)], cpu=SERVER_CPU)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("the null server did not start")
        time.sleep(0.05)
    try:
        return load(
            {"host": "127.0.0.1", "port": port, "connections": connections, "seconds": seconds, **request}
        )
    finally:
        stop_process(process)


# Printing ----------------------------------------------------------------------------------------


def row(name: str, result: dict[str, Any], base: dict[str, Any] | None = None, width: int = 32) -> str:
    """One line of the table; ``base`` (the /healthz result) adds the two ratios."""
    ratios = (
        f"{result['rps'] / base['rps']:>8.2f}x{result['p99_ms'] / base['p99_ms']:>8.2f}x"
        if base is not None
        else f"{'-':>9}{'-':>9}"
    )
    server_us = result.get("server_cpu_us_per_request", float("nan"))
    server_share = result.get("server_cpu_share", float("nan")) * 100
    return (
        f"{name:<{width}}{result['rps']:>8.0f}{result['p50_ms']:>8.2f}{result['p99_ms']:>8.2f}{ratios}"
        f"{result['errors']:>7}{server_us:>8.0f}{server_share:>7.0f}%"
        f"{result['loadgen_cpu_us_per_request']:>8.1f}{result['loadgen_cpu_share'] * 100:>7.0f}%"
    )


def header(width: int = 32) -> str:
    return (
        f"{'':<{width}}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'rps/hz':>9}{'p99/hz':>9}{'errors':>7}"
        f"{'srv us':>8}{'srv cpu':>8}{'gen us':>8}{'gen cpu':>8}"
    )


LEGEND = (
    "(rps/hz, p99/hz: ratios to /healthz of the same run; srv us, srv cpu: the server's CPU time per"
    " answered request\n and the share of its core it got; gen us, gen cpu: the same for the load"
    " generator)"
)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Print what is being done (on stderr), and how long it took."""
    print(f"... {message}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"    done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
