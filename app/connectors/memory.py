"""The connectors a process holds in memory for authorize, and how a miss is loaded.

A held connector is everything authorize and a token renewal need: the organization, version and
status, the URLs, for Basic and API keys the ready credential, and for OAuth the public fields
with the secrets still encrypted (decrypted only when a token request is about to be sent). Authorize
therefore answers from memory alone, and keeps answering, renewals included, while the database
is away.

``ConnectorMemory`` is a bounded LRU (``app.core.lru``). A miss starts one load per connector,
shared by every caller waiting for it. Copies are kept current by ``app.connectors.follower``
and by the service's own writes; ``change_seq``, the number of the last change a copy reflects,
keeps an older copy from replacing a newer one whichever arrives last. A change seen while a
load of that connector is running marks the load stale: it loads again before anyone gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core.lru import LRU
from app.tokens.types import StaticCredential


@dataclass(slots=True)
class HeldConnector:
    organization_id: str
    version: int
    change_seq: int
    base_url: str
    origin: str
    state: str
    auth_type: str
    grant_type: str | None
    # Non-secret auth fields, and the secrets as stored (ciphertexts bound to this connector).
    public: Mapping[str, Any]
    sealed: Mapping[str, str] = field(repr=False)
    # Kinds that issue no tokens (Basic, API keys): what authorize hands out (never in a repr).
    credential: StaticCredential | None = field(repr=False)
    # Such a kind's stored secret cannot be decrypted with this key ring (already logged).
    unreadable: bool = False
    # When a call of this copy was last noted for app.connectors.usage (monotonic seconds).
    used_noted: float = float("-inf")  # app.connectors.usage.NEVER_NOTED


Loader = Callable[[], Awaitable[HeldConnector | None]]


@dataclass(slots=True, eq=False)
class _Load:
    task: asyncio.Task[HeldConnector | None] | None = None
    stale: bool = False


class ConnectorMemory:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: LRU[uuid.UUID, HeldConnector] = LRU(capacity)
        # Loads under way, by connector, then by the organization asking (a caller of another
        # organization never shares, or spoils, the owner's load).
        self._loads: dict[uuid.UUID, dict[str, _Load]] = {}
        # The connectors changed while a bulk read runs (``watch``): not held from that read.
        self._watches: list[set[uuid.UUID]] = []

    def get(self, connector_id: uuid.UUID) -> HeldConnector | None:
        return self._held.get(connector_id)

    def peek(self, connector_id: uuid.UUID) -> HeldConnector | None:
        return self._held.peek(connector_id)

    def __len__(self) -> int:
        return len(self._held)

    def held_ids(self) -> list[uuid.UUID]:
        return list(self._held.keys())

    async def load(self, organization_id: str, connector_id: uuid.UUID, load: Loader) -> HeldConnector | None:
        """The organization's connector, loaded by one ``load`` shared with every concurrent caller."""
        loads = self._loads.setdefault(connector_id, {})
        pending = loads.get(organization_id)
        if pending is None or pending.task is None:
            pending = loads[organization_id] = _Load()
            run = self._run(connector_id, organization_id, pending, load)
            pending.task = asyncio.get_running_loop().create_task(run)
            # Retrieved here too: a failed load whose callers all gave up is not an unhandled error.
            pending.task.add_done_callback(lambda task: task.cancelled() or task.exception())
        # Shielded: a caller that gives up does not cancel the load the others wait for.
        return await asyncio.shield(pending.task)

    async def _run(
        self, connector_id: uuid.UUID, organization_id: str, pending: _Load, load: Loader
    ) -> HeldConnector | None:
        try:
            while True:
                pending.stale = False
                held = await load()
                if not pending.stale:
                    break
            if held is not None:
                self.offer(connector_id, held)
            return held
        finally:
            loads = self._loads.get(connector_id, {})
            if loads.get(organization_id) is pending:
                del loads[organization_id]
                if not loads:
                    del self._loads[connector_id]

    def offer(self, connector_id: uuid.UUID, held: HeldConnector, *, force: bool = False) -> bool:
        """Hold ``held`` unless the copy already held reflects a later change (or ``force``)."""
        current = self._held.peek(connector_id)
        if current is not None and current.change_seq > held.change_seq and not force:
            return False
        self._held.put(connector_id, held)
        return True

    def changed(self, connector_id: uuid.UUID) -> bool:
        """Note a change of the connector; True if a copy is held (the caller refreshes it)."""
        for pending in self._loads.get(connector_id, {}).values():
            pending.stale = True
        for changed in self._watches:
            changed.add(connector_id)
        return connector_id in self._held

    @contextlib.contextmanager
    def watch(self) -> Iterator[set[uuid.UUID]]:
        """The connectors changed while the block runs (a bulk read's rows of them may be stale)."""
        changed: set[uuid.UUID] = set()
        self._watches.append(changed)
        try:
            yield changed
        finally:
            self._watches.remove(changed)

    def full(self) -> bool:
        return len(self._held) >= self.capacity

    def fill(self, connector_id: uuid.UUID, held: HeldConnector) -> bool:
        """Hold ``held`` if nothing of it is held or loading and there is room (a bulk load never
        replaces a copy, nor pushes out one that calls brought in); whether it was held."""
        if self.full() or self._held.peek(connector_id) is not None or connector_id in self._loads:
            return False
        self._held.put(connector_id, held)
        return True

    def drop(self, connector_id: uuid.UUID) -> None:
        self._held.pop(connector_id)
        self.changed(connector_id)

    async def aclose(self) -> None:
        tasks = [
            pending.task
            for loads in self._loads.values()
            for pending in loads.values()
            if pending.task is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
