"""Outage mode: authorize keeps answering while the database is away; CRUD says 503, then recovers.

The server runs over a PostgreSQL of the benchmark's own (``tests/support/postgres.py``; the
machine's shared server is never touched). One OAuth 2.0 connector, whose local HTTPS token
server issues short-lived tokens so that renewals fall inside the outage, and three Basic
connectors are created through the API and called once. A paced load across the four runs
throughout (``benchmarks.loadgen``, every request recorded with its time and outcome). After
``PRE_SECONDS`` the PostgreSQL stops (``pg_ctl stop -m fast``); once a second until it starts
again this process asks ``GET /connectors``, a ``PATCH`` of a connector's name and ``/readyz``.
Then it starts PostgreSQL again and measures how long CRUD takes to answer 200.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from benchmarks.harness import (
    HELPER_CPU,
    Bench,
    Keys,
    finish_load,
    load_job,
    machine_note,
    migrate,
    pin,
    server_env,
    start_load,
    start_server,
    step,
    verdict,
)
from benchmarks.warm import authorize_target, create_basic, create_oauth, token_responder
from tests.support.postgres import PostgresServer
from tests.support.servers import ScriptedServer
from tests.support.tls import LocalCA

PRE_SECONDS = 5.0
POST_SECONDS = 15.0
TOKEN_LIFETIME = 20
TOKEN_DELAY = 0.05
RECOVERY_TIMEOUT = 60.0


def _probe(client: httpx.Client, method: str, path: str, **kw: Any) -> dict[str, Any]:
    started = time.time()
    try:
        response = client.request(method, path, **kw)
    except httpx.HTTPError as error:
        return {"t": started, "status": 0, "code": type(error).__name__, "ms": (time.time() - started) * 1000}
    body: dict[str, Any] = {}
    if response.headers.get("content-type", "").endswith("json"):
        try:
            body = response.json()
        except ValueError:
            body = {}
    return {
        "t": started,
        "status": response.status_code,
        "code": body.get("code") if isinstance(body, dict) else None,
        "retry_after": response.headers.get("retry-after"),
        "body": body if path == "/readyz" else None,
        "ms": round((time.time() - started) * 1000, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "outage"}
    outage_seconds = args.outage_seconds
    with Bench() as bench:
        # This process, the token server and PostgreSQL on core 1; the server alone on core 0.
        pin(0, HELPER_CPU)
        keys = Keys()
        ca = LocalCA(bench.work)
        with step("starting a PostgreSQL of the benchmark's own"):
            postgres = bench.enter_context(PostgresServer())
            url = postgres.create_database("bench")
        env = server_env(bench, keys, url, ca_bundle=str(ca.ca_bundle))
        migrate(env)
        server = start_server(bench, env)
        idp = bench.enter_context(ScriptedServer(ca.server_context()))
        idp.set_default(token_responder(TOKEN_LIFETIME, delay=TOKEN_DELAY))
        token = keys.token("outage")
        oauth = create_oauth(server, token, "oauth", idp, validate=True)
        basics = [create_basic(server, token, f"basic-{i}") for i in range(3)]
        connectors = [oauth, *basics]
        auth = {"Authorization": f"Bearer {token}"}
        client = bench.enter_context(httpx.Client(base_url=server.base_url, headers=auth, timeout=15))
        for connector in connectors:
            client.post(f"/connectors/{connector}/authorize", json={}).raise_for_status()

        total = PRE_SECONDS + outage_seconds + POST_SECONDS
        job = load_job(
            server,
            args.connections,
            seconds=total,
            rate=args.rate,
            timeline=True,
            targets=[authorize_target(c, token) for c in connectors],
        )
        patched = basics[-1]
        patches = iter(range(1, 1_000_000))

        def patch() -> dict[str, Any]:
            return _probe(
                client, "PATCH", f"/connectors/{patched}", json={"name": f"renamed-{next(patches)}"}
            )

        with step(
            f"steady load of {args.rate:.0f} authorize/s; PostgreSQL stopped after {PRE_SECONDS:.0f} s"
            f" for {outage_seconds:.0f} s"
        ):
            process, out = start_load(bench, job)
            load_started = time.time()
            time.sleep(PRE_SECONDS)
            results["token_requests_before"] = idp.count
            stop_began = time.time()
            postgres.stop("fast")
            stopped = time.time()
            tokens_at_stop = idp.count
            probes: list[dict[str, Any]] = []
            for k in range(int(outage_seconds)):
                _sleep_until(stopped + k)
                probes.append(
                    {
                        "k": k,
                        "list": _probe(client, "GET", "/connectors"),
                        "patch": patch(),
                        "readyz": _probe(client, "GET", "/readyz"),
                    }
                )
            _sleep_until(stopped + outage_seconds)
            start_began = time.time()
            postgres.start()
            back = time.time()
            tokens_at_start = idp.count
            recovery = _recover(client, patch, back)
            results["load"] = finish_load(process, out, timeout=total + 120)
        log_text = server.log.read_text(errors="replace")
        results["server_log"] = _outage_log_lines(log_text)
        results["slow_access_lines"] = _slow_access_lines(log_text)
        results["machine"] = machine_note()

    records = results["load"].pop("records")
    results.update(
        {
            "load_started": load_started,
            "stop_began": stop_began,
            "stopped": stopped,
            "start_began": start_began,
            "back": back,
            "stop_took_s": round(stopped - stop_began, 2),
            "start_took_s": round(back - start_began, 2),
            "token_lifetime_s": TOKEN_LIFETIME,
            "token_requests_during_outage": tokens_at_start - tokens_at_stop,
            "token_requests_total": tokens_at_start,
            "probes": probes,
            "recovery": recovery,
            "authorize": _phases(records, stop_began, back, connectors),
            "per_second": _per_second(records, stopped, int(outage_seconds)),
            # The slowest calls, seconds from the stop: [sent, outcome, latency ms, connector].
            "slowest": [
                [round(sent - stopped, 3), label, latency, ["oauth", "basic-0", "basic-1", "basic-2"][t]]
                for sent, label, latency, t in sorted(records, key=lambda r: -r[2])[:5]
                if t >= 0
            ],
        }
    )
    report(results, args)
    return results


def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


def _recover(client: httpx.Client, patch: Any, back: float) -> dict[str, Any]:
    """Ask GET /connectors, then PATCH, every 50 ms until each answers 200."""
    found: dict[str, Any] = {}
    attempts = {"list": 0, "patch": 0}
    while time.time() - back < RECOVERY_TIMEOUT and len(found) < 2:
        for name in ("list", "patch"):
            if name in found:
                continue
            attempts[name] += 1
            result = _probe(client, "GET", "/connectors") if name == "list" else patch()
            if result["status"] == 200:
                found[name] = {**result, "after_s": round(time.time() - back, 3), "attempts": attempts[name]}
        time.sleep(0.05)
    return found


def _phases(
    records: list[list[Any]], stop_began: float, back: float, connectors: list[str]
) -> dict[str, Any]:
    """Authorize calls and failures before, during and after the outage, per connector."""
    phases: dict[str, dict[str, Any]] = {
        name: {"calls": 0, "failed": 0, "by_outcome": {}, "failed_by_connector": {}}
        for name in ("before", "during", "after")
    }
    kinds = ["oauth", "basic-0", "basic-1", "basic-2"]
    for sent, label, _latency, target in records:
        phase = phases["before" if sent < stop_began else "during" if sent < back else "after"]
        phase["calls"] += 1
        if label != "200":
            phase["failed"] += 1
            phase["by_outcome"][label] = phase["by_outcome"].get(label, 0) + 1
            kind = kinds[target] if 0 <= target < len(kinds) else "no connection"
            phase["failed_by_connector"][kind] = phase["failed_by_connector"].get(kind, 0) + 1
    latencies = sorted(r[2] for r in records if stop_began <= r[0] < back)
    phases["during"]["p99_ms"] = latencies[int(len(latencies) * 0.99)] if latencies else None
    return phases


def _per_second(records: list[list[Any]], stopped: float, seconds: int) -> list[dict[str, Any]]:
    rows = [{"ok": 0, "failed": 0, "max_ms": 0.0} for _ in range(seconds)]
    for sent, label, latency, _target in records:
        offset = sent - stopped
        k = int(offset)
        if offset >= 0 and k < seconds:
            rows[k]["ok" if label == "200" else "failed"] += 1
            rows[k]["max_ms"] = max(rows[k]["max_ms"], latency)
    return rows


def _slow_access_lines(text: str, threshold_ms: float = 20.0) -> list[dict[str, Any]]:
    """Access lines of requests the server itself took ``threshold_ms`` or more to answer."""
    slow: list[dict[str, Any]] = []
    for line in text.splitlines():
        if '"connectors.access"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("duration_ms", 0) >= threshold_ms:
            slow.append({k: entry.get(k) for k in ("time", "method", "route", "status", "duration_ms")})
    return slow[:20]


def _outage_log_lines(text: str) -> list[str]:
    """The server's own lines about the database (not the access lines)."""
    return [line for line in text.splitlines() if "database" in line and '"connectors.access"' not in line][
        :20
    ]


