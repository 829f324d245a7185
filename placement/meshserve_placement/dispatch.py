"""Sending queued loads to a pod while it has free loading slots and the room."""

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


class Dispatch:
    def _queued_loading(self, pod: str) -> list[Copy]:
        """The pod's queued loads, as booked (a queued load is a LOADING copy not sent yet).
        O(queue), never O(the pod's models): this runs on every event."""
        held = self.view.pod_models(pod)
        return [c for m in self.queues.get(pod, {}) if (c := held.get(m)) is not None and c.state == CopyState.LOADING]

    def _dispatched(self, pod: str) -> int:
        return self.view.loading(pod) - len(self._queued_loading(pod))

    async def _dispatch(self, pod: str, ops: Ops | None = None, changes: Changes | None = None) -> None:
        """Send queued loads to the pod while it has free loading slots, waiting requests first.
        `ops` and `changes` (a decision not committed yet) are committed with the orders."""
        q = self.queues.get(pod)
        if not q:
            if ops:
                await self._commit(ops, changes or [])
            return
        pv = self.view.pods.get(pod)
        slots = max(1, pv.max_loading if pv else 1) - self._dispatched(pod)
        # What the pod really holds now: loaded, being loaded, and not yet unloaded.
        queued_bytes = sum(c.size for c in self._queued_loading(pod))
        held = self.view.used(pod) - queued_bytes + self.view.unloading(pod)
        capacity = pv.capacity if pv else 0
        # Bytes still held by unloads in their grace may overlap the loads they make room for,
        # up to the tuned fraction (0: none, the pod never holds more than its capacity).
        capacity += int(capacity * self.t.unload_overlap_fraction)
        ops = list(ops or [])
        changes = list(changes or [])
        for model in sorted(q, key=lambda m: (q[m], m)):
            cs = dict(self.view.copies.get(model, {}))
            c = cs.get(pod)
            spec = self.specs.get(model)
            if c is None or c.state != CopyState.LOADING or spec is None:
                del q[model]  # withdrawn meanwhile
                self._traces.pop((pod, model), None)
                ops.append(["ZREM", keys.loadq_key(pod), model])
                continue
            if slots <= 0 or held + c.size > capacity:
                break  # in priority order: wait for a slot, or for the evictions' unloads to finish
            slots -= 1
            held += c.size
            M_QUEUE_WAIT.observe(max(0.0, time.time() - c.since))
            del q[model]
            ops.append(["ZREM", keys.loadq_key(pod), model])
            cs[pod] = Copy(CopyState.LOADING, c.size, c.since)
            self._set_copies(model, cs, ops, changes)
            carried = [x for kv in self._traces.pop((pod, model), {}).items() for x in kv]
            ops.append(["XADD", st.orders_key(pod), "*", "op", "load", "model", model, "spec", spec.to_json(), *carried])
        if ops:
            await self._commit(ops, changes)
