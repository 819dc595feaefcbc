"""Benchmarks of /authorize, measured the way production sees it.

One command, three modes::

    python -m benchmarks.authorize [--mode warm]                  # make bench
    python -m benchmarks.authorize --mode scale --database sqlite      # make bench-scale
    python -m benchmarks.authorize --mode scale --database postgresql  # make bench-scale-postgresql
    python -m benchmarks.authorize --mode outage                       # make bench-outage

Every mode starts the real server as ``make run`` does (``python -m app serve``: uvicorn, access
log on, its JSON lines written to a file) pinned to core 0 with ``taskset -c 0``; the load
generator (``benchmarks/loadgen.py``, its own process) runs on core 1 with this process, the
local HTTPS token servers and any PostgreSQL of the benchmark's own. 32 keep-alive connections
(``--connections``) keep requests queued at the server. Figures are requests/s and p50/p99
latency, and ratios against ``GET /healthz`` of the same server measured in the same run: the
routes take turns over ``--rounds`` rounds of 3 s (``--seconds`` per route, split over them: 12
in 4 rounds, in the scale mode 36 in 12) and each figure is the median of its rounds. The
server's CPU time per answered request is printed too: other work on the machine changes it far
less than throughput. Everything started is stopped, and the temporary
directory deleted, when the mode ends, fails or is interrupted (Ctrl-C).

**warm** (``benchmarks/warm.py``): SQLite. Warm authorize of one OAuth 2.0 connector (token from
a local HTTPS token server, fetched once at creation); targets: throughput >= 0.9x and p99 <=
1.2x ``/healthz`` (``--redis URL``: the shared token cache; targets 0.5x and 2x). Also five Basic
connectors of one organization with one caller token (the baseline of the scale mode), the token
requests for 200 concurrent callers of a cold connector (target 1), and the calls that waited on
the identity provider over three token lifetimes of a steady stream (target 0). First, what the
load generator reaches against ``benchmarks/null_server.py`` on core 0: it must be well above
what the service answers.

**scale** (``benchmarks/scale.py``): ``--database sqlite`` or ``postgresql`` (a PostgreSQL of the
benchmark's own from ``tests/support/postgres.py``, never the machine's shared server), migrated
with ``python -m app migrate``, then seeded through the repository (``benchmarks/seed.py``):
500,000 Basic connectors of 100,000 organizations (``--organizations``), the time printed. Then:
(a) authorize spread evenly over the 50,000 connectors of 10,000 organizations
(``--held-organizations``), each request with its organization's caller token, after a warm-up
of the load path over 10,000 other connectors and one pass that touches every target once;
targets: throughput >= 0.9x the five-connector figure and p99 <= 1.5x ``/healthz``, all of the
same run; the server's RSS before and after that pass gives the memory per held connector.
(b) authorize spread over all 500,000 for ``--miss-seconds`` (60) with the default cache sizes
(100,000): nearly every call loads its connector; requests/s, p50/p99 and the server's RSS
afterwards.

**outage** (``benchmarks/outage.py``): the server over a PostgreSQL of its own; one OAuth 2.0
connector (tokens live 20 s, so renewals fall in the outage) and three Basic connectors, warm,
under a steady paced load (``--rate``, 400 requests/s over the connections). After 5 s the
PostgreSQL stops (``fast``) for 30 s (``--outage-seconds``) and starts again. Printed: failed
authorizes (target 0), once a second what ``GET /connectors``, a ``PATCH`` and ``/readyz`` answer
during the outage (503 ``database_unavailable`` with ``Retry-After`` expected from CRUD), the
token requests made during the outage, and the recovery time from PostgreSQL being back to CRUD
answering 200.

``--json`` prints the results as one JSON object as well.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.harness import unsupported_reason


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.authorize",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mode", choices=["warm", "scale", "outage"], default="warm")
    parser.add_argument(
        "--seconds", type=float, help="per measured route, over all rounds (warm 12, scale 36)"
    )
    parser.add_argument("--rounds", type=int, help="turns the measured routes take (warm 4, scale 12)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    warm = parser.add_argument_group("warm")
    warm.add_argument("--redis", metavar="URL", help="run the server with CONNECTORS_REDIS_URL set")
    scale = parser.add_argument_group("scale")
    scale.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    scale.add_argument("--organizations", type=int, default=100_000, help="5 Basic connectors each")
    scale.add_argument(
        "--held-organizations", type=int, default=10_000, help="spread (a) over their connectors"
    )
    scale.add_argument("--miss-seconds", type=float, default=60.0, help="length of (b)")
    scale.add_argument("--batch", type=int, default=5000, help="seeded rows per transaction")
    scale.add_argument(
        "--cold-seconds", type=float, default=60.0, help="length of (c), a new replica under (a)'s load"
    )
    outage = parser.add_argument_group("outage")
    outage.add_argument("--rate", type=float, default=400.0, help="authorize requests per second")
    outage.add_argument("--outage-seconds", type=float, default=30.0)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    seconds, rounds = (36.0, 12) if args.mode == "scale" else (12.0, 4)
    args.seconds = args.seconds or seconds
    args.rounds = args.rounds or rounds
    if (reason := unsupported_reason()) is not None:
        sys.exit(f"benchmarks: {reason}")
    if args.mode == "warm":
        from benchmarks import warm

        results = warm.run(args)
    elif args.mode == "scale":
        from benchmarks import scale

        results = scale.run(args)
    else:
        from benchmarks import outage

        results = outage.run(args)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
