"""Noisy neighbours: what organization A sees while organization B attacks, one attack at a time.

    python -m benchmarks.neighbours        # make bench-neighbours

The server is ``python -m app serve`` on SQLite, pinned to core 0, resolving host names with a DNS
server of the benchmark's own (``CONNECTORS_DNS_SERVERS``; ``tests/support/dns.py``) that answers
``idp.example.test`` and never answers any name under ``dark.example.test``. Everything else (this
process, the load generator, the token server, the webhook receivers, the attackers) shares core 1.

Organization A: one OAuth 2.0 connector whose token server is found by name and issues 2 s tokens
(so a renewal, a new connection and a name lookup every 1.4 s or so), under a paced load of
``--rate`` authorize calls per second over 32 connections, and a webhook subscription to a
receiver of its own. Per phase, A's figures: authorize p50/p99 and failed calls (target: none),
the token requests made (renewals kept going), and the delay of A's webhook events (a rename of
A's connector every second; the time until A's receiver has it; target under 2 s).

Phases, each ``--seconds`` long (10), in turn: **alone**; then B's attacks, each followed by
**after** (A in the ``--recovery-seconds`` after B stopped, per second: the first second whose p99
is within 1.5x of alone, target within 5 s):

* **dns**: B's 20 connectors have token URLs under ``dark.example.test``; 20 callers of B call
  authorize on them, each every 50 ms (400 calls/s in all: the volume of B's calls is not what
  is measured, and per-caller rate limits belong to the proxy in front).
* **keys**: B saves ``private_key_jwt`` connectors with 4096-bit RSA keys, four at a time, and
  deletes them, without pause but for the ``Retry-After`` of a ``429 key_checks_busy``.
* **webhooks**: B's receiver holds every request until its deadline (10 s); 30 of B's events are
  queued before the phase starts and one more comes every second.
* **slow clients**: 800 connections that send part of a request's headers and nothing more,
  opened again as soon as the server closes one; printed: how many the server closed.

Targets (issue "One tenant can stop every tenant"): no failed call of A, A's p99 within 1.5x of
alone, A's webhook delay under 2 s, A back to normal within 5 s of B stopping. ``--json`` prints
the results as one JSON object too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from benchmarks.harness import (
    HELPER_CPU,
    Bench,
    Keys,
    Server,
    finish_load,
    load_job,
    machine_note,
    migrate,
    pin,
    server_env,
    start_load,
    start_server,
    step,
    unsupported_reason,
    verdict,
)
from benchmarks.warm import authorize_target, token_responder
from tests.support.dns import DNSServer
from tests.support.servers import ScriptedServer
from tests.support.tls import LocalCA
from tests.support.webhook_receiver import WebhookReceiver

IDP_HOST = "idp.example.test"
DARK = "dark.example.test"
TOKEN_LIFETIME = 2
P99_TARGET = 1.5
DELAY_TARGET_S = 2.0
RECOVERY_TARGET_S = 5
PARTIAL = b"POST /connectors HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
# Each of B's 20 callers in the dns attack calls this often (400 calls/s in all): what is measured
# is what B's unanswerable names do to A, not what any caller's request volume does to a core
# (per-caller rate limits are the proxy's).
CALL_INTERVAL_S = 0.05


class Attack:
    """B's load for one phase: started in threads on core 1, stopped and joined by ``stop``."""

    def __init__(self, name: str, workers: list[Callable[[threading.Event], None]]) -> None:
        self.name = name
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=work, args=(self._stop,), daemon=True) for work in workers]
        self.notes: dict[str, Any] = {}

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _client(server: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _oauth_body(name: str, token_url: str) -> dict[str, Any]:
    return {
        "name": name,
        "resource_domain_url": "https://api.example.com",
        "auth": {
            "type": "oauth2",
            "client_id": "bench",
            "client_secret": secrets.token_urlsafe(16),
            "token_url": token_url,
        },
    }


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def dns_attack(server: Server, token: str) -> Attack:
    with _client(server, token) as client:
        ids = []
        for i in range(20):
            created = client.post(
                "/connectors?validate=false",
                json=_oauth_body(f"dark {i}", f"https://h{i}.{DARK}/oauth/token"),
            )
            created.raise_for_status()
            ids.append(created.json()["id"])
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def caller(connector_id: str) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            with _client(server, token) as client:
                while not stop.wait(CALL_INTERVAL_S):
                    answer = client.post(f"/connectors/{connector_id}/authorize", json={})
                    code = answer.json().get("code", str(answer.status_code))
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

        return work

    attack = Attack("dns", [caller(connector_id) for connector_id in ids])
    attack.notes["b_answers"] = codes
    return attack


def keys_attack(server: Server, token: str, pems: list[str]) -> Attack:
    saved, busy = [0], [0]
    lock = threading.Lock()

    def saver(pem: str, number: int) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            with _client(server, token) as client:
                while not stop.is_set():
                    body = _oauth_body(f"keyed {number}", "https://127.0.0.1:9/oauth/token")
                    del body["auth"]["client_secret"]
                    body["auth"].update(client_auth_method="private_key_jwt", private_key=pem)
                    created = client.post("/connectors?validate=false", json=body)
                    if created.status_code == 201:
                        with lock:
                            saved[0] += 1
                        client.delete(f"/connectors/{created.json()['id']}")
                    elif created.status_code == 429:
                        # Refused at once while B's other keys are checked: B waits as told.
                        with lock:
                            busy[0] += 1
                        stop.wait(float(created.headers.get("retry-after", "1")))

        return work

    attack = Attack("keys", [saver(pem, number) for number, pem in enumerate(pems)])
    attack.notes["saves"] = saved
    attack.notes["refused_busy"] = busy
    return attack


def webhook_attack(server: Server, token: str, slow: WebhookReceiver) -> Attack:
    with _client(server, token) as client:
        hook = client.post("/webhooks", json={"url": slow.url("/hooks")})
        hook.raise_for_status()
        slow.trust("/hooks", hook.json()["secret"])
        created = client.post(
            "/connectors?validate=false", json=_oauth_body("events", "https://127.0.0.1:9/t")
        )
        created.raise_for_status()
        connector_id = created.json()["id"]
        slow.hold()
        for i in range(30):
            client.patch(f"/connectors/{connector_id}", json={"name": f"events {i}"}).raise_for_status()

    def renamer(stop: threading.Event) -> None:
        with _client(server, token) as client:
            number = 30
            while not stop.wait(1.0):
                client.patch(f"/connectors/{connector_id}", json={"name": f"events {number}"})
                number += 1

    return Attack("webhooks", [renamer])


def slow_clients_attack(server: Server, count: int) -> Attack:
    closed = [0]

    def holder(stop: threading.Event) -> None:
        sockets: list[socket.socket] = []
        try:
            while not stop.is_set():
                while len(sockets) < count and not stop.is_set():
                    try:
                        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                        sock.sendall(PARTIAL)
                        sock.setblocking(False)
                        sockets.append(sock)
                    except OSError:
                        break
                stop.wait(0.5)
                kept = []
                for sock in sockets:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        kept.append(sock)
                        continue
                    except OSError:
                        data = b""
                    if data == b"" or data.startswith(b"HTTP/1.1 408"):
                        closed[0] += 1
                        sock.close()
                    else:
                        kept.append(sock)
                sockets = kept
        finally:
            for sock in sockets:
                sock.close()

    attack = Attack("slow clients", [holder])
    attack.notes["closed_by_server"] = closed
    return attack


def webhook_delays(
    client: httpx.Client, connector_id: str, receiver: WebhookReceiver, until: float
) -> list[float]:
    """Rename A's connector once a second until ``until``; the seconds until A's receiver has each."""
    delays: list[float] = []
    number = 0
    while time.monotonic() < until:
        before = len(receiver.accepted("/a"))
        sent = time.monotonic()
        client.patch(f"/connectors/{connector_id}", json={"name": f"a {number}"}).raise_for_status()
        number += 1
        while len(receiver.accepted("/a")) <= before and time.monotonic() - sent < 30:
            time.sleep(0.005)
        delays.append(round(time.monotonic() - sent, 3))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
    return delays


def per_second_p99(records: list[list[Any]], seconds: int) -> list[float]:
    start = min(record[0] for record in records)
    buckets: list[list[float]] = [[] for _ in range(seconds)]
    for sent, _status, latency, _target in records:
        index = int(sent - start)
        if 0 <= index < seconds:
            buckets[index].append(latency)
    return [sorted(b)[min(len(b) - 1, int(len(b) * 0.99))] if b else float("nan") for b in buckets]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "neighbours", "phases": {}}
    with Bench() as bench:
        pin(0, HELPER_CPU)
        keys = Keys()
        ca = LocalCA(bench.work)
        dns = bench.enter_context(DNSServer({IDP_HOST: ["127.0.0.1"]}, silent=[DARK]))
        idp = bench.enter_context(ScriptedServer(ca.server_context()))
        idp.set_default(token_responder(TOKEN_LIFETIME, delay=0.0))
        receiver = bench.enter_context(WebhookReceiver(ca.server_context()))
        slow = bench.enter_context(WebhookReceiver(ca.server_context()))
        env = server_env(
            bench,
            keys,
            f"sqlite+aiosqlite:///{bench.work / 'bench.db'}",
            ca_bundle=str(ca.ca_bundle),
            dns_servers=dns.address,
            max_connectors_per_org="30",
            access_log="false",
        )
        migrate(env)
        server = start_server(bench, env)
        a_token, b_token = keys.token("org-a"), keys.token("org-b")
        with step("A's connector, its webhook, and B's setup (four 4096-bit keys)"):
            a = bench.enter_context(_client(server, a_token))
            created = a.post("/connectors", json=_oauth_body("A", idp.url("/oauth/token", host=IDP_HOST)))
            created.raise_for_status()
            a_id = created.json()["id"]
            hook = a.post("/webhooks", json={"url": receiver.url("/a")})
            hook.raise_for_status()
            receiver.trust("/a", hook.json()["secret"])
            pems = [_rsa_pem() for _ in range(4)]
        attacks: list[tuple[str, Callable[[], Attack]]] = [
            ("dns", lambda: dns_attack(server, b_token)),
            ("keys", lambda: keys_attack(server, b_token, pems)),
            ("webhooks", lambda: webhook_attack(server, b_token, slow)),
            ("slow clients", lambda: slow_clients_attack(server, args.slow_clients)),
        ]
        target = authorize_target(a_id, a_token)

        def measure(name: str, attack: Attack | None) -> dict[str, Any]:
            job = load_job(server, args.connections, seconds=args.seconds, rate=args.rate, targets=[target])
            tokens_before = idp.count
            process, out = start_load(bench, job)
            delays = webhook_delays(a, a_id, receiver, time.monotonic() + args.seconds - 1.5)
            result = finish_load(process, out, timeout=args.seconds + 60)
            phase = {
                "rps": result["rps"],
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "failed": result["errors"],
                "statuses": result["statuses"],
                "token_requests": idp.count - tokens_before,
                "webhook_delay_s": {"median": statistics.median(delays), "max": max(delays)},
            }
            if attack is not None:
                phase["b"] = {
                    key: value[0] if isinstance(value, list) else value for key, value in attack.notes.items()
                }
            results["phases"][name] = phase
            return phase

        with step("A alone"):
            alone = measure("alone", None)
        for name, make in attacks:
            if args.only and name not in args.only:
                continue
            with step(f"B: {name}"):
                attack = make()
                attack.start()
                time.sleep(2.0)  # the attack under way before A is measured
                measure(name, attack)
                attack.stop()
                if name == "webhooks":
                    slow.release(503)
            with step(f"A after B's {name} stopped"):
                job = load_job(
                    server, args.connections, seconds=args.recovery_seconds, rate=args.rate, targets=[target]
                )
                process, out = start_load(bench, {**job, "timeline": True})
                after = finish_load(process, out, timeout=args.recovery_seconds + 60)
                p99s = per_second_p99(after["records"], int(args.recovery_seconds))
                normal = next(
                    (second for second, p99 in enumerate(p99s) if p99 <= P99_TARGET * alone["p99_ms"]), None
                )
                results["phases"][name]["after"] = {
                    "failed": after["errors"],
                    "p99_ms_per_second": [round(p, 2) for p in p99s],
                    "normal_after_s": normal,
                }
        results["machine"] = machine_note()
    return results


