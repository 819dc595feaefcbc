"""The live credential checks a connector kind runs before it is saved, and on demand."""

from __future__ import annotations

from opentelemetry.trace import Tracer

from app.core.outbound import OutboundClient
from app.tokens.static import check_static
from app.tokens.types import OAuth2Config, StaticCredential, TokenFetcher, TokenGrant


class LiveChecker:
    """What a kind's check may do (``app.connectors.kinds.CheckTools``): send a credential to a
    validation URL, or fetch a token (kept, so the first authorize needs no request)."""

    def __init__(
        self, outbound: OutboundClient, fetcher: TokenFetcher, *, tracer: Tracer | None = None
    ) -> None:
        self.outbound = outbound
        self.fetcher = fetcher
        self.tracer = tracer

    async def static(self, url: str, credential: StaticCredential) -> None:
        await check_static(self.outbound, url, credential, tracer=self.tracer)

    async def token(self, config: OAuth2Config) -> TokenGrant:
        return await self.fetcher(config)
