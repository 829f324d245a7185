"""An in-memory stand-in for a runtime server, for tests of the loader agent's own logic (orders,
pulls, results) where a real runtime process adds nothing. Tests that use it say so."""

from __future__ import annotations

import asyncio
from typing import Any


class RecordingRuntime:
    """Takes every load at once (or after `delay` seconds), reports `size` bytes, and records
    what it was given: the model ids, the load parameters, and the most loads that overlapped."""

    def __init__(self, size: int = 1000, delay: float = 0.0) -> None:
        self.size = size
        self.delay = delay
        self.loaded: list[str] = []
        self.params: list[dict[str, Any]] = []
        self.active = self.peak = 0

    @property
    def paths(self) -> list[str]:
        return [p["path"] for p in self.params]

    async def wait_ready(self, timeout: float = 0) -> None: ...

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.loaded.append(model_id)
            self.params.append(params)
            return self.size
        finally:
            self.active -= 1

    async def unload(self, model_id: str) -> None: ...

    async def stats(self) -> dict[str, Any]:
        return {m: {"requests": 0} for m in self.loaded}