def report(results: dict[str, Any]) -> None:
    phases = results["phases"]
    alone = phases["alone"]
    print(f"\nNoisy neighbours: organization A's figures while organization B attacks ({results['machine']})")
    print(
        f"{'phase':<14}{'A req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'p99/alone':>10}{'failed':>8}"
        f"{'tokens':>8}{'hook s':>8}{'hook max':>9}{'normal after':>14}"
    )
    for name, phase in phases.items():
        after = phase.get("after", {})
        normal = after.get("normal_after_s")
        print(
            f"{name:<14}{phase['rps']:>9.0f}{phase['p50_ms']:>8.2f}{phase['p99_ms']:>8.2f}"
            f"{phase['p99_ms'] / alone['p99_ms']:>9.2f}x{phase['failed']:>8}{phase['token_requests']:>8}"
            f"{phase['webhook_delay_s']['median']:>8.2f}{phase['webhook_delay_s']['max']:>9.2f}"
            f"{('-' if not after else (f'{normal} s' if normal is not None else 'not yet')):>14}"
        )
    for name, phase in phases.items():
        if "b" in phase:
            print(f"  B during {name}: {json.dumps(phase['b'])}")
    attacked = [phase for name, phase in phases.items() if name != "alone"]
    failed = sum(phase["failed"] + phase.get("after", {}).get("failed", 0) for phase in attacked)
    worst = max(phase["p99_ms"] / alone["p99_ms"] for phase in attacked)
    delay = max(phase["webhook_delay_s"]["max"] for phase in attacked)
    normal = [phase["after"]["normal_after_s"] for phase in attacked]
    print(f"\nno failed call of A: {failed} failed ({verdict(failed == 0)})")
    print(f"A's p99 within {P99_TARGET}x of alone: worst {worst:.2f}x ({verdict(worst <= P99_TARGET)})")
    print(
        f"A's webhook delay under {DELAY_TARGET_S} s: worst {delay:.2f} s ({verdict(delay < DELAY_TARGET_S)})"
    )
    back = all(n is not None and n <= RECOVERY_TARGET_S for n in normal)
    print(f"A normal within {RECOVERY_TARGET_S} s of B stopping: {normal} s ({verdict(back)})")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.neighbours", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--recovery-seconds", type=float, default=6.0)
    parser.add_argument("--rate", type=float, default=500.0, help="A's authorize calls per second")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--slow-clients", type=int, default=800)
    parser.add_argument(
        "--only", nargs="*", help="run only these attacks (dns, keys, webhooks, 'slow clients')"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (reason := unsupported_reason()) is not None:
        sys.exit(f"cannot run: {reason}")
    results = run(args)
    report(results)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
