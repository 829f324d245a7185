"""Request bodies over the limit, for every aiohttp server on the data path (the built-in runtime
and the activator): read and dropped, bounded, before the 413 goes out.

Many HTTP/1.1 clients read the answer only once they have sent the whole body; answering at the
limit made the gateway end the request and close, and they were reset mid-send (seen at 100 MB)
without ever reading the 413. Past these bounds the answer goes out anyway."""

from __future__ import annotations

import asyncio

from aiohttp import web

from meshserve.settings import MAX_REQUEST_BYTES

DRAIN_SECONDS = 10.0
DRAIN_MAX_BYTES = 4 * MAX_REQUEST_BYTES


async def drain(request: web.Request) -> None:
    """Read what is left of `request`'s body and drop it, up to DRAIN_MAX_BYTES / DRAIN_SECONDS."""
    if (request.content_length or 0) > DRAIN_MAX_BYTES:
        return
    seen = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while seen <= DRAIN_MAX_BYTES:
                chunk = await request.content.readany()
                if not chunk:
                    return
                seen += len(chunk)
    except TimeoutError:
        pass
