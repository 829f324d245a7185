"""The copy reconcile, every maintain period: scale, minimums, idle copies, draining pods
(copies.py decides), failed unloads ordered again, and recent uses from ms:lastused."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from meshserve.model import Copy, CopyState
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import UnloadOrder
from meshserve_placement import copies as copyplan
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")

UNLOAD_RETRY_SECONDS = 30.0  # an unload that failed is ordered again after this long


class Maintain:
    async def _maintain(self, http: aiohttp.ClientSession) -> None:
        last_poll = 0.0
        while True:
            await asyncio.sleep(self.t.maintain_seconds)
            now = time.time()
            if now - last_poll >= self.t.rate_poll_seconds:
                await self._poll_rates(http, now - last_poll if last_poll else 0.0)
                last_poll = now
                await self._refresh_specs()
            await self._poll_lastused(now)
            async with self._deciding():
                await self._reconcile_copies(now)
                await self._retry_unloads(now)

    async def _reconcile_copies(self, now: float) -> None:
        self._mark_health(now)
        draining = {p for p, pv in self.view.pods.items() if pv.draining}
        for a in copyplan.plan_copies(self.view, self.rates, now, self.t, self.last_added, draining, scale_down=self._rate_rounds > 0):
            spec = self.specs.get(a.model)
            if a.op == "add" and spec is not None:
                if await self._place(spec, waiting=a.model in self.waiting, why=a.why):
                    self.last_added[a.model] = now
            elif a.op == "remove":
                await self._unload(a.model, a.pod, a.why)

    async def _retry_unloads(self, now: float) -> None:
        """Unloads a pod reported failed are ordered again, each at most every UNLOAD_RETRY_SECONDS.
        O(failed unloads), never O(models): this runs every maintain period."""
        ops: Ops = []
        again: list[tuple[str, str]] = []
        for (model, pod), since in list(self._failed_unloads.items()):
            c = self.view.copies.get(model, {}).get(pod)
            if c is None or c.state != CopyState.UNLOADING:
                del self._failed_unloads[(model, pod)]
            elif now - since >= UNLOAD_RETRY_SECONDS:
                log.info("ordering the unload of %s on %s again: %s", model, pod, c.reason)
                again.append((model, pod))
                ops.append(cmd.order(pod, UnloadOrder(model)))
        if ops:
            await self._commit(ops, [])
        for key in again:
            self._failed_unloads[key] = now

    async def _unload(self, model: str, pod: str, why: str) -> None:
        cs = dict(self.view.copies.get(model, {}))
        c = cs.get(pod)
        if c is None or c.state != CopyState.LOADED or self.view.base_stays(model, pod):
            return  # a base stays while its adapters are on the pod (bases.py)
        log.info("unloading %s from %s: %s", model, pod, why)
        ops: Ops = []
        changes: Changes = []
        cs[pod] = Copy(CopyState.UNLOADING, c.size, time.time(), why)
        self._set_copies(model, cs, ops, changes)
        ops.append(cmd.order(pod, UnloadOrder(model)))
        await self._commit(ops, changes)

    async def _poll_lastused(self, now: float) -> None:
        """Recent uses (runtime counters copied by the loaders, cold hits from the activator)."""
        since = self._lastused_seen - 2 * self.s.heartbeat_seconds
        recent = await self.state.r.zrangebyscore(k.LAST_USED, since, "+inf", withscores=True)
        for key, v in recent:
            m = key.decode()
            self.view.touch(m, v)
            self._recent[m] = max(v, self._recent.get(m, 0.0))
            self._lastused_seen = max(self._lastused_seen, v)
        # In flight: used within the window. The runtimes serve a request in well under it and
        # report each heartbeat, so a model with a request in progress is always in this set.
        window = self.t.busy_window_seconds
        self._recent = {m: t for m, t in self._recent.items() if now - t < window}
        self.view.in_flight = set(self._recent)
