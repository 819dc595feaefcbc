"""Many Basic connectors over many organizations, written in bulk through the repository.

``seed(url, keyring, organizations=100_000, per_organization=5)`` adds ``organizations``
organizations (``org-000000``, ``org-000001``, ...) with ``per_organization`` Basic connectors
each, as ``BulkRepository.add_all`` in ``Database(...).write()`` units of ``batch`` rows. Every
row is what ``ConnectorService.create`` with ``validate=false`` would have written: the password
encrypted under the key ring's newest key and bound to its organization, connector and field
(``secret_aad``), ``name_key`` as the service computes it, URLs in the service's normal form,
version 1, no change numbered (nobody can hold a connector that did not exist). So a server
started with the same ``CONNECTORS_ENCRYPTION_KEYS`` serves them like any other.

The database must be migrated first (``python -m app migrate``). The next batch is prepared
while the previous one is being written, so encryption overlaps the database's own work.

From the command line (the keys as the server gets them)::

    CONNECTORS_ENCRYPTION_KEYS=k1:... python -m benchmarks.seed sqlite+aiosqlite:///bench.db \\
        --organizations 100000 --per-organization 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.connectors.repository import BulkRepository
from app.connectors.schemas import name_key
from app.core.config import parse_settings
from app.core.crypto import KeyRing, secret_aad
from app.core.db import Database, build_engine
from app.core.urls import normalise_base_url, normalise_endpoint_url

DEFAULT_BATCH = 5000


def organization_id(index: int) -> str:
    return f"org-{index:06d}"


def password_of(organization: str, index: int) -> str:
    """The seeded password of a connector (the benchmark checks headers against it)."""
    return f"pw-{organization}-{index}"


@dataclass(frozen=True, slots=True)
class Seeded:
    """What was written: per organization (in order), its connector ids."""

    connectors: list[tuple[str, list[uuid.UUID]]]
    seconds: float
    rows: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _rows(
    keyring: KeyRing, first: int, count: int, per_organization: int, now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, list[uuid.UUID]]]]:
    """The organization and connector rows of organizations ``first`` .. ``first + count - 1``."""
    key_id = keyring.primary_key_id
    # A few distinct hosts, each in the form the service stores (checked by its own normaliser).
    bases = [normalise_base_url(f"https://api{j}.example.com") for j in range(per_organization)]
    checks = [
        normalise_endpoint_url(f"https://api{j}.example.com/auth/check") for j in range(per_organization)
    ]
    names = [f"Connector {j + 1}" for j in range(per_organization)]
    keys = [name_key(name) for name in names]
    organizations: list[dict[str, Any]] = []
    connectors: list[dict[str, Any]] = []
    ids: list[tuple[str, list[uuid.UUID]]] = []
    for index in range(first, first + count):
        org = organization_id(index)
        organizations.append({"id": org, "created_at": now})
        mine: list[uuid.UUID] = []
        for j in range(per_organization):
            connector_id = uuid.uuid4()
            mine.append(connector_id)
            connectors.append(
                {
                    "id": connector_id,
                    "organization_id": org,
                    "name": names[j],
                    "name_key": keys[j],
                    "resource_domain_url": bases[j],
                    "auth_type": "basic",
                    "grant_type": None,
                    "auth_config": {"username": f"user-{index}-{j}", "validation_url": checks[j]},
                    "secrets": {
                        "password": keyring.encrypt(
                            password_of(org, j), aad=secret_aad(org, connector_id, "password")
                        )
                    },
                    "key_id": key_id,
                    "status_state": "unverified",
                    "status_checked_at": None,
                    "status_detail": None,
                    "version": 1,
                    "change_seq": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        ids.append((org, mine))
    return organizations, connectors, ids


async def seed_async(
    url: str,
    keyring: KeyRing,
    *,
    organizations: int,
    per_organization: int = 5,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, float], None] | None = None,
) -> Seeded:
    db = Database(build_engine(url))
    now = datetime.now(UTC)
    per_batch = max(1, batch // per_organization)
    seeded: list[tuple[str, list[uuid.UUID]]] = []
    started = time.perf_counter()

    async def write(orgs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> None:
        async with db.write() as session:
            await BulkRepository(session).add_all(orgs, rows)

    pending: asyncio.Task[None] | None = None
    try:
        for first in range(0, organizations, per_batch):
            count = min(per_batch, organizations - first)
            # Prepared while the previous batch is written (PostgreSQL works in its own process;
            # SQLite in aiosqlite's thread).
            orgs, rows, ids = _rows(keyring, first, count, per_organization, now)
            if pending is not None:
                await pending
            pending = asyncio.create_task(write(orgs, rows))
            seeded.extend(ids)
            if progress is not None:
                progress(len(seeded) * per_organization, time.perf_counter() - started)
            # Let the write start before the next batch is prepared.
            await asyncio.sleep(0)
        if pending is not None:
            await pending
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await db.dispose()
    seconds = time.perf_counter() - started
    return Seeded(connectors=seeded, seconds=seconds, rows=organizations * per_organization)


def seed(
    url: str,
    keyring: KeyRing,
    *,
    organizations: int,
    per_organization: int = 5,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, float], None] | None = None,
) -> Seeded:
    """Write the rows (see the module docstring); blocks until they are committed."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            seed_async(
                url,
                keyring,
                organizations=organizations,
                per_organization=per_organization,
                batch=batch,
                progress=progress,
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url", help="sqlite+aiosqlite:///... or postgresql+asyncpg://...")
    parser.add_argument("--organizations", type=int, default=100_000)
    parser.add_argument("--per-organization", type=int, default=5)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="connector rows per transaction")
    args = parser.parse_args()
    if "CONNECTORS_ENCRYPTION_KEYS" not in os.environ:
        sys.exit("seed: set CONNECTORS_ENCRYPTION_KEYS to the key ring the server gets")
    keyring = KeyRing.from_settings(parse_settings())
    done = seed(
        args.database_url,
        keyring,
        organizations=args.organizations,
        per_organization=args.per_organization,
        batch=args.batch,
    )
    print(f"seeded {done.rows} connectors of {args.organizations} organizations in {done.seconds:.1f} s")


if __name__ == "__main__":
    main()
