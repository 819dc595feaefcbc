"""Servers and workers: the same application under uvicorn (what ``serve`` runs) and granian, then
``serve --workers 2``.

Usage: ``make bench-servers`` (``python -m benchmarks.servers [--seconds S] [--rounds R]
[--connections C] [--json]``).

SQLite, as ``make run``; one OAuth 2.0 connector whose token was fetched once (warm authorize).

1. **Servers, one core.** uvicorn (``python -m app serve``) and granian (``granian --interface asgi
   --factory app.main:from_environment``, one worker, one runtime thread, uvloop, its access log
   off: the application writes its own, as under uvicorn) both run on core 0 at once, on two
   ports; the load generator runs on core 1. Rounds take turns: ``/healthz`` and warm authorize
   on each server, so a drifting machine weighs on each alike. Per route: requests per second,
   p99 and the server's CPU time per answered request, which a busy machine disturbs least.
2. **Workers.** ``serve --workers 2`` pinned to core 0 (what a second process costs on one core),
   then on both cores, sharing core 1 with the load generator: this machine has two cores, so the
   load generator cannot have one of its own beside two workers; its share is printed. Without
   Redis each worker fetches its own token: the token requests are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from benchmarks.harness import (
    HELPER_CPU,
    LEGEND,
    SERVE,
    SERVER_CPU,
    Bench,
    Keys,
    Server,
    free_port,
    header,
    load,
    load_job,
    loadgen_capacity,
    machine_note,
    median_of,
    migrate,
    pin,
    row,
    server_env,
    start_server,
    step,
    unsupported_reason,
)
from benchmarks.warm import authorize_target, create_oauth, healthz_target, token_responder
from tests.support.servers import ScriptedServer
from tests.support.tls import LocalCA

# Adopted only if ahead by this much in server CPU per request, at no worse p99.
ADOPT_CPU_GAIN = 0.20


def granian_command(port: int, extra: list[str]) -> list[str]:
    granian = shutil.which("granian", path=str(SERVE[0]).rsplit("/", 1)[0]) or "granian"
    return [
        granian,
        "--interface",
        "asgi",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--runtime-threads",
        "1",
        "--runtime-mode",
        "st",
        "--loop",
        "uvloop",
        "--no-ws",
        "--no-access-log",
        "--http",
        "1",
        "--http1-header-read-timeout",
        "10000",
        *extra,  # later options win: --granian-args "--runtime-mode mt"
        "app.main:from_environment",
    ]


def measure(
    servers: dict[str, Server], jobs: dict[str, Any], rounds: int, seconds: float
) -> dict[str, dict[str, Any]]:
    """Each (server, route) in turn, ``rounds`` times; the medians."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for server_name, server in servers.items():
            for route, job in jobs.items():
                runs.setdefault(f"{server_name} {route}", []).append(
                    load(job(server, seconds / rounds), server)
                )
    return {name: median_of(results) for name, results in runs.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "servers"}
    with Bench() as bench:
        pin(0, HELPER_CPU)
        keys = Keys()
        ca = LocalCA(bench.work)
        env = server_env(
            bench, keys, f"sqlite+aiosqlite:///{bench.work / 'bench.db'}", ca_bundle=str(ca.ca_bundle)
        )
        migrate(env)
        token = keys.token("bench")
        idp = bench.enter_context(ScriptedServer(ca.server_context()))
        idp.set_default(token_responder(3600))
        c = args.connections
        with step("load generator against a server that does nothing, on core 0"):
            results["loadgen_capacity"] = loadgen_capacity(
                bench, {"targets": [healthz_target(token)]}, c, 3.0
            )

        uvicorn = start_server(bench, env, "uvicorn")
        connector = create_oauth(uvicorn, token, "warm", idp, validate=True)
        granian_env = {**env, "CONNECTORS_PORT": str(free_port())}
        granian = start_server(
            bench,
            granian_env,
            "granian",
            command=granian_command(int(granian_env["CONNECTORS_PORT"]), args.granian_args.split()),
        )

        def healthz(server: Server, seconds: float) -> dict[str, Any]:
            return load_job(server, c, seconds=seconds, targets=[healthz_target(token)])

        def authorize(server: Server, seconds: float) -> dict[str, Any]:
            return load_job(server, c, seconds=seconds, targets=[authorize_target(connector, token)])

        jobs = {"healthz": healthz, "authorize": authorize}
        servers = {"uvicorn": uvicorn, "granian": granian}
        with step(f"servers: {args.rounds} rounds of healthz and authorize on uvicorn and granian"):
            for server in servers.values():
                for job in jobs.values():
                    load(job(server, 1.0))  # warm-up, not measured
            results["servers"] = measure(servers, jobs, args.rounds, args.seconds)
        results["servers_access_log_lines"] = {name: s.access_lines() for name, s in servers.items()}
        for server in servers.values():
            server.stop()

        if args.skip_workers:
            results["machine"] = machine_note()
            report(results, args)
            return results
        with step("workers: serve --workers 2, on core 0, then on both cores"):
            before = idp.count
            worker_env = {**env, "CONNECTORS_PORT": str(free_port()), "CONNECTORS_WORKERS": "2"}
            one_core = start_server(bench, worker_env, "workers-one-core")
            for _ in range(4):
                load(authorize(one_core, 0.5))  # reaches both workers: each fetches its token
            results["workers_token_requests"] = idp.count - before
            one = measure({"2 workers, core 0": one_core}, jobs, args.rounds, args.seconds)
            one_core.stop()
            worker_env = {**worker_env, "CONNECTORS_PORT": str(free_port())}
            both = start_server(bench, worker_env, "workers-both", cpus=f"{SERVER_CPU},{HELPER_CPU}")
            for _ in range(4):
                load(authorize(both, 0.5))
            two = measure({"2 workers, cores 0-1": both}, jobs, args.rounds, args.seconds)
            both.stop()
            results["workers"] = {**one, **two}
        results["machine"] = machine_note()
    report(results, args)
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    cap = results["loadgen_capacity"]
    width = 34
    print(f"\nserver comparison: {args.connections} connections, {args.rounds} rounds,", end=" ")
    print(f"{args.seconds:.0f} s per route; granian options added: {args.granian_args or 'none'}")
    print(f"load generator alone against a null server: {cap['rps']:.0f} req/s\n")
    print(header(width))
    measured = results["servers"]
    _print_rows(measured, ("uvicorn", "granian"), width)
    print(LEGEND)
    for route in ("healthz", "authorize"):
        u, g = measured[f"uvicorn {route}"], measured[f"granian {route}"]
        ratio = g["server_cpu_us_per_request"] / u["server_cpu_us_per_request"]
        print(
            f"{route}: granian's CPU per request {ratio:.2f}x uvicorn's (adopt at"
            f" {1 - ADOPT_CPU_GAIN:.2f}x or less), p99 {g['p99_ms']:.2f} vs {u['p99_ms']:.2f} ms"
        )
    print(f"access log lines: {results['servers_access_log_lines']}")
    if "workers" not in results:
        print(results["machine"])
        return
    one = f"{measured['uvicorn healthz']['rps']:.0f} / {measured['uvicorn authorize']['rps']:.0f} req/s"
    print(f"\nserve --workers 2 (one worker: {one} for healthz / authorize, above)")
    print(header(width))
    _print_rows(results["workers"], ("2 workers, core 0", "2 workers, cores 0-1"), width)
    print(f"token requests for one connector by 2 workers without Redis: {results['workers_token_requests']}")
    print(results["machine"])


def _print_rows(measured: dict[str, Any], setups: tuple[str, ...], width: int) -> None:
    """Each setup's two routes, with ratios to its own /healthz."""
    for setup in setups:
        base = measured[f"{setup} healthz"]
        for route in ("healthz", "authorize"):
            print(row(f"{setup} {route}", measured[f"{setup} {route}"], base, width))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per route, all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--granian-args", default="", help="more granian options (the last of one name wins)")
    parser.add_argument("--skip-workers", action="store_true", help="compare the servers only")
    args = parser.parse_args(argv)
    reason = unsupported_reason()
    if reason:
        print(f"benchmark not run: {reason}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
