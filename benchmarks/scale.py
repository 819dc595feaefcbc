"""Scale mode: authorize over many connectors of many organizations, held and not held.

The database (SQLite, or a PostgreSQL of the benchmark's own) is migrated and seeded through
the repository before the server starts (``benchmarks.seed``). Then, with every cache at its
default size:

- warm-up: ``/healthz``, the five connectors of one organization (the baseline) and one pass over
  10,000 other connectors, which brings the load path (connection pool, compiled statements,
  SQLite's page caches, the allocator) to its working size;
- one pass over the 50,000 connectors of 10,000 organizations, each request with its
  organization's caller token: every connector loaded once, every token verified once; the
  server's RSS before and after it gives the memory per held connector;
- (a) ``/healthz``, the five connectors and the 50,000 take turns (medians of the rounds), the
  50,000 spread evenly: the cycle of targets continues from round to round;
- (c) a new replica: the server stopped, the 50,000 marked as called lately (what replicas with
  preload on write as they serve, ``app.connectors.usage``), a new one started on the same
  database, and (a)'s load (the 50,000, 32 connections) sent from the moment ``/readyz`` says
  ready, as a load balancer would, for ``--cold-seconds``: the p99 of each second, and how long
  after the process started every later second's p99 is within 1.5x of the warm server's p99 in
  (a); once filled at start (the default: ready once the connectors called lately are held),
  once not (``CONNECTORS_PRELOAD_CONNECTORS=false``: ready as soon as it answers). The control:
  the warm server of (a) under the same load for as long, judged by the same rule (a second's
  p99 moves with the machine's other work: how often the warm one is above the line says how
  much of a cold curve is noise);
- (b) on a server started anew: the same spread over all 500,000 connectors and 100,000 tokens
  for ``--miss-seconds`` (its caches fill: most calls verify a caller token seen for the first
  time), then for half as long again with its caches full; a pass is five times the connector
  cache, so four calls in five load their connector.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.connectors.repository import ConnectorRepository
from app.connectors.usage import BATCH as USAGE_BATCH
from app.core.db import Database, build_engine
from benchmarks.harness import (
    HELPER_CPU,
    LEGEND,
    START_TIMEOUT_SECONDS,
    Bench,
    Keys,
    Route,
    Server,
    header,
    load,
    load_job,
    machine_note,
    measure_rounds,
    migrate,
    pin,
    pin_tree,
    row,
    server_env,
    start_server,
    step,
    verdict,
    write_targets,
)
from benchmarks.seed import Seeded, seed
from benchmarks.warm import AUTHORIZE_BODY, authorize_target, healthz_target
from tests.support.postgres import PostgresServer

RPS_TARGET = 0.9  # of the five-connector figure
MISS_RPS_TARGET = 0.5  # (b), of the five-connector figure
COLD_P99_FACTOR = 1.5  # a new replica has settled when its p99 stays within this of the warm one's
COLD_TARGET_SECONDS = 10.0
P99_TARGET = 1.5  # of /healthz
MIB = 1024 * 1024
WARMUP_ORGANIZATIONS = 2000


def _spread(
    bench: Bench, keys: Keys, organizations: list[tuple[str, list[Any]]], name: str, seed_: int
) -> Path:
    """A targets file: every connector of ``organizations`` with its organization's token, shuffled."""
    tokens = [keys.token(org) for org, _ in organizations]
    targets = [
        ("POST", f"/connectors/{connector_id}/authorize", AUTHORIZE_BODY, index)
        for index, (_, ids) in enumerate(organizations)
        for connector_id in ids
    ]
    # Organizations interleaved, as independent callers would be.
    random.Random(seed_).shuffle(targets)
    return write_targets(bench.work / f"{name}.json", tokens, targets)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "scale", "database": args.database}
    with Bench() as bench:
        keys = Keys()
        postgres: PostgresServer | None = None
        if args.database == "postgresql":
            with step("starting a PostgreSQL of the benchmark's own"):
                postgres = bench.enter_context(PostgresServer())
                url = postgres.create_database("bench")
        else:
            url = f"sqlite+aiosqlite:///{bench.work / 'bench.db'}"
        # Not filled at start, but in (c): (a) measures what calls bring into memory (and its
        # bytes per connector), (b) the misses; a background fill would add to both.
        env = server_env(bench, keys, url, preload_connectors="false")
        migrate(env)
        organizations = args.organizations
        with step(f"seeding {organizations * 5:,} connectors of {organizations:,} organizations"):
            seeded = seed(
                url, keys.keyring, organizations=organizations, per_organization=5, batch=args.batch
            )
        results["seed"] = {
            "connectors": seeded.rows,
            "organizations": organizations,
            "seconds": round(seeded.seconds, 1),
            "rows_per_s": round(seeded.rate),
            "batch": args.batch,
        }
        held = seeded.connectors[: args.held_organizations]
        with step("minting caller tokens and writing the targets"):
            spread_a = _spread(bench, keys, held, "held", 1)
            spread_b = _spread(bench, keys, seeded.connectors, "all", 2)
            # Organizations outside the held ones and the baseline's, to warm the load path.
            others = seeded.connectors[max(len(held), len(seeded.connectors) - 1 - WARMUP_ORGANIZATIONS) : -1]
            warmup = _spread(bench, keys, others, "warmup", 3)
        baseline_org, baseline_ids = seeded.connectors[-1]
        baseline_token = keys.token(baseline_org)

        # Measured from here on: this process (and PostgreSQL) on core 1, the server on core 0.
        pin(0, HELPER_CPU)
        if postgres is not None:
            pin_tree(_postmaster_pid(postgres), HELPER_CPU)
        # (a) loads each connector by its first call.
        server = start_server(bench, env)
        results.update(
            _measure(args, server, seeded, warmup, spread_a, spread_b, baseline_ids, baseline_token)
        )
        results["server_log_lines"] = server.access_lines()
        server.stop()
        with step(f"marking the {args.held_organizations * 5:,} connectors as called lately"):
            _mark_called(url, [i for _, ids in held for i in ids])
        warm_p99 = results["held"]["p99_ms"]
        cold = f"(c) a new replica under the load of (a) for {args.cold_seconds:.0f} s"
        with step(f"{cold}, filled at start (the default)"):
            filled_env = {**env, "CONNECTORS_PRELOAD_CONNECTORS": "true"}
            results["cold"] = _cold_start(args, bench, filled_env, spread_a, warm_p99)
        with step(f"{cold}, not filled at start"):
            results["cold_misses_only"] = _cold_start(args, bench, env, spread_a, warm_p99)
        server = start_server(bench, env, "misses")
        results.update(_measure_misses(args, server, seeded.rows, spread_b))
        results["machine"] = machine_note()
    report(results, args)
    return results


