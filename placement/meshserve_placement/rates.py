"""Request rates per model from the runtimes' counters, smoothed with an EWMA. `count` and
`ewma` are pure; `Rates._poll_rates` does the polling and keeps the results."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import aiohttp

from meshserve.model import Pod

FLOOR = 0.01  # requests/s below which a model's rate is dropped (and the dict stays small)


def count(prev: Mapping[tuple[str, str], int], stats: list[tuple[str, dict[str, Any]]],
          partial: frozenset[str] | set[str] = frozenset()) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, tuple[float, int]]]:
    """From each pod's counters: the counts to remember (pairs no longer reported are gone),
    requests per model since the last poll, and model -> (last use, uses) for the eviction value.
    A counter that went down (a runtime restarted) counts as no requests.
    A pod in `partial` reported only the models used since its previous poll (stats?since=),
    which followed a full one: a pair it did not report kept its count, and a pair new to it
    started from 0 (the full poll listed every loaded model, a model loaded since starts at 0)."""
    counts: dict[tuple[str, str], int] = {}
    deltas: dict[str, int] = {}
    used: dict[str, tuple[float, int]] = {}
    if partial:
        counts.update((k, v) for k, v in prev.items() if k[0] in partial)
    for pod, per_model in stats:
        for m, s in per_model.items():
            n = int(s.get("requests", 0))
            before = prev.get((pod, m), 0 if pod in partial else None)
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


# Every this many polls a pod is asked for all its counters (and the counts of models it no
# longer holds are forgotten); in between only for the models used since (stats?since=).
FULL_POLL_EVERY = 30
SINCE_SLACK = 5.0  # seconds: uses that finished out of order, a clock stepped back


class Rates:
    async def _poll_rates(self, http: aiohttp.ClientSession, interval: float) -> None:
        """Request counts from every runtime: rates for scaling, counts for the eviction value.
        A pod that answered a full poll before is asked only for the models used since the
        latest use it reported (its own clock): at 20,000 loaded, every counter every 2 s was
        a 20,000-entry reply parsed on the leader's loop."""
        since_of = self._rate_since
        self._rate_polls += 1
        polls = self._rate_polls
        if self._rate_rounds == 0 or polls % FULL_POLL_EVERY == 0:
            since_of.clear()  # a new leader (its counts are gone), or the periodic full poll
        partial: set[str] = set()

        async def one(pod: Pod) -> tuple[str, dict[str, Any]]:
            since = since_of.get(pod.id)
            query = f"?since={since - SINCE_SLACK!r}" if since is not None else ""
            try:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/v2/meshserve/stats{query}") as r:
                    if r.status != 200:
                        since_of.pop(pod.id, None)
                        return pod.id, {}
                    got = await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                since_of.pop(pod.id, None)  # nothing known about what it did meanwhile: full next time
                return pod.id, {}
            if since is not None:
                partial.add(pod.id)
            latest = max((float(s.get("last_used") or 0.0) for s in got.values()), default=0.0)
            since_of[pod.id] = max(latest, since or 0.0)
            return pod.id, got

        results = await asyncio.gather(*(one(p) for p in list(self.pods.values())))
        self._counts, deltas, used = count(self._counts, results, partial)
        for m, (lu, uses) in used.items():
            self.view.touch(m, lu, uses=uses)
            self._recent[m] = max(lu, self._recent.get(m, 0.0))
        if interval > 0:
            self._rate_rounds += 1
            before = self.rates
            self.rates = ewma(self.rates, deltas, interval, first=self._rate_rounds == 1)
            # Models with a rate, before or now: the copy reconcile decides them again (maintain.py).
            self._copyplan.dirty.update(before.keys() | self.rates.keys())
