"""Mesh-wide metrics computed from Redis state: what the cache holds, how full and how old it is.

Component metrics (xDS pushes, runtime latency, activator waits) live with their components.
These ones describe the cache as a whole, so one process exports them (the placement service)
from the same state everybody reads, refreshed every few seconds rather than per request.

Cardinality stays bounded at 100,000 registered models: per-pod series scale with pods, and the
only per-model series (`meshserve_model_copies`, `meshserve_model_loads_total`) exist only for
models that are loaded now, which capacity bounds.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter as TallyCounter
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.messages import KIND_ALL, KIND_PLACEMENT, LoadResult, UnloadResult
from meshserve.store.state import State
from meshserve.model import Copy, CopyState, Pod, copies_from_json

log = logging.getLogger("meshserve.observe")

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# A refresh follows ms:changes and re-reads only the placements they name; the whole hash (and
# the whole ms:lastused) is read again only on a gap in the revisions, a KIND_ALL change, or
# every FULL_EVERY seconds as a safety net for a last-used time written behind the ones seen.
FULL_EVERY = 300.0
LAST_USED_SLACK = 10.0  # a loader reports a use it saw up to a heartbeat or two ago
# More changes than placements (at least CHANGE_BUDGET) between two refreshes (100,000 models
# registered at once): reading the hash whole costs less than reading them.
CHANGES_PER_READ = 2_000
CHANGE_BUDGET = 5_000


class PlacementTally:
    """The counts the state metrics need, kept per model so a change costs that model's copies,
    not every placement: models with a loaded / loading / failing copy, bytes and copies per
    pod, and per pod the least recently used loaded model (a heap with lazy deletion: an entry
    is dropped when it reaches the top and no longer matches the model's copy or last use).
    Pure: no I/O, so it is tested directly and built off the event loop."""

    def __init__(self) -> None:
        self.copies: dict[str, dict[str, Copy]] = {}
        self.last_used: dict[str, float] = {}
        self.live: set[str] = set()  # models with a loaded copy (any pod)
        self.loading = 0
        self.failing = 0
        self.used: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self._heaps: dict[str, list[tuple[float, str]]] = {}

    def set(self, model: str, copies: dict[str, Copy]) -> None:
        old = self.copies.pop(model, None)
        if old:
            self._add(model, old, -1)
        if copies:
            self.copies[model] = copies
            self._add(model, copies, 1)

    def touch(self, model: str, t: float) -> None:
        """A last use; like ms:lastused (ZADD GT) it only moves forward."""
        if t <= self.last_used.get(model, float("-inf")):
            return
        self.last_used[model] = t
        for pod, c in self.copies.get(model, {}).items():
            if c.state == CopyState.LOADED:
                self._push(pod, t, model)

    def oldest(self, pod: str) -> float | None:
        """The last use (or load time) of the least recently used model loaded on `pod`."""
        h = self._heaps.get(pod)
        while h:
            t, m = h[0]
            if self._valid(pod, t, m):
                return t
            heapq.heappop(h)
        return None

    def _t(self, model: str, c: Copy) -> float:
        return self.last_used.get(model, c.since)

    def _valid(self, pod: str, t: float, model: str) -> bool:
        c = self.copies.get(model, {}).get(pod)
        return c is not None and c.state == CopyState.LOADED and self._t(model, c) == t

    def _push(self, pod: str, t: float, model: str) -> None:
        h = self._heaps.setdefault(pod, [])
        heapq.heappush(h, (t, model))
        if len(h) > 2 * self.count.get(pod, 0) + 1024:
            # Stale entries pile up as models are used and unloaded: keep the valid ones, once
            # each. Amortized O(1) per push: the heap at least halves.
            h[:] = sorted({e for e in h if self._valid(pod, *e)})

    def _add(self, model: str, copies: dict[str, Copy], sign: int) -> None:
        live = loading = failed = False
        for pod, c in copies.items():
            if c.state == CopyState.FAILED:
                failed = True
                continue
            self.used[pod] = self.used.get(pod, 0) + sign * c.size
            self.count[pod] = self.count.get(pod, 0) + sign
            if c.state == CopyState.LOADED:
                live = True
                if sign > 0:
                    self._push(pod, self._t(model, c), model)
            elif c.state == CopyState.LOADING:
                loading = True
        if live:
            (self.live.add if sign > 0 else self.live.discard)(model)
        self.loading += sign * loading
        self.failing += sign * (failed and not live)


def tally_from(placements: dict[bytes, bytes], last_used: list[tuple[bytes, float]]) -> PlacementTally:
    """A tally from the whole ms:placements and ms:lastused (a full read)."""
    t = PlacementTally()
    t.last_used = {k.decode(): v for k, v in last_used}
    for k, v in placements.items():
        t.set(k.decode(), copies_from_json(v))
    return t


class MeshStateCollector(Collector):
    def __init__(self, state: State, interval: float = 2.0):
        self.state, self.interval = state, interval
        self._families: list[Metric] = []
        self.loads: TallyCounter[str] = TallyCounter()  # result -> count
        self.unloads = 0
        self.model_loads: TallyCounter[str] = TallyCounter()
        self.load_seconds: list[float] = []
        self._bucket_counts = [0] * len(LOAD_BUCKETS)
        self._load_sum = 0.0
        self._load_n = 0
        self.redis_up = 0  # the last refresh reached Redis: alerts page on 0 (istio/alerts.yaml)
        self.tally = PlacementTally()
        self._rev = -1  # the revision the tally reflects; -1: never read
        self._change_id = "0-0"
        self._full_at = 0.0
        self._lu_seen = 0.0
        self.full_reads = 0  # for tests and the benchmark: how often the whole hash was read

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("meshserve_redis_up", "1 when the last state read reached Redis, else 0")
        up.add_metric([], self.redis_up)
        # The per-model families are as many as the loaded models: built when scraped, not at
        # every refresh.
        return [*self._families, *model_families(self.tally, self), up]

    async def run(self) -> None:
        last_event = "$"
        while True:
            try:
                last_event = await self._tail_events(last_event)
                await self.refresh()
                self.redis_up = 1
            except Exception as e:  # metrics must never take the service down
                self.redis_up = 0
                log.warning("state metrics refresh failed: %s", e)
            await asyncio.sleep(self.interval)

    async def _tail_events(self, last: str) -> str:
        for eid, ev in await store_ops.read_events(self.state.r, last, 10_000):
            last = eid
            if isinstance(ev, LoadResult):
                self.loads["ok" if ev.ok else "failed"] += 1
                if ev.ok:
                    self.model_loads[ev.model] += 1
            elif isinstance(ev, UnloadResult) and ev.ok:
                self.unloads += 1
        return last if isinstance(last, str) else last.decode()

    def _observe_load(self, seconds: float) -> None:
        for i, b in enumerate(LOAD_BUCKETS):
            if seconds <= b:
                self._bucket_counts[i] += 1
        self._load_sum += seconds
        self._load_n += 1

    async def _read_full(self) -> None:
        """The whole placements hash and ms:lastused, at one revision, parsed in a thread (the
        event loop keeps serving meanwhile)."""
        async with self.state.r.pipeline(transaction=True) as p:
            p.get(keys.REV)
            store_ops.queue_last_change_id(p)
            p.hgetall(keys.PLACEMENTS).zrange(keys.LAST_USED, 0, -1, withscores=True)
            rev, last, placements, lu = await p.execute()
        self.tally = await asyncio.to_thread(tally_from, placements, lu)
        self._rev = int(rev or 0)
        self._change_id = store_ops.last_change_id(last)
        self._lu_seen = max((v for _, v in lu), default=0.0)
        self._full_at = time.monotonic()
        self.full_reads += 1

    async def _follow(self) -> bool:
        """Re-read the placements ms:changes named since the last refresh. False: something may
        be missing (a revision skipped, a trimmed stream, a KIND_ALL, too many changes), so the
        caller reads everything."""
        ids: set[str] = set()
        rev, cid = self._rev, self._change_id
        budget = max(CHANGE_BUDGET, len(self.tally.copies))
        behind = False
        while True:
            if budget <= 0:
                return False
            entries = await store_ops.changes_since(self.state.r, cid, CHANGES_PER_READ)
            budget -= len(entries)
            for eid, ch in entries:
                cid = eid.decode() if isinstance(eid, bytes) else eid
                if ch.rev <= self._rev:
                    behind = True  # already in the tally (the full read was at this revision or later)?
                    continue
                if ch.rev > rev + 1:
                    return False  # a revision skipped: entries trimmed or missed
                if ch.kind == KIND_ALL:
                    return False
                if ch.kind == KIND_PLACEMENT:
                    ids.add(ch.id)
                rev = ch.rev
            if len(entries) < CHANGES_PER_READ:
                break
        if behind and await self.state.rev() < self._rev:
            return False  # or the revision started again: Redis lost its data, everything is new
        if ids:
            id_list = sorted(ids)
            raws = await self.state.r.hmget(keys.PLACEMENTS, id_list)
            for m, raw in zip(id_list, raws):
                self.tally.set(m, copies_from_json(raw))
        self._rev, self._change_id = rev, cid
        since = self._lu_seen - LAST_USED_SLACK
        for key, v in await self.state.r.zrangebyscore(keys.LAST_USED, since, "+inf", withscores=True):
            self.tally.touch(key.decode(), v)
            self._lu_seen = max(self._lu_seen, v)
        return True

    async def refresh(self) -> None:
        # Never the registry itself (parsing 100,000 model specs would cost more than placement's
        # decisions; the families need only their number), and the placements only as they change.
        if self._rev < 0 or time.monotonic() - self._full_at >= FULL_EVERY or not await self._follow():
            await self._read_full()
        async with self.state.r.pipeline(transaction=True) as p:
            p.get(keys.REV).hlen(keys.MODELS).hgetall(keys.PODS)
            p.zrange(keys.HEARTBEATS, 0, -1, withscores=True).exists(keys.LEASE)
            rev, managed, pods, hb, leader = await p.execute()
        self._families = build_families(
            {k.decode(): Pod.from_json(v) for k, v in pods.items()}, self.tally, {k.decode(): v for k, v in hb},
            time.time(), self, managed, int(rev or 0),
        )
        lead = GaugeMetricFamily("meshserve_placement_leader", "1 when a placement instance holds the leader lease, else 0")
        lead.add_metric([], 1 if leader else 0)
        self._families.append(lead)


def build_families(pods: dict[str, Pod], tally: PlacementTally, hb: dict[str, float], now: float, tallies: MeshStateCollector,
                   managed_models: int, rev: int) -> list[Metric]:
    """Pure: state in, the mesh-wide families out; O(pods), the counts come kept in `tally`."""
    cap = GaugeMetricFamily("meshserve_pod_capacity_bytes", "Model memory a runtime pod offers", labels=["pod"])
    used = GaugeMetricFamily("meshserve_pod_used_bytes", "Bytes held or reserved by model copies on a pod", labels=["pod"])
    nmodels = GaugeMetricFamily("meshserve_pod_models", "Model copies on a pod (any state but failed)", labels=["pod"])
    hb_age = GaugeMetricFamily("meshserve_pod_heartbeat_age_seconds", "Seconds since the pod's loader last reported", labels=["pod"])
    lru_age = GaugeMetricFamily("meshserve_instance_lru_age_seconds", "Age of the least recently used model on a pod", labels=["pod"])
    oldest = now
    for pid, p in pods.items():
        t = tally.oldest(pid)
        pod_oldest = now if t is None else min(now, t)
        oldest = min(oldest, pod_oldest)
        cap.add_metric([pid], p.capacity_bytes)
        used.add_metric([pid], tally.used.get(pid, 0))
        nmodels.add_metric([pid], tally.count.get(pid, 0))
        hb_age.add_metric([pid], max(0.0, now - hb.get(pid, now)))
        lru_age.add_metric([pid], max(0.0, now - pod_oldest))
    managed = GaugeMetricFamily("meshserve_models_managed", "Registered concrete models")
    managed.add_metric([], managed_models)
    loaded = GaugeMetricFamily("meshserve_models_loaded", "Models with at least one loaded copy")
    loaded.add_metric([], len(tally.live))
    loading_g = GaugeMetricFamily("meshserve_models_loading", "Models with a load in progress")
    loading_g.add_metric([], tally.loading)
    failing_g = GaugeMetricFamily("meshserve_models_failing", "Models whose latest load failed and that have no loaded copy")
    failing_g.add_metric([], tally.failing)
    age = GaugeMetricFamily("meshserve_cache_age_seconds", "Now minus the oldest last-used time of any loaded model (ModelMesh's cache age)")
    age.add_metric([], max(0.0, now - oldest))
    pods_g = GaugeMetricFamily("meshserve_pods", "Registered runtime pods")
    pods_g.add_metric([], len(pods))
    rev_g = GaugeMetricFamily("meshserve_state_revision", "Redis state revision")
    rev_g.add_metric([], rev)
    loads = CounterMetricFamily("meshserve_loads", "Model loads reported by loaders", labels=["result"])
    for result in ("ok", "failed"):
        loads.add_metric([result], tallies.loads.get(result, 0))
    unloads = CounterMetricFamily("meshserve_evictions", "Model copies unloaded (evictions and scale-downs)")
    unloads.add_metric([], tallies.unloads)
    hist = HistogramMetricFamily("meshserve_loadmodel_seconds", "Time a loader took to pull and load a model")
    les = [str(b) for b in LOAD_BUCKETS] + ["+Inf"]
    hist.add_metric([], list(zip(les, tallies._bucket_counts + [tallies._load_n])), tallies._load_sum)
    return [cap, used, nmodels, hb_age, lru_age, managed, loaded, loading_g, failing_g, age, pods_g, rev_g, loads, unloads, hist]


def model_families(tally: PlacementTally, tallies: MeshStateCollector) -> list[Metric]:
    """The per-model series, only for models loaded now (capacity bounds them)."""
    copies_g = GaugeMetricFamily("meshserve_model_copies", "Copies of a loaded model per pod and state", labels=["model", "pod", "state"])
    per_model = CounterMetricFamily("meshserve_model_loads", "Loads of a currently loaded model", labels=["model"])
    for model in sorted(tally.live):
        for pod, c in tally.copies.get(model, {}).items():
            copies_g.add_metric([model, pod, c.state], 1)
        per_model.add_metric([model], tallies.model_loads.get(model, 0))
    return [copies_g, per_model]