def _answer(probe: dict[str, Any]) -> str:
    if probe["status"] == 0:
        return f"no answer ({probe['code']})"
    text = f"{probe['status']}"
    if probe.get("code"):
        text += f" {probe['code']}"
    if probe.get("retry_after"):
        text += f" RA={probe['retry_after']}"
    body = probe.get("body")
    if body and "status" in body:
        text += f" {body['status']}"
        if "memory_valid_for_s" in body:
            text += f" ({body['memory_valid_for_s']}s left)"
    return text


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    phases = results["authorize"]
    load = results["load"]
    print(
        f"outage mode: PostgreSQL of the benchmark's own; server on core 0, load generator on core 1;"
        f" {args.rate:.0f} authorize/s paced over {args.connections} connections across 1 OAuth 2.0"
        f" (token lifetime {results['token_lifetime_s']} s) and 3 Basic connectors"
    )
    print(results["machine"])
    print(
        f"PostgreSQL stopped (fast) {results['stop_began'] - results['load_started']:.1f} s into the load"
        f" (the stop took {results['stop_took_s']:.2f} s), down for"
        f" {results['start_began'] - results['stopped']:.1f} s, start took {results['start_took_s']:.2f} s"
    )
    print(
        f"{'t s':>4}  {'GET /connectors':<34}{'PATCH /connectors/{id}':<34}{'/readyz':<30}"
        "authorize ok/failed, max ms"
    )
    for probe, second in zip(results["probes"], results["per_second"], strict=False):
        print(
            f"{probe['k']:>4}  {_answer(probe['list']):<34}{_answer(probe['patch']):<34}"
            f"{_answer(probe['readyz']):<30}{second['ok']:>5}/{second['failed']:<3} {second['max_ms']:>8.1f}"
        )
    failed = sum(p["failed"] for p in phases.values())
    print(
        f"authorize: {load['requests']:,} calls, {failed} failed (target 0: {verdict(failed == 0)});"
        f" before {phases['before']['calls']:,}/{phases['before']['failed']} failed,"
        f" during {phases['during']['calls']:,}/{phases['during']['failed']} failed"
        f" (p99 {phases['during']['p99_ms']} ms),"
        f" after {phases['after']['calls']:,}/{phases['after']['failed']} failed;"
        f" overall p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms"
    )
    for name, phase in phases.items():
        if phase["failed"]:
            print(f"  failures {name}: {phase['by_outcome']} by connector {phase['failed_by_connector']}")
    print(
        f"token requests during the outage: {results['token_requests_during_outage']}"
        f" (renewals of a {results['token_lifetime_s']} s token; {results['token_requests_total']} in all)"
    )
    recovery = results["recovery"]
    for name, label in (("list", "GET /connectors"), ("patch", "PATCH")):
        if name in recovery:
            print(
                f"recovery: {label} answered 200 {recovery[name]['after_s'] * 1000:.0f} ms after PostgreSQL"
                f" accepted connections again (attempt {recovery[name]['attempts']})"
            )
        else:
            print(f"recovery: {label} did not answer 200 within {RECOVERY_TIMEOUT:.0f} s: MISSED")
    print(f"slowest authorize calls (s after the stop, outcome, ms, connector): {results['slowest']}")
    slow = results["slow_access_lines"]
    print(f"requests the server itself took >= 20 ms to answer (access log): {len(slow)}")
    for entry in slow[:5]:
        print(f"  {entry}")
    for line in results["server_log"]:
        print(f"  server log: {line}")
