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
import logging
import time
from collections import Counter as TallyCounter
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.messages import LoadResult, UnloadResult
from meshserve.store.state import Snapshot, State
from meshserve.model import CopyState, Pod, copies_from_json

log = logging.getLogger("meshserve.observe")

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


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

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("meshserve_redis_up", "1 when the last state read reached Redis, else 0")
        up.add_metric([], self.redis_up)
        return [*self._families, up]

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

    async def refresh(self) -> None:
        # Everything but the registry itself: parsing 100,000 model specs every interval would
        # cost more CPU than placement's decisions; the families need only their number.
        async with self.state.r.pipeline(transaction=True) as p:
            p.get(keys.REV).hlen(keys.MODELS).hgetall(keys.PODS).hgetall(keys.PLACEMENTS)
            p.zrange(keys.HEARTBEATS, 0, -1, withscores=True).zrange(keys.LAST_USED, 0, -1, withscores=True).exists(keys.LEASE)
            rev, managed, pods, placements, hb, lu, leader = await p.execute()
        snap = Snapshot(
            rev=int(rev or 0), models={}, aliases={},
            pods={k.decode(): Pod.from_json(v) for k, v in pods.items()},
            placements={k.decode(): copies_from_json(v) for k, v in placements.items()},
        )
        self._families = build_families(snap, {k.decode(): v for k, v in hb}, {k.decode(): v for k, v in lu}, time.time(), self, managed)
        lead = GaugeMetricFamily("meshserve_placement_leader", "1 when a placement instance holds the leader lease, else 0")
        lead.add_metric([], 1 if leader else 0)
        self._families.append(lead)


def build_families(snap: Snapshot, hb: dict[str, float], lu: dict[str, float], now: float, tallies: MeshStateCollector,
                   managed_models: int | None = None) -> list[Metric]:
    """Pure: state in, metric families out. `managed_models` stands in for len(snap.models)."""
    cap = GaugeMetricFamily("meshserve_pod_capacity_bytes", "Model memory a runtime pod offers", labels=["pod"])
    used = GaugeMetricFamily("meshserve_pod_used_bytes", "Bytes held or reserved by model copies on a pod", labels=["pod"])
    nmodels = GaugeMetricFamily("meshserve_pod_models", "Model copies on a pod (any state but failed)", labels=["pod"])
    hb_age = GaugeMetricFamily("meshserve_pod_heartbeat_age_seconds", "Seconds since the pod's loader last reported", labels=["pod"])
    lru_age = GaugeMetricFamily("meshserve_instance_lru_age_seconds", "Age of the least recently used model on a pod", labels=["pod"])
    copies_g = GaugeMetricFamily("meshserve_model_copies", "Copies of a loaded model per pod and state", labels=["model", "pod", "state"])
    pod_used = {p: 0 for p in snap.pods}
    pod_count = {p: 0 for p in snap.pods}
    pod_oldest: dict[str, float] = {}
    loaded_models = 0
    loading = 0
    failing = 0
    oldest = now
    for model, copies in snap.placements.items():
        live = [c for c in copies.values() if c.state == CopyState.LOADED]
        if live:
            loaded_models += 1
        if any(c.state == CopyState.LOADING for c in copies.values()):
            loading += 1
        if copies and not live and any(c.state == CopyState.FAILED for c in copies.values()):
            failing += 1
        for pod, c in copies.items():
            if pod not in pod_used or c.state == CopyState.FAILED:
                continue
            pod_used[pod] += c.size
            pod_count[pod] += 1
            if c.state == CopyState.LOADED:
                t = lu.get(model, c.since)
                pod_oldest[pod] = min(pod_oldest.get(pod, now), t)
                oldest = min(oldest, t)
        if live:
            for pod, c in copies.items():
                copies_g.add_metric([model, pod, c.state], 1)
    for pid, p in snap.pods.items():
        cap.add_metric([pid], p.capacity_bytes)
        used.add_metric([pid], pod_used[pid])
        nmodels.add_metric([pid], pod_count[pid])
        hb_age.add_metric([pid], max(0.0, now - hb.get(pid, now)))
        lru_age.add_metric([pid], max(0.0, now - pod_oldest.get(pid, now)))
    managed = GaugeMetricFamily("meshserve_models_managed", "Registered concrete models")
    managed.add_metric([], len(snap.models) if managed_models is None else managed_models)
    loaded = GaugeMetricFamily("meshserve_models_loaded", "Models with at least one loaded copy")
    loaded.add_metric([], loaded_models)
    loading_g = GaugeMetricFamily("meshserve_models_loading", "Models with a load in progress")
    loading_g.add_metric([], loading)
    failing_g = GaugeMetricFamily("meshserve_models_failing", "Models whose latest load failed and that have no loaded copy")
    failing_g.add_metric([], failing)
    age = GaugeMetricFamily("meshserve_cache_age_seconds", "Now minus the oldest last-used time of any loaded model (ModelMesh's cache age)")
    age.add_metric([], max(0.0, now - oldest))
    pods_g = GaugeMetricFamily("meshserve_pods", "Registered runtime pods")
    pods_g.add_metric([], len(snap.pods))
    rev = GaugeMetricFamily("meshserve_state_revision", "Redis state revision")
    rev.add_metric([], snap.rev)
    loads = CounterMetricFamily("meshserve_loads", "Model loads reported by loaders", labels=["result"])
    for result in ("ok", "failed"):
        loads.add_metric([result], tallies.loads.get(result, 0))
    unloads = CounterMetricFamily("meshserve_evictions", "Model copies unloaded (evictions and scale-downs)")
    unloads.add_metric([], tallies.unloads)
    per_model = CounterMetricFamily("meshserve_model_loads", "Loads of a currently loaded model", labels=["model"])
    for model, copies in snap.placements.items():
        if any(c.state == CopyState.LOADED for c in copies.values()):
            per_model.add_metric([model], tallies.model_loads.get(model, 0))
    hist = HistogramMetricFamily("meshserve_loadmodel_seconds", "Time a loader took to pull and load a model")
    les = [str(b) for b in LOAD_BUCKETS] + ["+Inf"]
    hist.add_metric([], list(zip(les, tallies._bucket_counts + [tallies._load_n])), tallies._load_sum)
    return [cap, used, nmodels, hb_age, lru_age, copies_g, managed, loaded, loading_g, failing_g, age, pods_g, rev, loads, unloads, per_model, hist]
