"""Response bodies, read with a cap.

The body is streamed and reading stops past ``max_response_bytes``, so a huge answer cannot hold
the service hostage. ``Accept-Encoding: identity`` is asked for, and a compressed body that arrives
anyway is inflated with the same cap, so a small compressed answer cannot expand into a large one
in memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

__all__ = ["OutboundResponse"]


class _BodyTooLargeError(Exception):
    pass


class _BodyUndecodableError(Exception):
    pass


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLargeError
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLargeError
    return bytes(body)


def _decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    if not content_encoding:
        return raw
    body = raw
    # Codings are listed in the order they were applied, so they are undone from the last.
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise _BodyUndecodableError
        # wbits 32+15 accepts both zlib and gzip headers.
        inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise _BodyUndecodableError from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise _BodyTooLargeError
        body = out
    return body


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    """A complete response: the status, headers (lower-case names) and the whole body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
