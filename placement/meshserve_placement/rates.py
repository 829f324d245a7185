"""Request rates per model from the runtimes' counters, smoothed with an EWMA."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from opentelemetry import trace
from prometheus_client import Histogram

from meshserve import state as st
from meshserve import tracing
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve_placement import copies as copyplan
from meshserve_placement import keys, policy
from meshserve_placement.sizes import booked_size, reported_of
from meshserve_placement.liveness import Liveness, judge
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")


class Rates:
    async def _poll_rates(self, http: aiohttp.ClientSession, interval: float) -> None:
        """Request counts from every runtime: rates for scaling, counts for the eviction value."""

        async def one(pod: Pod) -> tuple[str, dict[str, Any]]:
            try:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/v2/meshserve/stats") as r:
                    return pod.id, (await r.json() if r.status == 200 else {})
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return pod.id, {}

        results = await asyncio.gather(*(one(p) for p in list(self.pods.values())))
        deltas: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for pod, stats in results:
            for m, s in stats.items():
                n = int(s.get("requests", 0))
                key = (pod, m)
                seen.add(key)
                prev = self._counts.get(key)
                self._counts[key] = n
                d = n - prev if prev is not None and n >= prev else 0
                if d:
                    deltas[m] = deltas.get(m, 0) + d
                    if s.get("last_used"):
                        lu = float(s["last_used"])
                        self.view.touch(m, lu, uses=d)
                        self._recent[m] = max(lu, self._recent.get(m, 0.0))
        for key in [k for k in self._counts if k not in seen]:
            del self._counts[key]
        if interval > 0:
            # An EWMA over ~3 polls: fast enough to add a copy within seconds, steady enough not to
            # flap. A new leader's first round is taken as it is: it has nothing to smooth against.
            self._rate_rounds += 1
            alpha = 0.5 if self._rate_rounds > 1 else 1.0
            for m in set(self.rates) | set(deltas):
                r = alpha * deltas.get(m, 0) / interval + (1 - alpha) * self.rates.get(m, 0.0)
                if r < 0.01:
                    self.rates.pop(m, None)
                else:
                    self.rates[m] = r
