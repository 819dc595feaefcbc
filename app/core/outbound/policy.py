"""Where an outbound request may go: the address policy, URL checks and name resolution.

The URLs the service calls are written by users, so each one is treated as an attempt to reach
somewhere it should not (server-side request forgery). ``refusal_reason`` classifies one address
and is pure, so save-time checks and connection time share the rule. ``_DestinationPolicy``
resolves a host once and refuses it if *any* answer is a non-global address; the network backend
(``transport``) then connects to the checked addresses themselves, never to the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import httpx

from app.core.errors import DestinationNotAllowed, NameNotResolved

__all__ = ["IPAddress", "Resolver", "check_url", "refusal_reason", "system_resolver"]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Resolves a host name to IP address strings, in the order they should be tried.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Metadata services answer instance credentials to anyone who can reach them. All but Azure's
# are inside ranges refused anyway; they are listed so the refusal says what they are.
_METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer: a public address that only the host answers
    )
)

# ``ipaddress.is_global`` follows the IANA registries only as of the running Python (3.11.7 calls
# 192.0.0.192 and 64:ff9b::7f00:1 global), so the special-purpose ranges are also listed here.
_SPECIAL_IPV4: Final = _networks(
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",
    "100.64.0.0/10",  # shared address space (carrier-grade NAT)
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
_SPECIAL_IPV6: Final = _networks(
    "2001::/23",  # IETF protocol assignments, Teredo included (its client address is obfuscated)
    "2001:db8::/32",
    "3fff::/20",
)
# Globally routable IPv6 unicast is allocated from 2000::/3 only.
_GLOBAL_UNICAST_V6: Final = ipaddress.ip_network("2000::/3")
_SHARED_V4: Final = ipaddress.ip_network("100.64.0.0/10")
# Forms that carry an IPv4 address, which then decides: RFC 6052 NAT64 and RFC 3056 6to4.
_NAT64_V6: Final = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR_V6: Final = ipaddress.ip_network("2002::/16")


def _classify_v4(address: ipaddress.IPv4Address) -> str | None:
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED_V4:
        return "shared (carrier-grade NAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global or any(address in net for net in _SPECIAL_IPV4):
        return "non-global"
    return None


def _classify_v6(address: ipaddress.IPv6Address) -> str | None:
    if address.scope_id is not None:
        # A zone index only exists on link-scoped addresses.
        return "link-local"
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    embedded: ipaddress.IPv4Address | None = address.ipv4_mapped
    if embedded is None and address in _NAT64_V6:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is None:
        embedded = address.sixtofour
    if embedded is not None:
        # The packet ends up at the IPv4 address, so it is the one that must pass.
        return _classify_v4(embedded)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local or address.is_site_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if (
        address not in _GLOBAL_UNICAST_V6
        or not address.is_global
        or any(address in net for net in _SPECIAL_IPV6)
    ):
        return "non-global"
    return None


def refusal_reason(address: IPAddress | str) -> str | None:
    """Why an outbound connection to ``address`` is refused, or ``None`` if it is allowed.

    Pure and synchronous: the same rule serves save-time checks and connection time.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return "unparseable"
    if isinstance(address, ipaddress.IPv4Address):
        return _classify_v4(address)
    return _classify_v6(address)


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    host: str
    port: int


def check_url(url: str, *, allow_private_destinations: bool = True) -> httpx.URL:
    """Check that ``url`` is a plain ``https://`` URL with a host; raise ``DestinationNotAllowed``.

    Pure and synchronous: it never resolves a name (``OutboundClient.check_destination`` does),
    but with ``allow_private_destinations=False`` a host written as a non-global IP is refused.
    """
    target = _parse_target(url)
    literal = _literal_address(target.host)
    if not allow_private_destinations and literal is not None:
        reason = refusal_reason(literal)
        if reason is not None:
            raise DestinationNotAllowed(f"{target.host} is a {reason} address")
    return target.url


def _parse_target(url: str) -> _Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise DestinationNotAllowed("the URL is not valid") from None
    if parsed.scheme != "https":
        raise DestinationNotAllowed("only https:// URLs are allowed")
    if parsed.userinfo:
        raise DestinationNotAllowed("URLs must not carry credentials")
    host = parsed.host
    if not host:
        raise DestinationNotAllowed("the URL has no host")
    return _Target(url=parsed, host=host, port=443 if parsed.port is None else parsed.port)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve with the operating system's resolver, keeping its order and dropping duplicates."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class _DestinationPolicy:
    """Resolves a host once and decides whether every address it resolved to may be used."""

    def __init__(self, resolver: Resolver, allow_private: bool) -> None:
        self._resolver = resolver
        self._allow_private = allow_private

    async def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to, in order; raises ``DestinationNotAllowed`` or
        ``NameNotResolved``."""
        literal = _literal_address(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            try:
                candidates = list(await self._resolver(host, port))
            except OSError:
                # ``Lookups`` raises ``NameNotResolved`` itself; a plain resolver raises OSError.
                raise NameNotResolved(f"{host} could not be resolved") from None
            if not candidates:
                raise NameNotResolved(f"{host} could not be resolved: no addresses")
        if not self._allow_private:
            for candidate in candidates:
                reason = refusal_reason(candidate)
                if reason is not None:
                    # The address itself stays out of the message: at save time it would tell the
                    # caller about the internal network.
                    logger.warning("refused outbound destination %s (%s address)", host, reason)
                    verb = "is" if literal is not None else "resolves to"
                    raise DestinationNotAllowed(f"{host} {verb} a {reason} address")
        return candidates
