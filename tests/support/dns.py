"""A DNS server of the tests' own, on 127.0.0.1 over UDP: it answers some names and never others.

Names in ``records`` get their addresses (A and AAAA by the address's family, a 1 s TTL so
c-ares does not keep them long); names under a suffix in ``silent`` get no answer at all, like a
domain whose name servers never reply; anything else is NXDOMAIN. Every question is counted by
name, so a test can tell how many lookups reached the server.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord


class DNSServer:
    def __init__(self, records: Mapping[str, Sequence[str]], *, silent: Iterable[str] = ()) -> None:
        self.records = {name.lower(): list(addresses) for name, addresses in records.items()}
        self.silent = tuple(suffix.lower() for suffix in silent)
        self.questions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        # Woken now and then to see whether it should stop: closing does not interrupt recvfrom.
        self._socket.settimeout(0.05)
        self._stopping = threading.Event()
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="test DNS server", daemon=True)

    @property
    def address(self) -> str:
        """The server as a resolver takes it: ``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def asked(self, name: str) -> int:
        with self._lock:
            return self.questions[name.lower()]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                request = DNSRecord.parse(data)
            except Exception:  # noqa: S112 (not a DNS message: ignored, as a server would)
                continue
            name = str(request.q.qname).rstrip(".").lower()
            with self._lock:
                self.questions[name] += 1
            if any(name == suffix or name.endswith("." + suffix) for suffix in self.silent):
                continue
            reply = request.reply()
            addresses = self.records.get(name)
            if addresses is None:
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                for address in addresses:
                    parsed = ipaddress.ip_address(address)
                    if parsed.version == 4 and request.q.qtype == QTYPE.A:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
                    elif parsed.version == 6 and request.q.qtype == QTYPE.AAAA:
                        reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=1))
            try:
                self._socket.sendto(reply.pack(), peer)
            except OSError:
                return
