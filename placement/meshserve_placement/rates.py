"""Request rates per model from the runtimes' counters, smoothed with an EWMA. `count` and
`ewma` are pure; `Rates._poll_rates` does the polling and keeps the results."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import aiohttp

from meshserve.model import Pod

FLOOR = 0.01  # requests/s below which a model's rate is dropped (and the dict stays small)


def count(prev: Mapping[tuple[str, str], int], stats: list[tuple[str, dict[str, Any]]]) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, tuple[float, int]]]:
    """From each pod's counters: the counts to remember (pairs no longer reported are gone),
    requests per model since the last poll, and model -> (last use, uses) for the eviction value.
    A counter that went down (a runtime restarted) counts as no requests."""
    counts: dict[tuple[str, str], int] = {}
    deltas: dict[str, int] = {}
    used: dict[str, tuple[float, int]] = {}
    for pod, per_model in stats:
        for m, s in per_model.items():
            n = int(s.get("requests", 0))
            before = prev.get((pod, m))
            counts[(pod, m)] = n
            d = n - before if before is not None and n >= before else 0
            if d:
                deltas[m] = deltas.get(m, 0) + d
                if s.get("last_used"):
                    lu = float(s["last_used"])
                    last, uses = used.get(m, (0.0, 0))
                    used[m] = (max(last, lu), uses + d)
    return counts, deltas, used


def ewma(rates: Mapping[str, float], deltas: Mapping[str, int], interval: float, first: bool) -> dict[str, float]:
    """An EWMA over ~3 polls: fast enough to add a copy within seconds, steady enough not to
    flap. A new leader's first round is taken as it is: it has nothing to smooth against."""
    alpha = 1.0 if first else 0.5
    out: dict[str, float] = {}
    for m in set(rates) | set(deltas):
        r = alpha * deltas.get(m, 0) / interval + (1 - alpha) * rates.get(m, 0.0)
        if r >= FLOOR:
            out[m] = r
    return out


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
        self._counts, deltas, used = count(self._counts, results)
        for m, (lu, uses) in used.items():
            self.view.touch(m, lu, uses=uses)
            self._recent[m] = max(lu, self._recent.get(m, 0.0))
        if interval > 0:
            self._rate_rounds += 1
            before = self.rates
            self.rates = ewma(self.rates, deltas, interval, first=self._rate_rounds == 1)
            # Models with a rate, before or now: the copy reconcile decides them again (maintain.py).
            self._copy_plan().dirty.update(before.keys() | self.rates.keys())
