"""Sending queued loads to a pod while it has free loading slots and the room.

`plan_dispatch` is the pure decision (which queued loads go now, which queue entries are stale);
`Dispatch._dispatch` commits it: the orders, the queue entries removed, the copies no longer
marked queued, and only then the leader's in-memory queue follows.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

from prometheus_client import Histogram

from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import LoadOrder
from meshserve_placement.bases import order_spec, waits_for_base
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import ClusterView

log = logging.getLogger("meshserve.placement")

M_QUEUE_WAIT = Histogram(
    "meshserve_placement_queue_seconds", "Time a decided load waited in its pod's load queue before its order was sent",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclass
class Plan:
    send: list[str] = field(default_factory=list)  # models whose load orders go now, in order
    drop: list[str] = field(default_factory=list)  # queue entries whose copy was withdrawn meanwhile
    # The head load, when it cannot fit and nothing on the pod will free room by itself (no load
    # under way, no unload): sizes grew since its decision (a base that reported more than it
    # booked, say). Waiting would be for ever; it is decided again, evicting what it needs.
    stuck: list[str] = field(default_factory=list)


class LoadQueue(dict[str, float]):
    """A pod's load queue in memory (model -> priority, the mirror of ms:loadq:<pod>), with a
    heap for its head: a dispatch reads only as far down the queue as it sends, never the whole
    queue. With 20,000 loads asked for at once, sorting a 10,000-entry queue on every request
    and every load result made the leader quadratic (bench/density.py)."""

    def __init__(self, items: Mapping[str, float] | None = None):
        super().__init__(items or {})
        self._heap = [(p, m) for m, p in self.items()]
        heapq.heapify(self._heap)

    def __setitem__(self, model: str, priority: float) -> None:
        super().__setitem__(model, priority)
        heapq.heappush(self._heap, (priority, model))
        if len(self._heap) > 64 + 2 * len(self):
            # Re-prioritised and removed entries stay in the heap until they reach its top.
            self._heap = [(p, m) for m, p in self.items()]
            heapq.heapify(self._heap)

    def ordered(self) -> Iterator[tuple[float, str]]:
        """(priority, model) from the head, lowest priority value first, ties by model. The
        entries read are put back when the iterator is closed (use contextlib.closing)."""
        taken: list[tuple[float, str]] = []
        seen: set[str] = set()
        try:
            while self._heap:
                p, m = heapq.heappop(self._heap)
                if self.get(m) != p or m in seen:
                    continue  # removed or re-prioritised since it was pushed, or pushed twice
                seen.add(m)
                taken.append((p, m))
                yield p, m
        finally:
            for e in taken:
                heapq.heappush(self._heap, e)


def plan_dispatch(view: ClusterView, pod: str, head: Iterable[tuple[float, str]], specs: Mapping[str, ModelSpec], overlap_fraction: float, lookahead: int = 0) -> Plan:
    """Which queued loads the pod takes now: waiting requests first (`head` is the queue as
    (priority, model) in priority order, read only as far as needed), while it has a free
    loading slot and the bytes it really holds leave room.

    Up to `lookahead` more loads that requests wait for may be ordered than the pod has slots:
    the loader starts each as one of its slots frees (it bounds the loads it runs), so no slot
    idles for the round trip from a load's result through the leader to the next order. Only
    those: a waiting request's priority is when it came, so a later request goes after them
    anyway, whereas a background load (minCopies, scale-up) ordered early could delay one."""
    out = Plan()
    pv = view.pods.get(pod)
    slots = max(1, pv.max_loading if pv else 1) - view.sent(pod)
    ahead = slots + lookahead
    if ahead <= 0:
        return out
    # What the pod really holds now: loaded, being loaded, and not yet unloaded.
    held = view.used(pod) - view.queued_bytes(pod) + view.unloading(pod)
    # What the pod may hold: its capacity, of which placement books all but the unload reserve
    # (view.unload_reserve): unloads in their grace use the reserve while the loads they made
    # room for start. The overlap fraction goes beyond it (0: the pod never holds more).
    capacity = (pv.limit or pv.capacity) if pv else 0
    capacity += int(capacity * overlap_fraction)
    for prio, model in head:
        c = view.copies.get(model, {}).get(pod)
        if c is None or c.state != CopyState.LOADING or model not in specs:
            out.drop.append(model)
            continue
        if waits_for_base(view, model, pod):
            continue  # an adapter: its base's copy here loads first (bases.py)
        if ahead <= 0 or (slots <= 0 and prio >= k.BACKGROUND):
            break  # in priority order: wait for a slot
        if held + c.size > capacity:
            if not out.send and view.sent(pod) == 0 and view.unloading(pod) == 0:
                out.stuck.append(model)
            break  # wait for the evictions' unloads to finish
        slots, ahead, held = slots - 1, ahead - 1, held + c.size
        out.send.append(model)
        if ahead <= 0:
            break
    return out


class Dispatch:
    async def _dispatch(self, pod: str, ops: Ops | None = None, changes: Changes | None = None,
                        queued: Sequence[tuple[str, float, dict[str, str]]] = ()) -> None:
        """Send queued loads to the pod while it has free loading slots, waiting requests first.
        `ops` and `changes` (a decision not committed yet) are committed with the orders;
        `queued` are that decision's loads (model, priority, trace context: an adapter's base
        and the adapter), queued with them. The in-memory queue follows only once the commit is in."""
        q = self.queues.get(pod)
        if not isinstance(q, LoadQueue):
            q = LoadQueue(q)
        carried = {model: trace for model, _, trace in queued}
        extra = sorted((prio, model) for model, prio, _ in queued)
        with contextlib.closing(q.ordered()) as head:
            p = plan_dispatch(self.view, pod, heapq.merge(head, extra), self.specs,
                              self.t.unload_overlap_fraction, self.t.order_lookahead)
        ops = list(ops or [])
        changes = list(changes or [])
        now = time.time()
        for model in p.drop:
            ops.append(cmd.dequeue(pod, model))
        for model in p.stuck:
            ops.append(cmd.dequeue(pod, model))
            self._set_copies(model, {q_: c for q_, c in self.view.copies[model].items() if q_ != pod}, ops, changes)
        for model in p.send:
            c = self.view.copies[model][pod]
            ops.append(cmd.dequeue(pod, model))
            self._set_copies(model, {**self.view.copies[model], pod: Copy(CopyState.LOADING, c.size, c.since)}, ops, changes)
            trace = carried[model] if model in carried else self._traces.get((pod, model), {})
            ops.append(cmd.order(pod, LoadOrder(order_spec(self.specs[model], self.view, pod), trace)))
        if ops:
            await self._commit(ops, changes)
        for model in p.drop + p.send + p.stuck:
            q.pop(model, None)
            self._traces.pop((pod, model), None)
        for model in p.stuck:
            log.warning("%s: its queued load on %s no longer fits (sizes grew since it was decided); deciding it again", model, pod)
            if model in self.waiting:
                self.room.setdefault(model, [now, now])  # _retry_room decides it again, evicting
                self.room_waiters.set()
        for model, prio, trace in queued:
            if model not in p.send and model not in p.drop and model not in p.stuck:
                q[model] = prio
                self._traces[(pod, model)] = trace
        for model in p.send:
            M_QUEUE_WAIT.observe(max(0.0, now - self.view.copies[model][pod].since))
        if q:
            self.queues[pod] = q
        else:
            self.queues.pop(pod, None)  # no empty queue kept for every pod that ever had one
