"""Warm mode: authorize of held connectors against ``/healthz`` of the same server.

SQLite, as ``make run``. Connectors are created through the API: one OAuth 2.0 connector whose
token server (local HTTPS, answering after ``TOKEN_DELAY``) was asked once at creation, one
authorization code connector connected through the service's consent callback (the provider's
pages are not what is measured: its redirect is delivered as a browser would), and five Basic
connectors of another organization, called with one caller token: the baseline of the scale
mode. Then the token requests made for 200 concurrent callers of a cold connector, and the calls
that waited on the identity provider during a steady stream over three token lifetimes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from benchmarks.harness import (
    HELPER_CPU,
    LEGEND,
    Bench,
    Keys,
    Route,
    Server,
    header,
    load,
    load_job,
    loadgen_capacity,
    machine_note,
    measure_rounds,
    migrate,
    pin,
    row,
    server_env,
    start_server,
    step,
    verdict,
)
from tests.support.servers import Reply, ScriptedServer
from tests.support.tls import LocalCA

TOKEN_DELAY = 0.25
STEADY_LIFETIME = 6
AUTHORIZE_BODY = json.dumps({"path": "/v1/customers?id=7"})
# In-process token cache; the Redis one may cost more, its targets are looser.
TARGETS = {"rps": 0.9, "p99": 1.2}
REDIS_TARGETS = {"rps": 0.5, "p99": 2.0}


def token_responder(
    lifetime: int, delay: float = TOKEN_DELAY, *, refresh_tokens: bool = False
) -> Callable[[object], Reply]:
    counter = iter(range(1, 1_000_000_000))

    def respond(_request: object) -> Reply:
        answer: dict[str, Any] = {
            "access_token": f"bench-{next(counter)}-{secrets.token_hex(16)}",
            "token_type": "Bearer",
            "expires_in": lifetime,
        }
        if refresh_tokens:
            answer["refresh_token"] = secrets.token_urlsafe(32)
        body = json.dumps(answer).encode()
        return Reply(status=200, headers={"Content-Type": "application/json"}, body=body, delay=delay)

    return respond


def create_oauth(server: Server, token: str, name: str, idp: ScriptedServer, *, validate: bool) -> str:
    body = {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "oauth2",
            "client_id": "bench",
            "client_secret": secrets.token_urlsafe(16),
            "token_url": idp.url("/oauth/token"),
            "scope": "read",
        },
    }
    return _create(server, token, body, validate)


def connect_authorization_code(server: Server, token: str, name: str, idp: ScriptedServer) -> str:
    """An authorization code connector, connected: consent started through the API, the
    provider's redirect (a code for the consent's state) delivered to the callback."""
    body = {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "oauth2",
            "grant_type": "authorization_code",
            "client_id": "bench",
            "client_secret": secrets.token_urlsafe(16),
            "authorization_url": idp.url("/oauth/authorize"),
            "token_url": idp.url("/oauth/token"),
            "scope": "read offline_access",
        },
    }
    connector_id = _create(server, token, body, validate=False)
    started = httpx.post(
        f"{server.base_url}/connectors/{connector_id}/consent",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    started.raise_for_status()
    state = parse_qs(urlsplit(started.json()["authorization_url"]).query)["state"][0]
    page = httpx.get(
        f"{server.base_url}/oauth/callback", params={"state": state, "code": "bench-code"}, timeout=30
    )
    if page.status_code != 200:
        raise RuntimeError(f"the consent did not connect: HTTP {page.status_code}")
    return connector_id


def create_basic(server: Server, token: str, name: str) -> str:
    body = {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "basic",
            "username": f"user-{name}",
            "password": secrets.token_urlsafe(16),
            "validation_url": "https://api.example.com/auth/check",
        },
    }
    return _create(server, token, body, validate=False)


def _create(server: Server, token: str, body: dict[str, Any], validate: bool) -> str:
    response = httpx.post(
        f"{server.base_url}/connectors",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        params={"validate": str(validate).lower()},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["id"])


def authorize_target(connector_id: str, token: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "path": f"/connectors/{connector_id}/authorize",
        "body": AUTHORIZE_BODY,
        "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    }


def healthz_target(token: str) -> dict[str, Any]:
    # The same headers as authorize sends, so both requests cost the same to read.
    return {"method": "GET", "path": "/healthz", "body": "", "headers": {"Authorization": f"Bearer {token}"}}


async def _cold_burst(base: str, token: str, connector_id: str, callers: int) -> list[int]:
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"/connectors/{connector_id}/authorize",
                    json={},
                    headers={"Authorization": f"Bearer {token}"},
                )
                for _ in range(callers)
            )
        )
    return [r.status_code for r in responses]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "warm", "redis": bool(args.redis)}
    with Bench() as bench:
        # This process (and the token servers' threads) on core 1; the server alone on core 0.
        pin(0, HELPER_CPU)
        keys = Keys()
        ca = LocalCA(bench.work)
        settings = {"ca_bundle": str(ca.ca_bundle)}
        if args.redis:
            settings["redis_url"] = args.redis
        env = server_env(bench, keys, f"sqlite+aiosqlite:///{bench.work / 'bench.db'}", **settings)
        migrate(env)
        oauth_token = keys.token("bench")
        basic_token = keys.token("bench-basic")
        with step("load generator against a server that does nothing, on core 0"):
            results["loadgen_capacity"] = loadgen_capacity(
                bench, {"targets": [healthz_target(oauth_token)]}, args.connections, 3.0
            )
        server = start_server(bench, env)
        warm_idp = bench.enter_context(ScriptedServer(ca.server_context()))
        cold_idp = bench.enter_context(ScriptedServer(ca.server_context()))
        steady_idp = bench.enter_context(ScriptedServer(ca.server_context()))
        consent_idp = bench.enter_context(ScriptedServer(ca.server_context()))
        warm_idp.set_default(token_responder(3600))
        consent_idp.set_default(token_responder(3600, refresh_tokens=True))
        cold_idp.set_default(token_responder(3600))
        steady_idp.set_default(token_responder(STEADY_LIFETIME))

        warm = create_oauth(server, oauth_token, "warm", warm_idp, validate=True)
        consented = connect_authorization_code(server, oauth_token, "consented", consent_idp)
        basics = [create_basic(server, basic_token, f"basic-{i}") for i in range(5)]
        c = args.connections

        def healthz(seconds: float) -> dict[str, Any]:
            return load_job(server, c, seconds=seconds, targets=[healthz_target(oauth_token)])

        def oauth(seconds: float) -> dict[str, Any]:
            return load_job(server, c, seconds=seconds, targets=[authorize_target(warm, oauth_token)])

        def authcode(seconds: float) -> dict[str, Any]:
            return load_job(server, c, seconds=seconds, targets=[authorize_target(consented, oauth_token)])

        def basic5(seconds: float) -> dict[str, Any]:
            targets = [authorize_target(b, basic_token) for b in basics]
            return load_job(server, c, seconds=seconds, targets=targets)

        with step(
            f"measuring: {args.rounds} rounds of healthz, authorize oauth, authorization code, basic x5"
        ):
            # Warm-up of every route, not measured.
            for job in (healthz, oauth, authcode, basic5):
                load(job(1.0))
            measured = measure_rounds(
                [
                    Route("healthz", healthz),
                    Route("oauth", oauth),
                    Route("authcode", authcode),
                    Route("basic5", basic5),
                ],
                args.rounds,
                args.seconds,
                server,
            )
        results.update(measured)
        h = measured["healthz"]
        for name in ("oauth", "authcode", "basic5"):
            results[f"{name}_ratio_rps"] = round(measured[name]["rps"] / h["rps"], 4)
            results[f"{name}_ratio_p99"] = round(measured[name]["p99_ms"] / h["p99_ms"], 4)
        results["warm_token_requests"] = warm_idp.count
        results["consent_token_requests"] = consent_idp.count

        with step("cold burst and steady stream"):
            cold = create_oauth(server, oauth_token, "cold", cold_idp, validate=False)
            statuses = asyncio.run(_cold_burst(server.base_url, oauth_token, cold, 200))
            results["cold_burst"] = {
                "callers": 200,
                "ok": statuses.count(200),
                "token_requests": cold_idp.count,
            }
            steady = create_oauth(server, oauth_token, "steady", steady_idp, validate=False)
            httpx.post(
                f"{server.base_url}/connectors/{steady}/authorize",
                json={},
                headers={"Authorization": f"Bearer {oauth_token}"},
                timeout=30,
            ).raise_for_status()
            before = steady_idp.count
            target = {**authorize_target(steady, oauth_token), "body": "{}"}
            stream = load(load_job(server, 8, seconds=STEADY_LIFETIME * 3 + 1, targets=[target], raw=True))
            waited = sum(1 for ms in stream.pop("latencies_ms") if ms >= TOKEN_DELAY * 1000)
            results["steady_stream"] = {
                **stream,
                "token_lifetime_s": STEADY_LIFETIME,
                "idp_delay_ms": TOKEN_DELAY * 1000,
                "calls_waiting_on_idp": waited,
                "token_requests": steady_idp.count - before,
            }
        results["server_rss_mib"] = round(server.rss_mib(), 1)
        results["access_log_lines"] = server.access_lines()
        results["machine"] = machine_note()
    report(results, args)
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    targets = REDIS_TARGETS if results["redis"] else TARGETS
    h = results["healthz"]
    cap = results["loadgen_capacity"]
    print(
        f"warm mode: SQLite, {'Redis shared' if results['redis'] else 'in-process'} token cache;"
        f" server on core 0, load generator on core 1; {args.connections} connections;"
        f" {args.rounds} rounds x {args.seconds / args.rounds:.1f} s per route, medians"
    )
    print(results["machine"])
    print(
        f"load generator against a server doing nothing on core 0: {cap['rps']:.0f} req/s"
        f" ({cap['rps'] / h['rps']:.1f}x healthz), {cap['loadgen_cpu_us_per_request']:.1f} us of"
        " its CPU per request"
    )
    print(header())
    print(row("healthz", h, h))
    print(row("authorize oauth (1 connector)", results["oauth"], h))
    print(row("authorize authorization code (1)", results["authcode"], h))
    print(row("authorize basic (5 connectors)", results["basic5"], h))
    print(LEGEND)
    rps, p99 = results["oauth_ratio_rps"], results["oauth_ratio_p99"]
    print(
        f"authorize oauth / healthz: throughput {rps:.2f}x (target >= {targets['rps']:.2f}:"
        f" {verdict(rps >= targets['rps'])}), p99 {p99:.2f}x (target <= {targets['p99']:.2f}:"
        f" {verdict(p99 <= targets['p99'])})"
    )
    rps, p99 = results["authcode_ratio_rps"], results["authcode_ratio_p99"]
    print(
        f"authorize authorization code / healthz: throughput {rps:.2f}x (target >= {targets['rps']:.2f}:"
        f" {verdict(rps >= targets['rps'])}), p99 {p99:.2f}x (target <= {targets['p99']:.2f}:"
        f" {verdict(p99 <= targets['p99'])}); token requests: {results['consent_token_requests']}"
        " (the code exchange)"
    )
    print(
        f"server CPU per request: healthz {h['server_cpu_us_per_request']:.0f} us, authorize oauth"
        f" {results['oauth']['server_cpu_us_per_request']:.0f} us"
        f" ({results['oauth']['server_cpu_us_per_request'] / h['server_cpu_us_per_request']:.2f}x)"
    )
    print(
        f"authorize basic x5 / healthz: throughput {results['basic5_ratio_rps']:.2f}x,"
        f" p99 {results['basic5_ratio_p99']:.2f}x (the baseline of the scale mode)"
    )
    print(
        f"token requests of the warm connector while measured: {results['warm_token_requests']} (at creation)"
    )
    cb = results["cold_burst"]
    print(
        f"cold burst: {cb['callers']} callers, {cb['ok']} answered 200,"
        f" {cb['token_requests']} token request(s) (target 1)"
    )
    st = results["steady_stream"]
    print(
        f"steady stream over 3 x {STEADY_LIFETIME}s token lifetimes: {st['requests']} calls, "
        f"{st['calls_waiting_on_idp']} waited on the identity provider (target 0), "
        f"{st['token_requests']} token requests, p99 {st['p99_ms']:.2f} ms"
    )
    print(
        f"server RSS at the end: {results['server_rss_mib']:.1f} MiB;"
        f" access log lines written: {results['access_log_lines']:,}"
    )
