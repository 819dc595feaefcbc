"""A small HTTP/1.1 load generator: keep-alive connections on loopback, latency per request.

It runs in its own process so it does not share an event loop (or the GIL) with the server (the
benchmarks pin it to a core of its own with ``taskset``). Each connection sends one request at a
time and reads the whole response before the next, so the latency is what a caller of the route
sees; with more connections than the server answers at once, requests queue as in production.

Requests are spread over *targets*, each one request prebuilt as bytes before the clock starts
(method, path, body and headers, the caller's token among them). Every request takes the next
target of one cycle shared by all connections, so over a run every target is sent equally often
(to within one); the order of the targets is the caller's to choose (the benchmarks shuffle
them). ``benchmarks.authorize`` checks that one core of this generator drives several times what
the service answers (against ``benchmarks.null_server``) and prints its CPU use with every figure.

Job: one JSON object on stdin. Result: one JSON object on stdout.

- ``host``, ``port``, ``connections``;
- the targets, either inline, ``"targets": [{"method", "path", "body", "headers"}, ...]`` (or a
  single one as top-level ``method``, ``path``, ``body``, ``headers``), or in a file,
  ``"targets_file": path`` holding ``{"headers": {...}, "tokens": [...], "targets": [[method,
  path, body, token index], ...]}`` (each target gets the common headers plus
  ``Authorization: Bearer <its token>``);
- when to stop: ``"seconds"``, or ``"passes"`` (every target sent that many times);
- ``"start"``: the index in the cycle of the first request (a run continues the cycle of the one
  before with the ``next`` it returned);
- ``"rate"``: total requests per second, paced over the connections (default: each connection
  sends its next request as soon as it has the answer);
- ``"expect"`` (200): any other status, a dropped connection or a timeout counts as an error, and
  the connection is opened again;
- ``"raw"``: return every latency; ``"timeline"``: return every request as ``[wall-clock time
  sent, status (or connection_lost, timeout, connect_error), latency ms, target index (-1 when
  no connection could be made)]``.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REQUEST_TIMEOUT_SECONDS = 30.0
RECONNECT_DELAY_SECONDS = 0.1


@dataclass(slots=True)
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    statuses: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0
    next: int = 0
    records: list[tuple[float, str, float, int]] | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    def summary(self) -> dict[str, Any]:
        answered = len(self.latencies_ms)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rate, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
            "max_ms": round(max(self.latencies_ms), 3) if answered else float("nan"),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 3) if answered else float("nan"),
            "seconds": round(self.seconds, 3),
            "statuses": dict(self.statuses),
            # The generator's own CPU over the run: near 1.0 would mean it set the pace.
            "loadgen_cpu_share": round(self.cpu_seconds / self.seconds, 3) if self.seconds else 0.0,
            "loadgen_cpu_us_per_request": round(self.cpu_seconds / answered * 1e6, 2) if answered else 0.0,
            "next": self.next,
        }


def build_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_requests(job: dict[str, Any]) -> list[bytes]:
    """Every target of ``job`` as the bytes sent for it."""
    host = f"{job['host']}:{job['port']}"
    if "targets_file" in job:
        with open(job["targets_file"], encoding="utf-8") as handle:
            spec = json.load(handle)
        common: dict[str, str] = spec.get("headers", {})
        tokens: list[str] = spec["tokens"]
        return [
            build_request(
                method, path, host, {**common, "Authorization": f"Bearer {tokens[token]}"}, body.encode()
            )
            for method, path, body, token in spec["targets"]
        ]
    targets = job.get("targets") or [job]
    return [
        build_request(t["method"], t["path"], host, t.get("headers", {}), t.get("body", "").encode())
        for t in targets
    ]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int,
    seconds: float | None = None,
    passes: int | None = None,
    start: int = 0,
    rate: float | None = None,
    expect: int = 200,
    timeline: bool = False,
) -> Result:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    records: list[tuple[float, str, float, int]] = []
    errors = 0
    cursor = start
    limit = start + passes * len(requests) if passes else None
    started = time.perf_counter()
    wall0 = time.time() - started
    deadline = started + seconds if seconds is not None and limit is None else float("inf")
    # Paced: each connection sends every connections/rate seconds, the connections staggered.
    interval = connections / rate if rate else 0.0

    def finished() -> bool:
        return cursor >= limit if limit is not None else time.perf_counter() >= deadline

    def record(sent: float, label: str, latency: float, target: int) -> None:
        nonlocal errors
        statuses[label] += 1
        if label != str(expect):
            errors += 1
        if timeline:
            records.append((round(wall0 + sent, 4), label, round(latency, 3), target))

    # Per connection: when its request in flight was sent (0: none) and its writer, so that the
    # watchdog can give up on an answer that takes too long (cheaper than a timeout per request).
    inflight: list[float] = [0.0] * connections
    writers: list[asyncio.StreamWriter | None] = [None] * connections
    timed_out: set[int] = set()

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            for number, sent in enumerate(inflight):
                writer = writers[number]
                if sent and now - sent > REQUEST_TIMEOUT_SECONDS and writer is not None:
                    timed_out.add(number)
                    writer.transport.abort()

    async def worker(number: int) -> None:
        nonlocal cursor
        due = started + number * interval / connections
        while not finished():
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writers[number] = writer
            except OSError:
                # No request could be sent: a failure as a caller sees it.
                record(time.perf_counter(), "connect_error", 0.0, -1)
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
                continue
            try:
                while True:
                    if interval:
                        now = time.perf_counter()
                        if due < now - interval:
                            due = now  # fell behind (a slow answer, a reconnect): no burst to catch up
                        elif due > now:
                            await asyncio.sleep(due - now)
                        due += interval
                    if finished():
                        return
                    target = cursor % len(requests)
                    cursor += 1
                    sent = inflight[number] = time.perf_counter()
                    try:
                        writer.write(requests[target])
                        status = await _read_response(reader)
                    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                        label = "timeout" if number in timed_out else "connection_lost"
                        timed_out.discard(number)
                        record(sent, label, (time.perf_counter() - sent) * 1000, target)
                        break
                    finally:
                        inflight[number] = 0.0
                    latency = (time.perf_counter() - sent) * 1000
                    latencies.append(latency)
                    record(sent, str(status), latency, target)
            finally:
                writers[number] = None
                writer.close()
            await asyncio.sleep(RECONNECT_DELAY_SECONDS)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    guard = asyncio.create_task(watchdog())
    try:
        await asyncio.gather(*(worker(number) for number in range(connections)))
    finally:
        guard.cancel()
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Result(
        len(latencies),
        errors,
        elapsed,
        latencies,
        statuses,
        cpu_seconds=usage.ru_utime + usage.ru_stime - cpu0,
        next=cursor,
        records=records if timeline else None,
    )


def main() -> None:
    """Reads one JSON job from stdin, prints one JSON result on stdout."""
    job = json.loads(sys.stdin.read())
    requests = build_requests(job)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            run(
                job["host"],
                job["port"],
                requests,
                connections=job["connections"],
                seconds=job.get("seconds"),
                passes=job.get("passes"),
                start=job.get("start", 0),
                rate=job.get("rate"),
                expect=job.get("expect", 200),
                timeline=bool(job.get("timeline")),
            )
        )
    summary = {**result.summary(), "targets": len(requests)}
    if job.get("raw"):
        summary["latencies_ms"] = result.latencies_ms
    if result.records is not None:
        summary["records"] = result.records
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
