"""The full check of a private key, in a process of its own, after everything cheap has passed.

Loading an RSA private key with its numbers checked (primality of ``p`` and ``q`` among them) costs
about a quarter of a second of CPU for a 4096-bit key, inside OpenSSL, holding the GIL the whole
time: on the event loop, or in one of its threads, it stops every request of every organization
for that long. So the fields' own validators load keys without that check (microseconds: the
PEM's size, type, bits, curve and fit with the signing algorithm are judged there, on the loop),
and the service asks ``KeyChecks`` for the full check only once a save has passed everything
cheaper (body, organization's limit, name), before anything is stored or sent.

``KeyChecks`` runs the checks in a small pool of worker processes (``workers``, started on first
use with ``spawn``, scheduled behind the service: ``SCHED_IDLE`` on Linux), so the loop keeps
its core. An idle-class task gets no CPU at all while the machine is busy, so a check still
running after ``PROMOTE_AFTER_SECONDS`` has its workers moved to the normal class at nice 10 (about
a tenth of a contended core) until no check is under way: a save waits a little, never forever.
One
organization has at most ``per_organization`` checks queued or running; more are refused at once
(``KeyChecksBusy``, 429 with ``Retry-After``), so a stream of one organization's key saves never
queues in front of another's. A pool whose worker died is made anew. The PEM crosses to the
worker over a pipe and the answer is a fixed reason or None: no key, no library message.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.queues import SimpleQueue
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from app.core.errors import KeyChecksBusy

__all__ = ["KeyChecks", "private_key_refusal"]

# Workers run behind the service: the event loop keeps most of a shared core.
_WORKER_NICENESS: Final = 10
# A check still running after this long has its workers raised from the idle class.
PROMOTE_AFTER_SECONDS: Final = 1.0


def private_key_refusal(pem: bytes) -> str | None:
    """Why the private key of ``pem`` fails its full check, or None. Runs in a worker process.

    The key passed the fields' cheap checks (one unencrypted PEM key of an allowed type and size).
    """
    try:
        key = load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
        if isinstance(key, rsa.RSAPrivateKey):
            load_pem_private_key(pem, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return "is not a valid private key: its numbers do not make a key"
    return None


def _lower_priority(pids: SimpleQueue[int] | None = None) -> None:
    """Run behind the service: on Linux as an idle-class task, which gets the CPU only when no
    other task wants it and gives it up the moment one does; elsewhere, niced. The worker tells
    the service its pid (``pids``), so that a starved check can be raised."""
    if pids is not None:
        pids.put(os.getpid())
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(_WORKER_NICENESS)


def _set_class(pid: int, *, idle: bool) -> None:
    """Put a worker in the idle class, or in the normal class at nice 10 (best effort)."""
    try:
        if idle:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, pid, _WORKER_NICENESS)
    except (AttributeError, OSError):
        pass  # gone, or not Linux: it was niced from the start


class KeyChecks:
    """Full checks of private keys in ``workers`` processes; see the module docstring."""

    def __init__(self, workers: int = 1, per_organization: int = 2) -> None:
        if workers < 1 or per_organization < 1:
            raise ValueError("workers and per_organization must be at least 1")
        self._workers = workers
        self._per_organization = per_organization
        self._pool: ProcessPoolExecutor | None = None
        self._checking: Counter[str] = Counter()
        # The workers' pids (each reports its own), checks under way, and whether the workers
        # were raised from the idle class for a starved check.
        self._pid_queue: SimpleQueue[int] | None = None
        self._pids: set[int] = set()
        self._running = 0
        self._raised = False

    async def refusal(self, organization_id: str, pem: str) -> str | None:
        """Why the private key of ``pem`` is refused after its full check, or None.

        Raises ``KeyChecksBusy`` when ``organization_id`` already has its maximum of checks.
        """
        if self._checking[organization_id] >= self._per_organization:
            raise KeyChecksBusy(
                f"at most {self._per_organization} private keys of an organization are checked at a time"
            )
        self._checking[organization_id] += 1
        try:
            try:
                return await self._run(pem)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): a new pool, and the check once more.
                self.close()
                return await self._run(pem)
        finally:
            self._checking[organization_id] -= 1
            if not self._checking[organization_id]:
                del self._checking[organization_id]

    async def _run(self, pem: str) -> str | None:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pid_queue = context.SimpleQueue()
            self._pids = set()
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=context,
                initializer=_lower_priority,
                initargs=(self._pid_queue,),
            )
        loop = asyncio.get_running_loop()
        check = loop.run_in_executor(self._pool, private_key_refusal, pem.encode("ascii"))
        self._running += 1
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(check), PROMOTE_AFTER_SECONDS)
            except TimeoutError:
                # Starved (the machine is busy): raised until no check is under way.
                self._set_workers(idle=False)
                return await check
        finally:
            self._running -= 1
            if not self._running and self._raised:
                self._set_workers(idle=True)

    def _set_workers(self, *, idle: bool) -> None:
        if self._pid_queue is not None:
            while not self._pid_queue.empty():
                self._pids.add(self._pid_queue.get())
        for pid in self._pids:
            _set_class(pid, idle=idle)
        self._raised = not idle

    def close(self) -> None:
        """Stop the workers (a check under way is abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._pids = set()
            self._raised = False