def _cold_start(
    args: argparse.Namespace, bench: Bench, env: dict[str, str], spread: Path, warm_p99_ms: float
) -> dict[str, Any]:
    started = time.monotonic()
    server = start_server(bench, env, "cold")
    answered_after = time.monotonic() - started
    _wait_ready(server)
    ready_after = time.monotonic() - started
    result, curve = _timeline(args, server, spread)
    limit = COLD_P99_FACTOR * warm_p99_ms
    settled = _settled(curve, limit)
    server.stop()
    return {
        "started_to_healthz_s": round(answered_after, 2),
        "started_to_ready_s": round(ready_after, 2),
        # From the process's start: the seconds to readiness, then the seconds of load.
        "settled_after_start_s": (
            round(ready_after + curve[settled]["second"], 1) if settled is not None else None
        ),
        "warm_p99_ms": warm_p99_ms,
        "limit_p99_ms": round(limit, 2),
        "settled_after_s": curve[settled]["second"] if settled is not None else None,
        "seconds_above": sum(point["p99_ms"] > limit for point in curve),
        "curve": curve,
        "errors": result["errors"],
        "requests": result["requests"],
        "rps": result["rps"],
    }


def _timeline(
    args: argparse.Namespace, server: Server, spread: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``spread`` for ``--cold-seconds``: the result, and the p99 of each second."""
    job = load_job(
        server, args.connections, seconds=args.cold_seconds, targets_file=str(spread), timeline=True
    )
    result = load(job, server)
    records = result.pop("records")
    first = min(record[0] for record in records)
    seconds: dict[int, list[float]] = {}
    for sent, _status, latency_ms, _index in records:
        seconds.setdefault(int(sent - first), []).append(latency_ms)
    curve = []
    for second in sorted(seconds):
        latencies = sorted(seconds[second])
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        curve.append({"second": second, "requests": len(latencies), "p99_ms": round(p99, 2)})
    return result, curve


def _settled(curve: list[dict[str, Any]], limit: float) -> int | None:
    """The index of the first second from which every second's p99 is within ``limit``."""
    return next((i for i in range(len(curve)) if all(point["p99_ms"] <= limit for point in curve[i:])), None)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while httpx.get(f"{server.base_url}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {START_TIMEOUT_SECONDS} s")
        time.sleep(0.02)


def _mark_called(url: str, connector_ids: list[uuid.UUID]) -> None:
    """Mark these connectors as called now, through the repository, as ``app.connectors.usage``
    does for the connectors a replica with preload on serves."""

    async def mark() -> None:
        db = Database(build_engine(url))
        now = datetime.now(UTC)
        try:
            for first in range(0, len(connector_ids), USAGE_BATCH):
                async with db.write() as session:
                    await ConnectorRepository(session).mark_used(
                        connector_ids[first : first + USAGE_BATCH], now, not_since=now
                    )
        finally:
            await db.dispose()

    asyncio.run(mark())


def _postmaster_pid(postgres: PostgresServer) -> int:
    return int((postgres.data_dir / "postmaster.pid").read_text().split()[0])


def _measure(
    args: argparse.Namespace,
    server: Server,
    seeded: Seeded,
    warmup: Path,
    spread_a: Path,
    spread_b: Path,
    baseline_ids: list[Any],
    baseline_token: str,
) -> dict[str, Any]:
    c = args.connections
    results: dict[str, Any] = {}
    held_connectors = args.held_organizations * 5

    def healthz(seconds: float) -> dict[str, Any]:
        return load_job(server, c, seconds=seconds, targets=[healthz_target(baseline_token)])

    def basic5(seconds: float) -> dict[str, Any]:
        targets = [authorize_target(str(i), baseline_token) for i in baseline_ids]
        return load_job(server, c, seconds=seconds, targets=targets)

    def held(seconds: float) -> dict[str, Any]:
        return load_job(server, c, seconds=seconds, targets_file=str(spread_a))

    with step(
        f"warm-up of healthz, the five connectors and the load path ({WARMUP_ORGANIZATIONS * 5:,} others)"
    ):
        load(healthz(1.0))
        load(basic5(1.0))
        # Connections of the pool, compiled statements, SQLite page caches and the allocator's
        # pools reach their working size here, so that the pass below measures the connectors.
        load(load_job(server, c, passes=1, targets_file=str(warmup)))
    results["rss_before_mib"] = round(server.rss_mib(), 1)
    with step(f"one pass over the {held_connectors:,} connectors (each loaded once)"):
        results["held_pass"] = load(load_job(server, c, passes=1, targets_file=str(spread_a)), server)
    results["rss_after_pass_mib"] = round(server.rss_mib(), 1)
    results["held_after_pass"] = server.metric("connectors_held")
    grown = (results["rss_after_pass_mib"] - results["rss_before_mib"]) * MIB
    results["bytes_per_held_connector"] = round(grown / held_connectors)

    with step(f"(a) {args.rounds} rounds of healthz, 5 connectors, {held_connectors:,} connectors"):
        routes = [Route("healthz", healthz), Route("basic5", basic5), Route("held", held)]
        # The spread continues after the pass: its cycle goes on evenly.
        routes[2].next = held_connectors
        measured = measure_rounds(routes, args.rounds, args.seconds, server)
    results.update(measured)
    results["held_vs_basic5_rps"] = round(measured["held"]["rps"] / measured["basic5"]["rps"], 4)
    results["held_vs_healthz_p99"] = round(measured["held"]["p99_ms"] / measured["healthz"]["p99_ms"], 4)
    results["held_vs_basic5_cpu"] = round(
        measured["held"]["server_cpu_us_per_request"] / measured["basic5"]["server_cpu_us_per_request"], 4
    )
    results["rss_after_a_mib"] = round(server.rss_mib(), 1)

    with step(f"(c)'s control: this warm server under the same load for {args.cold_seconds:.0f} s"):
        _, curve = _timeline(args, server, spread_a)
    limit = COLD_P99_FACTOR * measured["held"]["p99_ms"]
    settled = _settled(curve, limit)
    results["warm_curve"] = {
        "settled_after_s": curve[settled]["second"] if settled is not None else None,
        "seconds_above": sum(point["p99_ms"] > limit for point in curve),
        "curve": curve,
    }

    return results


def _measure_misses(args: argparse.Namespace, server: Server, rows: int, spread_b: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"rss_before_b_mib": round(server.rss_mib(), 1)}
    with step(f"(b) spread over all {rows:,} connectors for {args.miss_seconds:.0f} s"):
        results["all"] = load(
            load_job(server, args.connections, seconds=args.miss_seconds, targets_file=str(spread_b)), server
        )
    steady = args.miss_seconds / 2
    with step(f"(b) the same spread for {steady:.0f} s more, with the caches full"):
        job = load_job(server, args.connections, seconds=steady, targets_file=str(spread_b))
        # The cycle of targets continues where the first part stopped.
        job["start"] = int(results["all"]["next"])
        results["all_full"] = load(job, server)
    results["rss_after_b_mib"] = round(server.rss_mib(), 1)
    results["held_after_b"] = server.metric("connectors_held")
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    seed_ = results["seed"]
    held = args.held_organizations * 5
    print(
        f"scale mode: {'SQLite' if args.database == 'sqlite' else 'PostgreSQL (own server)'};"
        f" server on core 0, load generator on core 1; {args.connections} connections;"
        f" {args.rounds} rounds x {args.seconds / args.rounds:.1f} s per route, medians"
    )
    print(results["machine"])
    print(
        f"seeded {seed_['connectors']:,} Basic connectors of {seed_['organizations']:,} organizations"
        f" through BulkRepository.add_all in {seed_['seconds']:.1f} s ({seed_['rows_per_s']:,} rows/s,"
        f" {seed_['batch']:,} rows per transaction)"
    )
    h = results["healthz"]
    print(header())
    print(row("healthz", h, h))
    print(row("authorize 5 connectors, 1 org", results["basic5"], h))
    print(row(f"authorize {held:,}, {args.held_organizations:,} orgs", results["held"], h))
    print(row(f"first pass over the {held:,}", results["held_pass"], h))
    print(row(f"(b) authorize all {seed_['connectors']:,}", results["all"], h))
    print(row("(b) the same, caches full", results["all_full"], h))
    print(LEGEND)
    rps, p99 = results["held_vs_basic5_rps"], results["held_vs_healthz_p99"]
    print(
        f"(a) {held:,} connectors / 5 connectors throughput: {rps:.2f}x (target >= {RPS_TARGET:.2f}:"
        f" {verdict(rps >= RPS_TARGET)})"
    )
    print(
        f"(a) server CPU per request: {results['held']['server_cpu_us_per_request']:.0f} us over {held:,}"
        f" connectors, {results['basic5']['server_cpu_us_per_request']:.0f} us over 5:"
        f" {results['held_vs_basic5_cpu']:.2f}x (the same comparison, less disturbed by other work)"
    )
    print(
        f"(a) {held:,} connectors p99 / healthz p99: {p99:.2f}x (target <= {P99_TARGET:.2f}:"
        f" {verdict(p99 <= P99_TARGET)})"
    )
    print(
        f"memory: server RSS {results['rss_before_mib']:.1f} MiB before the pass, "
        f"{results['rss_after_pass_mib']:.1f} MiB after it ({_count(results['held_after_pass'])} connectors"
        f" held): {results['bytes_per_held_connector']:,} bytes per held connector (its copy, plus a fifth"
        " of a remembered caller token)"
    )
    basic5 = results["basic5"]["rps"]
    for name, b in (("from a new server", results["all"]), ("caches full", results["all_full"])):
        ratio = b["rps"] / basic5
        target = (
            f" (target >= {MISS_RPS_TARGET:.2f}: {verdict(ratio >= MISS_RPS_TARGET)})"
            if b is results["all_full"]
            else ""
        )
        print(
            f"(b) all {seed_['connectors']:,} connectors, caches of 100,000, {name}: {b['rps']:.0f} req/s,"
            f" {ratio:.2f}x the five-connector figure{target}, p50 {b['p50_ms']:.2f} ms, p99"
            f" {b['p99_ms']:.2f} ms, {b['errors']} errors over {b['requests']:,} calls"
        )
    print(
        f"(b) server RSS before {results['rss_before_b_mib']:.1f} MiB, after"
        f" {results['rss_after_b_mib']:.1f} MiB, {_count(results['held_after_b'])} connectors held"
    )
    control = results["warm_curve"]
    print(
        f"(c) control: the warm server of (a) under the same load, by the same rule: within"
        f" {COLD_P99_FACTOR}x from second {control['settled_after_s']}; {control['seconds_above']} of"
        f" {len(control['curve'])} seconds above it"
    )
    print("    p99 ms per second: " + " ".join(f"{point['p99_ms']:.0f}" for point in control["curve"]))
    _report_cold("filled at start (the default)", results["cold"])
    _report_cold("not filled at start (CONNECTORS_PRELOAD_CONNECTORS=false)", results["cold_misses_only"])


def _report_cold(how: str, cold: dict[str, Any]) -> None:
    settled, total = cold["settled_after_s"], cold["settled_after_start_s"]
    print(
        f"(c) {how}: a new replica answered /healthz {cold['started_to_healthz_s']:.1f} s and /readyz"
        f" {cold['started_to_ready_s']:.1f} s after it started; under (a)'s load from then on, its p99"
        f" stayed within {COLD_P99_FACTOR}x of the warm {cold['warm_p99_ms']:.2f} ms from second"
        f" {settled if settled is not None else 'never'} of the load,"
        f" {f'{total:.1f} s' if total is not None else 'never'} after the start (target <="
        f" {COLD_TARGET_SECONDS:.0f}: {verdict(total is not None and total <= COLD_TARGET_SECONDS)});"
        f" {cold['seconds_above']} of {len(cold['curve'])} seconds above it; {cold['rps']:.0f} req/s,"
        f" {cold['errors']} errors over {cold['requests']:,} calls"
    )
    print("    p99 ms per second: " + " ".join(f"{point['p99_ms']:.0f}" for point in cold["curve"]))


def _count(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "?"
