"""A small HTTP/1.1 load generator: keep-alive connections on loopback, latency per request.

It runs in its own process so it does not share an event loop (or the GIL) with the server. Each
connection sends one request at a time and reads the whole response before the next, so the
latency is what a caller of the route sees.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rate, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
            "max_ms": round(max(self.latencies_ms), 3),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 3),
        }


def build_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


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
    host: str, port: int, request: bytes, *, connections: int, seconds: float, expect: int = 200
) -> Result:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                latencies.append((time.perf_counter() - start) * 1000)
                if status != expect:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return Result(len(latencies), errors, time.perf_counter() - started, latencies)


def main() -> None:
    """Reads one JSON job from stdin, prints one JSON result on stdout."""
    job = json.loads(sys.stdin.read())
    request = build_request(
        job["method"], job["path"], f"{job['host']}:{job['port']}", job["headers"], job["body"].encode()
    )
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            run(job["host"], job["port"], request, connections=job["connections"], seconds=job["seconds"])
        )
    print(json.dumps({**result.summary(), "latencies_ms": result.latencies_ms if job.get("raw") else None}))


if __name__ == "__main__":
    main()
