"""The one outbound HTTP client: every token and validation request leaves through here.

The URLs this client calls are written by users, so each request is treated as an attempt to reach
somewhere it should not (server-side request forgery) and to hold the service hostage (slow or
huge answers). Each defence lives in the module whose job it is, and says there why it sits where
it does:

* ``policy``: which addresses may be reached (only global ones, unless private destinations are
  allowed), and URL checks.
* ``lookups``: name resolution that no organization can starve (c-ares, one flight per name, a
  deadline that ends the lookup, a negative cache, a cap per organization).
* ``transport``: TLS always verified; no redirects and no proxies from the environment; a network
  backend that resolves once and connects to the checked address, so DNS rebinding finds no window.
* ``certificates``: client certificates for mutual TLS, loaded without the key touching a file.
* ``connections``: one connection pool per client identity, so a connection authenticated with one
  certificate never carries a request made with another, or with none.
* ``bodies``: bodies read with a cap, compressed ones included.
* ``client``: ``OutboundClient``, one total deadline per operation with retries inside it, and
  failures mapped to the service's errors, whose details name the host at most.
"""

from app.core.outbound.bodies import OutboundResponse
from app.core.outbound.certificates import ClientCertificate, InvalidClientCertificate
from app.core.outbound.client import OutboundClient, OutboundKind
from app.core.outbound.lookups import CaresResolver, Lookups, on_behalf_of, outbound_tenant
from app.core.outbound.policy import Resolver, check_url, refusal_reason, system_resolver
from app.core.outbound.transport import build_ssl_context

__all__ = [
    "CaresResolver",
    "ClientCertificate",
    "InvalidClientCertificate",
    "Lookups",
    "OutboundClient",
    "OutboundKind",
    "OutboundResponse",
    "Resolver",
    "build_ssl_context",
    "check_url",
    "on_behalf_of",
    "outbound_tenant",
    "refusal_reason",
    "system_resolver",
]
