"""A small HTTP/1.1 load generator: keep-alive connections on loopback, latency per request.

It runs in its own process (the benchmarks pin it to a core of its own with ``taskset``) so it
shares neither an event loop nor the GIL with the server. Each connection sends one request at a
time and reads the whole response before the next, so the latency is what a caller of the route
sees, and with more connections than the server can answer at once, requests queue as they
would in production.

Requests are spread over *targets*, each one request prebuilt as bytes before the clock starts
(method, path, body and headers, among them the caller's token). Every request takes the next
target of one shared cycle, so over a run every target is sent equally often (to within one):
the order of the targets is the caller's to choose (the benchmarks shuffle them).

The connections are protocol callbacks on uvloop, not coroutines: answering a response and
sending the next request is one callback, so a single core drives several times what the
service can answer (``benchmarks.authorize`` measures that against ``benchmarks.null_server``
and reports the generator's own CPU use with every figure).

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
- ``"expect"`` (200): any other status, a dropped connection or a timeout counts as an error;
- ``"raw"``: return every latency; ``"timeline"``: return every request as ``[wall-clock time
  sent, status (or connection_lost, timeout, connect_error), latency ms, target index]``.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

REQUEST_TIMEOUT_SECONDS = 30.0
RECONNECT_DELAY_SECONDS = 0.05


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


def _body_length(head: bytes) -> int | None:
    """The Content-Length of a response head; None when the body is chunked."""
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 2)
        return int(lower[at + 17 : end if end >= 0 else None])
    if b"\r\ntransfer-encoding: chunked" in lower:
        return None
    return 0


def _chunked_end(buffer: bytearray, start: int) -> int:
    """Where a chunked body starting at ``start`` ends, or -1 if it has not all arrived."""
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return -1
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            # No trailers from the servers measured here: the empty line ends the message.
            return at + 2 if len(buffer) >= at + 2 else -1
        at += size + 2
        if len(buffer) < at:
            return -1


class _Client(asyncio.Protocol):
    """One keep-alive connection: one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.sent_at = 0.0
        self.target = 0
        self.due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.run.ready(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while self.busy:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            length = _body_length(head)
            if length is None:
                total = _chunked_end(buffer, end + 4)
                if total < 0:
                    return
            else:
                total = end + 4 + length
                if len(buffer) < total:
                    return
            del buffer[:total]
            self.busy = False
            self.run.answered(self, int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buffer.clear()
        self.run.lost(self)


@dataclass
class _Run:
    loop: asyncio.AbstractEventLoop
    host: str
    port: int
    requests: Sequence[bytes]
    connections: int
    start: int = 0
    seconds: float | None = None
    passes: int | None = None
    rate: float | None = None
    expect: int = 200
    timeline: bool = False
    latencies: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    records: list[tuple[float, str, float, int]] = field(default_factory=list)
    connecting: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.next = self.start
        self.limit = self.start + self.passes * len(self.requests) if self.passes else None
        self.clients = [_Client(self) for _ in range(self.connections)]
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.started = time.perf_counter()
        self.wall0 = time.time() - self.started
        self.deadline = self.started + self.seconds if self.seconds is not None else float("inf")
        # Paced: each connection sends every connections/rate seconds, the connections staggered.
        self.interval = self.connections / self.rate if self.rate else 0.0
        self.ended_at: float | None = None

    # The cycle ------------------------------------------------------------------------------

    def finished(self) -> bool:
        if self.limit is not None:
            return self.next >= self.limit
        return time.perf_counter() >= self.deadline

    def ready(self, client: _Client) -> None:
        if self.interval:
            now = time.perf_counter()
            if client.due < now:
                index = self.clients.index(client)
                client.due = self.started + index * self.interval / self.connections
                while client.due < now:
                    client.due += self.interval
        self.schedule(client)

    def schedule(self, client: _Client) -> None:
        if self.finished():
            self.settle()
            return
        if self.interval:
            delay = client.due - time.perf_counter()
            client.due += self.interval
            if delay > 0:
                self.loop.call_later(delay, self.send, client)
                return
        self.send(client)

    def send(self, client: _Client) -> None:
        if client.transport is None or client.busy:
            return
        if self.finished():
            self.settle()
            return
        index = self.next
        self.next = index + 1
        client.busy = True
        client.target = index % len(self.requests)
        client.sent_at = time.perf_counter()
        client.transport.write(self.requests[client.target])

    def answered(self, client: _Client, status: int) -> None:
        latency = (time.perf_counter() - client.sent_at) * 1000
        self.latencies.append(latency)
        label = str(status)
        self.statuses[label] += 1
        if status != self.expect:
            self.errors += 1
        if self.timeline:
            self.note(client, label, latency)
        self.schedule(client)

    def failed(self, client: _Client, label: str) -> None:
        """The request in flight on ``client`` got no answer."""
        self.errors += 1
        self.statuses[label] += 1
        if self.timeline:
            self.note(client, label, (time.perf_counter() - client.sent_at) * 1000)

    def note(self, client: _Client, label: str, latency: float) -> None:
        """One request of the timeline: wall-clock time sent, outcome, latency, target."""
        self.records.append((round(self.wall0 + client.sent_at, 4), label, round(latency, 3), client.target))

    def lost(self, client: _Client) -> None:
        if client.busy:
            client.busy = False
            self.failed(client, "connection_lost")
        if self.finished():
            self.settle()
        else:
            self.loop.call_later(RECONNECT_DELAY_SECONDS, self.connect, client)

    # Connections ----------------------------------------------------------------------------

    def connect(self, client: _Client) -> None:
        task = self.loop.create_task(self._connect(client))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, client: _Client) -> None:
        try:
            await self.loop.create_connection(lambda: client, self.host, self.port)
        except OSError:
            self.errors += 1
            self.statuses["connect_error"] += 1
            if self.finished():
                self.settle()
            else:
                self.loop.call_later(RECONNECT_DELAY_SECONDS * 4, self.connect, client)

    def watchdog(self) -> None:
        """Give up on answers that take too long (the connection is closed and counted)."""
        now = time.perf_counter()
        for client in self.clients:
            if client.busy and now - client.sent_at > REQUEST_TIMEOUT_SECONDS and client.transport:
                client.busy = False
                self.failed(client, "timeout")
                client.transport.abort()
        self.settle()
        if not self.done.done():
            self.loop.call_later(0.25, self.watchdog)

    def settle(self) -> None:
        """Done once no more requests are due and none is in flight."""
        if self.done.done() or not self.finished() or any(c.busy for c in self.clients):
            return
        self.ended_at = time.perf_counter()
        self.done.set_result(None)

    async def go(self) -> None:
        for client in self.clients:
            self.connect(client)
        self.loop.call_later(0.25, self.watchdog)
        await self.done
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()


def percentile(ordered: Sequence[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def run(job: dict[str, Any], requests: Sequence[bytes]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    state = _Run(
        loop=loop,
        host=job["host"],
        port=job["port"],
        requests=requests,
        connections=job["connections"],
        start=job.get("start", 0),
        seconds=job.get("seconds") if not job.get("passes") else None,
        passes=job.get("passes"),
        rate=job.get("rate"),
        expect=job.get("expect", 200),
        timeline=bool(job.get("timeline")),
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    await state.go()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    wall = (state.ended_at or time.perf_counter()) - state.started
    ordered = sorted(state.latencies)
    answered = len(ordered)
    result: dict[str, Any] = {
        "requests": answered,
        "errors": state.errors,
        "rps": round(answered / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(percentile(ordered, 50), 3),
        "p99_ms": round(percentile(ordered, 99), 3),
        "max_ms": round(ordered[-1], 3) if ordered else float("nan"),
        "mean_ms": round(sum(ordered) / answered, 3) if answered else float("nan"),
        "seconds": round(wall, 3),
        "statuses": dict(state.statuses),
        # The generator's own CPU time over the run: near 1.0 would mean it, not the server,
        # set the pace.
        "loadgen_cpu_share": round(cpu / wall, 3) if wall > 0 else 0.0,
        "loadgen_cpu_us_per_request": round(cpu / answered * 1e6, 2) if answered else 0.0,
        "next": state.next,
        "targets": len(requests),
    }
    if job.get("raw"):
        result["latencies_ms"] = list(state.latencies)
    if state.timeline:
        result["records"] = state.records
    return result


def main() -> None:
    """Reads one JSON job from stdin, prints one JSON result on stdout."""
    job = json.loads(sys.stdin.read())
    requests = build_requests(job)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(job, requests))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
