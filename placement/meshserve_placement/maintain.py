"""The copy reconcile, every maintain period: scale, minimums, idle copies, draining pods
(copies.py decides), failed unloads ordered again, and recent uses from ms:lastused."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

import aiohttp

from meshserve.model import Copy, CopyState
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import UnloadOrder
from meshserve_placement import copies as copyplan
from meshserve_placement.tuning import Tuning
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import ClusterView

log = logging.getLogger("meshserve.placement")

UNLOAD_RETRY_SECONDS = 30.0  # an unload that failed is ordered again after this long
# An adapter over a superseded base that no other pod could take is placed again after this long.
REBASE_RETRY_SECONDS = 30.0


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
                # Adapters also leave by failed loads, pod deaths and restarts: O(held copies).
                await self._release_held()

    async def _reconcile_copies(self, now: float) -> None:
        self._mark_health(now)
        draining = {p for p, pv in self.view.pods.items() if pv.draining}
        plan = self._copyplan
        scale_down = self._rate_rounds > 0
        todo = plan.todo(self.view, now, scale_down)
        actions = copyplan.plan_copies(self.view, self.rates, now, self.t, self.last_added, draining, scale_down=scale_down, only=todo)
        plan.decided(self.view, todo, now, self.t, self.last_added, actions)
        if self._rebase_tried:
            self._rebase_tried = {m: t for m, t in self._rebase_tried.items() if now - t < REBASE_RETRY_SECONDS}
        for a in actions:
            spec = self.specs.get(a.model)
            if a.op == "add" and spec is not None:
                if await self._place(spec, waiting=a.model in self.waiting, why=a.why):
                    self.last_added[a.model] = now
            elif a.op == "remove":
                await self._unload(a.model, a.pod, a.why)
            elif a.op == "rebase" and spec is not None and now - self._rebase_tried.get(a.model, -REBASE_RETRY_SECONDS) >= REBASE_RETRY_SECONDS:
                # No other pod may take it (one pod, or all full): it keeps answering over the
                # old version where it is, until it is unloaded, and is tried again later. Not
                # unloaded first: its requests would wait for a copy that cannot go elsewhere.
                self._rebase_tried[a.model] = now
                if await self._place(spec, waiting=False, why=a.why):
                    self.last_added[a.model] = now

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
        plan = self._copyplan
        for key, v in recent:
            m = key.decode()
            self.view.touch(m, v)
            plan.dirty.add(m)  # its idle-unload time moved
            self._recent[m] = max(v, self._recent.get(m, 0.0))
            self._lastused_seen = max(self._lastused_seen, v)
        # In flight: used within the window. The runtimes serve a request in well under it and
        # report each heartbeat, so a model with a request in progress is always in this set.
        window = self.t.busy_window_seconds
        self._recent = {m: t for m, t in self._recent.items() if now - t < window}
        plan.dirty |= self.view.in_flight - self._recent.keys()  # no longer busy: may be idle now
        self.view.in_flight = set(self._recent)


# The copy reconcile decides only the models something happened to; a full pass over every
# model, at most this far apart, catches whatever the dirty set missed.
FULL_PASS_SECONDS = 30.0


class CopyPlan:
    """Which models the copy reconcile decides each round, so a round costs what changed, not
    every model (at 20,000 loaded a full pass each second was 12% of the placement process).
    A model is decided again when its copies or spec changed (ClusterView.changed, with the
    base of an adapter that changed: a base leaves a pod after its adapters), its rate moved,
    it was used or stopped being busy, it got an action last round (an add that found no room
    is tried again), or its `recheck_at` time came. Everything is decided when the pods' health,
    draining or pausing changed, scale-down turned on, the view was rebuilt, or FULL_PASS_SECONDS went by."""

    def __init__(self) -> None:
        self.dirty: set[str] = set()
        self._due: list[tuple[float, str]] = []  # (time, model): recheck_at, a heap
        self._due_at: dict[str, float] = {}
        self._acted: set[str] = set()
        self._view: object = None
        self._sig: object = None
        self._full_at = float("-inf")
        self.full_passes = 0

    def todo(self, view: ClusterView, now: float, scale_down: bool) -> set[str] | None:
        """The models to decide this round; None: all of them."""
        sig = (scale_down, tuple(sorted((p, pv.healthy, pv.draining, pv.paused) for p, pv in view.pods.items())))
        changed = view.take_changed()
        if view is not self._view or sig != self._sig or now - self._full_at >= FULL_PASS_SECONDS:
            self._view, self._sig, self._full_at = view, sig, now
            self.dirty.clear()
            self._acted.clear()
            self._due, self._due_at = [], {}
            self.full_passes += 1
            return None
        todo = changed | self.dirty | self._acted
        self.dirty = set()
        while self._due and self._due[0][0] <= now:
            t, m = heapq.heappop(self._due)
            if self._due_at.get(m) == t:
                del self._due_at[m]
                todo.add(m)
        for m in list(todo):
            mv = view.models.get(m)
            if mv is not None and mv.base and mv.base != m:
                todo.add(mv.base)
        return todo

    def decided(self, view: ClusterView, todo: set[str] | None, now: float, tuning: Tuning,
                last_added: dict[str, float], actions: list[copyplan.Action]) -> None:
        """Remember when each model just decided should be looked at again."""
        for m in list(view.copies) if todo is None else todo:  # a model without copies: never (recheck_at)
            t = copyplan.recheck_at(view, m, now, tuning, last_added)
            if t is None:
                self._due_at.pop(m, None)
            elif self._due_at.get(m) != t:
                self._due_at[m] = t
                heapq.heappush(self._due, (t, m))
        if len(self._due) > 2 * len(self._due_at) + 1024:
            self._due = [(t, m) for m, t in self._due_at.items()]
            heapq.heapify(self._due)
        self._acted = {a.model for a in actions}
