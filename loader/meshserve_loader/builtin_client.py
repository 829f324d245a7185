"""The built-in runtime as the agent sees it: KServe v2 REST with the repository extension,
plus our stats endpoint (per-model request counts and sizes the runtime measured). `base_url` is
the runtime's control listener (127.0.0.1, Settings.pod_control_port), the only one that serves
the repository API."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class RuntimeClient:
    base_url: str
    session: aiohttp.ClientSession
    kind: str = "builtin"

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with self.session.get(f"{self.base_url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"runtime at {self.base_url} not ready after {timeout}s")
            await asyncio.sleep(0.1)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        # The runtime gets the timeout too: it gives up on the load then (freeing itself for the
        # next one) instead of finishing it for nobody.
        async with self.session.post(
            f"{self.base_url}/v2/repository/models/{model_id}/load",
            json={"parameters": {**params, "timeout_seconds": timeout}},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            body = await r.json(content_type=None)
            if r.status == 504:  # the runtime's own timeout: the same failure as ours
                raise asyncio.TimeoutError(body.get("error") if isinstance(body, dict) else "load timed out")
            if r.status != 200:
                raise RuntimeError(body.get("error") if isinstance(body, dict) else f"HTTP {r.status}")
            return int(body.get("size_bytes") or 0)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            if r.status not in (200, 404):
                raise RuntimeError(f"unload of {model_id} failed: HTTP {r.status}")

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base_url}/v2/meshserve/stats") as r:
            return await r.json() if r.status == 200 else {}
