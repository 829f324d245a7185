"""Sending queued loads to a pod while it has free loading slots and the room.

`plan_dispatch` is the pure decision (which queued loads go now, which queue entries are stale);
`Dispatch._dispatch` commits it: the orders, the queue entries removed, the copies no longer
marked queued, and only then the leader's in-memory queue follows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from prometheus_client import Histogram

from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.store import ops as cmd
from meshserve.store.messages import LoadOrder
from meshserve_placement.bases import waits_for_base
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import ClusterView

M_QUEUE_WAIT = Histogram(
    "meshserve_placement_queue_seconds", "Time a decided load waited in its pod's load queue before its order was sent",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclass
class Plan:
    send: list[str] = field(default_factory=list)  # models whose load orders go now, in order
    drop: list[str] = field(default_factory=list)  # queue entries whose copy was withdrawn meanwhile


def queued_loading(view: ClusterView, pod: str, queue: Mapping[str, float]) -> list[Copy]:
    """The pod's queued loads, as booked (a queued load is a LOADING copy not sent yet).
    O(queue), never O(the pod's models): this runs on every event."""
    held = view.pod_models(pod)
    return [c for m in queue if (c := held.get(m)) is not None and c.state == CopyState.LOADING]


def plan_dispatch(view: ClusterView, pod: str, queue: Mapping[str, float], specs: Mapping[str, ModelSpec], overlap_fraction: float) -> Plan:
    """Which queued loads the pod takes now: waiting requests first (lowest priority value),
    while it has a free loading slot and the bytes it really holds leave room."""
    out = Plan()
    if not queue:
        return out
    pv = view.pods.get(pod)
    queued = queued_loading(view, pod, queue)
    slots = max(1, pv.max_loading if pv else 1) - (view.loading(pod) - len(queued))
    # What the pod really holds now: loaded, being loaded, and not yet unloaded.
    held = view.used(pod) - sum(c.size for c in queued) + view.unloading(pod)
    capacity = pv.capacity if pv else 0
    # Bytes still held by unloads in their grace may overlap the loads they make room for,
    # up to the tuned fraction (0: none, the pod never holds more than its capacity).
    capacity += int(capacity * overlap_fraction)
    for model in sorted(queue, key=lambda m: (queue[m], m)):
        c = view.copies.get(model, {}).get(pod)
        if c is None or c.state != CopyState.LOADING or model not in specs:
            out.drop.append(model)
            continue
        if waits_for_base(view, model, pod):
            continue  # an adapter: its base's copy here loads first (bases.py)
        if slots <= 0 or held + c.size > capacity:
            break  # in priority order: wait for a slot, or for the evictions' unloads to finish
        slots -= 1
        held += c.size
        out.send.append(model)
    return out


class Dispatch:
    async def _dispatch(self, pod: str, ops: Ops | None = None, changes: Changes | None = None,
                        queued: Sequence[tuple[str, float, dict[str, str]]] = ()) -> None:
        """Send queued loads to the pod while it has free loading slots, waiting requests first.
        `ops` and `changes` (a decision not committed yet) are committed with the orders;
        `queued` are that decision's loads (model, priority, trace context: an adapter's base
        and the adapter), queued with them. The in-memory queue follows only once the commit is in."""
        q = dict(self.queues.get(pod, {}))
        traces = {m: self._traces.get((pod, m), {}) for m in q}
        for model, prio, carried in queued:
            q[model], traces[model] = prio, carried
        p = plan_dispatch(self.view, pod, q, self.specs, self.t.unload_overlap_fraction)
        ops = list(ops or [])
        changes = list(changes or [])
        now = time.time()
        for model in p.drop:
            ops.append(cmd.dequeue(pod, model))
        for model in p.send:
            c = self.view.copies[model][pod]
            ops.append(cmd.dequeue(pod, model))
            self._set_copies(model, {**self.view.copies[model], pod: Copy(CopyState.LOADING, c.size, c.since)}, ops, changes)
            ops.append(cmd.order(pod, LoadOrder(self.specs[model], traces[model])))
        if ops:
            await self._commit(ops, changes)
        for model in p.drop + p.send:
            q.pop(model, None)
            self._traces.pop((pod, model), None)
        for model, _, carried in queued:
            if model in q:
                self._traces[(pod, model)] = carried
        for model in p.send:
            M_QUEUE_WAIT.observe(max(0.0, now - self.view.copies[model][pod].since))
        if q:
            self.queues[pod] = q
        else:
            self.queues.pop(pod, None)  # no empty queue kept for every pod that ever had one
