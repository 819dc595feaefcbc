"""The live credential check run before a connector is saved, and on demand."""

from __future__ import annotations

from opentelemetry.trace import Tracer

from app.core.outbound import OutboundClient
from app.tokens.basic import check_basic
from app.tokens.types import BasicConfig, OAuth2Config, TokenFetcher, TokenGrant


class LiveChecker:
    """OAuth 2.0: fetch a token (kept, so the first authorize needs no request). Basic: GET the
    validation URL with the header."""

    def __init__(
        self, outbound: OutboundClient, fetcher: TokenFetcher, *, tracer: Tracer | None = None
    ) -> None:
        self.outbound = outbound
        self.fetcher = fetcher
        self.tracer = tracer

    async def __call__(self, config: BasicConfig | OAuth2Config) -> TokenGrant | None:
        if isinstance(config, BasicConfig):
            await check_basic(self.outbound, config, tracer=self.tracer)
            return None
        return await self.fetcher(config)
