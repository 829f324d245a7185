"""Placement simulator: replays a request trace through the live policy code (policy.place)
and compares its hit ratio with a per-pod LRU bounded by model count (Ray Serve
multiplexing), a per-pod byte-bounded LRU with random placement (ModelMesh-like) and
Belady's offline optimum at the same capacity.

    python -m bench.placement_sim            # ~4 minutes on 2 cores; writes JSON and a PNG
    python -m bench.placement_sim --quick    # smaller trace, for a smoke test

The trace: Zipf s=1.0 over N models (popularity independent of size), lognormal sizes
(median 64 MiB, sigma 1), requests at a constant rate (only used to turn counts into per-second
figures). Loads take no time in the simulation, and every model gets one copy: we measure the
eviction policy and placement, not load latency or replication.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from meshserve.model import Copy, CopyState
from meshserve_placement import policy, sizes

MIB = 1 << 20


@dataclass
class Workload:
    sizes: list[int]  # bytes, by model index
    trace: list[int]  # model index per request
    rate: float  # requests per second
    warmup: int  # requests before measuring

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def workload(models: int = 100_000, requests: int = 1_000_000, s: float = 1.0, seed: int = 1, rate: float = 1000.0) -> Workload:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, models + 1) ** s
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(requests)), models - 1)
    trace = rng.permutation(models)[ranks]  # popularity rank is independent of model id and size
    sizes = rng.lognormal(math.log(64 * MIB), 1.0, models).astype(np.int64)
    return Workload(sizes.tolist(), trace.tolist(), rate, requests // 2)


@dataclass
class Result:
    name: str
    hit_ratio: float
    loads_per_s: float
    evictions_per_s: float
    seconds: float
    extra: dict[str, Any]

    def row(self) -> dict[str, Any]:
        return {"policy": self.name, "hit_ratio": round(self.hit_ratio, 4), "loads_per_s": round(self.loads_per_s, 2),
                "evictions_per_s": round(self.evictions_per_s, 2), "wall_seconds": round(self.seconds, 1), **self.extra}


def _result(name: str, w: Workload, hits: int, loads: int, evictions: int, t0: float, **extra: Any) -> Result:
    measured = len(w.trace) - w.warmup
    secs = measured / w.rate
    return Result(name, hits / measured, loads / secs, evictions / secs, time.perf_counter() - t0, extra)


def simulate_policy(w: Workload, pods: int, capacity: int, horizon_s: float = policy.DEFAULT_HORIZON_S) -> Result:
    """Our policy: the live placement code, with one ClusterView across all pods.
    horizon_s=0 makes its eviction order plain global LRU."""
    t0 = time.perf_counter()
    per_pod = capacity // pods
    view = policy.ClusterView(
        pods={f"pod-{i}": policy.PodView(f"pod-{i}", per_pod, ["m"]) for i in range(pods)},
        models={},
        horizon_s=horizon_s,
    )
    for pv in view.pods.values():  # the live leader's booking: the unload reserve kept aside
        policy.reserve_room(pv, per_pod, pv.max_loading)
    names = [f"m{i}" for i in range(len(w.sizes))]
    reported: dict[str, int] = {}  # model -> the size its load reported (the leader's `reported`)
    hits = loads = evictions = rejected = decisions = 0
    place_s = 0.0
    copies = view.copies  # read-only: writes go through view.set_copies
    for i, mi in enumerate(w.trace):
        now = i / w.rate
        m = names[mi]
        measuring = i >= w.warmup
        held = copies.get(m)
        view.touch(m, now)
        if held:
            if measuring:
                hits += 1
            continue
        mv = view.models.get(m)
        if mv is None:
            # Booked as the leader books it (sizes.booked_size): a model never loaded has no
            # size yet (the trace's sizes are what a load reports); after its first load it
            # keeps the reported one. A decision can thus undershoot a large model's first load,
            # as the live service's can; the pod's next decision evicts the difference.
            mv = policy.ModelView(m, "m", sizes.booked_size(0, reported.get(m, 0)))
            view.set_model(mv)
        t = time.perf_counter()
        d = policy.place(mv, view, now)
        place_s += time.perf_counter() - t
        decisions += 1
        if d.pod is None:
            rejected += measuring
            continue
        reported[m] = w.sizes[mi]
        land(view, d, mv, reported[m], now)
        if measuring:
            loads += 1
            evictions += len(d.evict)
    name = "meshserve (size/frequency-aware global LRU)" if horizon_s else "meshserve policy with plain global LRU (horizon 0)"
    return _result(name, w, hits, loads, evictions, t0,
                   rejected=rejected, decisions_per_s=round(decisions / place_s) if place_s else None)


def land(view: policy.ClusterView, d: policy.Decision, mv: policy.ModelView, reported: int, now: float) -> None:
    """A decision carried out at once: its evictions gone, the model's copy LOADED on the pod.
    The load reports `reported` bytes; the copy and later decisions book it (reducers.load_result)."""
    assert d.pod is not None
    for v in d.evict:
        view.set_copies(v, {p: c for p, c in view.copies[v].items() if p != d.pod})
    mv = replace(mv, size=sizes.booked_size(0, reported))
    view.set_model(mv)
    view.set_copies(mv.id, {d.pod: Copy(CopyState.LOADED, mv.size, now)})


def simulate_pod_lru(w: Workload, pods: int, capacity: int, by_count: bool, seed: int = 7) -> Result:
    """Per-pod LRU; a miss goes to a random pod, a hit to the pod holding the model.

    by_count=True is Ray Serve multiplexing: each replica keeps at most K models, K = the pod's
    bytes over the mean model size, whatever their sizes, so its memory can overrun.
    by_count=False bounds each pod by bytes (ModelMesh's per-pod weighted LRU, random placement)."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    per_pod = capacity // pods
    mean = w.total_bytes / len(w.sizes)
    k = max(1, int(per_pod // mean))
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(pods)]
    used = [0] * pods
    where: dict[int, int] = {}
    hits = loads = evictions = 0
    over = 0
    peak = 0.0
    for i, m in enumerate(w.trace):
        measuring = i >= w.warmup
        p = where.get(m)
        if p is not None:
            caches[p].move_to_end(m)
            hits += measuring
            continue
        p = rng.randrange(pods)
        c = caches[p]
        s = w.sizes[m]
        if by_count:
            while len(c) >= k:
                v, _ = c.popitem(last=False)
                used[p] -= w.sizes[v]
                del where[v]
                evictions += measuring
        else:
            if s > per_pod:
                continue
            while used[p] + s > per_pod:
                v, _ = c.popitem(last=False)
                used[p] -= w.sizes[v]
                del where[v]
                evictions += measuring
        c[m] = None
        used[p] += s
        where[m] = p
        loads += measuring
        if measuring and used[p] > per_pod:
            over += 1
            peak = max(peak, used[p] / per_pod)
    name = f"per-pod LRU by count (Ray Serve, {k} models/pod)" if by_count else "per-pod LRU by bytes, random placement"
    extra: dict[str, Any] = {}
    if by_count:
        extra = {"models_per_pod": k, "loads_over_pod_memory": over, "peak_pod_memory_ratio": round(peak, 2)}
    return _result(name, w, hits, loads, evictions, t0, **extra)


def simulate_belady(w: Workload, capacity: int) -> Result:
    """Belady: on a miss, evict the models whose next request is furthest away. One pool of the
    whole capacity (no per-pod fragmentation, which only helps it). Every miss loads: a serving
    system must load a model to answer it, so there is no bypass."""
    t0 = time.perf_counter()
    tr = w.trace
    n = len(tr)
    never = 1 << 62
    nxt = [0] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        m = tr[i]
        nxt[i] = seen.get(m, never)
        seen[m] = i
    used = 0
    cache: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    hits = loads = evictions = 0
    for i, m in enumerate(tr):
        measuring = i >= w.warmup
        if m in cache:
            hits += measuring
        else:
            s = w.sizes[m]
            while used + s > capacity:
                k, v = heapq.heappop(heap)
                if cache.get(v) == -k:
                    del cache[v]
                    used -= w.sizes[v]
                    evictions += measuring
            used += s
            loads += measuring
        cache[m] = nxt[i]
        heapq.heappush(heap, (-nxt[i], m))
    return _result("Belady (offline optimum)", w, hits, loads, evictions, t0)


def run_all(w: Workload, pods: int, fraction: float, log: Callable[[str], None] = print) -> list[Result]:
    cap = int(w.total_bytes * fraction)
    out = []
    for f in (lambda: simulate_policy(w, pods, cap), lambda: simulate_pod_lru(w, pods, cap, True),
              lambda: simulate_pod_lru(w, pods, cap, False), lambda: simulate_belady(w, cap)):
        r = f()
        log(f"  capacity {fraction:.1%}: {r.name}: hit ratio {r.hit_ratio:.4f}, {r.loads_per_s:.1f} loads/s, "
            f"{r.evictions_per_s:.1f} evictions/s ({r.seconds:.0f}s)")
        out.append(r)
    return out


def main() -> None:
    from bench.common import RESULTS, write

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10,000 models, 200,000 requests")
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--requests", type=int, default=600_000, help="trace length; the first half warms the caches")
    args = ap.parse_args()
    models, requests = (10_000, 200_000) if args.quick else (100_000, args.requests)
    w = workload(models, requests)
    curve: dict[float, list[Result]] = {}
    for frac in (0.025, 0.05, 0.10, 0.20):
        curve[frac] = run_all(w, args.pods, frac)
    head = curve[0.10]
    ours, ray, _, belady = head
    plain = simulate_policy(w, args.pods, int(w.total_bytes * 0.10), horizon_s=0.0)
    print(f"  capacity 10.0%: {plain.name}: hit ratio {plain.hit_ratio:.4f}")
    doc = {
        "workload": {"models": models, "requests": requests, "warmup": w.warmup, "zipf_s": 1.0,
                     "sizes": "lognormal, median 64 MiB, sigma 1", "rate_per_s": w.rate, "pods": args.pods,
                     "total_model_bytes": w.total_bytes},
        "policy": {"horizon_s": policy.DEFAULT_HORIZON_S, "ref_size": policy.DEFAULT_REF_SIZE,
                   "full_scan_pods": policy.FULL_SCAN_PODS, "sample_pods": policy.SAMPLE_PODS, "victim_pods": policy.VICTIM_PODS},
        "at_10_percent": [r.row() for r in head] + [plain.row()],
        "ratio_to_belady": round(ours.hit_ratio / belady.hit_ratio, 4),
        "targets": {"ratio_to_belady_ge_0.95": ours.hit_ratio >= 0.95 * belady.hit_ratio, "no_worse_than_ray": ours.hit_ratio >= ray.hit_ratio},
        "curve": {f"{f:.3f}": [r.row() for r in rs] for f, rs in curve.items()},
    }
    name = "placement_sim_quick" if args.quick else "placement_sim"
    print(write(name, doc))
    from bench.plots import hit_ratio

    print(hit_ratio(json.loads((RESULTS / f"{name}.json").read_text()), name))


if __name__ == "__main__":
    main()
