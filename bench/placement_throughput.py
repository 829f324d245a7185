"""Placement decisions per second at scale: 1,000,000 models on 1,000 pods, through policy.place.

    python -m bench.placement_throughput          # ~1 minute; writes bench/results/placement_throughput.json

The cluster is full (total capacity 10% of all model bytes, every pod filled), so each
decision for a cold model has to choose evictions: the expensive case. Each decision is
applied to the view before the next, as the leader does, so the index is exercised too.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

import numpy as np

from meshserve.model import Copy, CopyState
from meshserve_placement import policy

MIB = 1 << 20


def build(models: int, pods: int, fraction: float = 0.10, seed: int = 3) -> tuple[policy.ClusterView, list[str]]:
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(math.log(64 * MIB), 1.0, models).astype(np.int64).tolist()
    per_pod = int(sum(sizes) * fraction / pods)
    # Fill the pods one after another with the first models, each used once at a different
    # time; the rest start cold. A pod is done when under 16 MiB is free, so nearly every load
    # must evict. The view is built once from it all, as the leader builds its own (reload.py).
    unloaded: list[str] = []
    copies: dict[str, dict[str, Copy]] = {}
    last_used: dict[str, float] = {}
    pod_i, free, t = 0, per_pod, 0.0
    for i in range(models):
        m = f"m{i}"
        if pod_i < pods and free < 16 * MIB:
            pod_i, free = pod_i + 1, per_pod
        if pod_i >= pods or sizes[i] > free:
            unloaded.append(m)
            continue
        free -= sizes[i]
        copies[m] = {f"pod-{pod_i}": Copy(CopyState.LOADED, sizes[i], 0.0)}
        last_used[m] = t
        t += 0.001
    view = policy.ClusterView(
        pods={f"pod-{i}": policy.PodView(f"pod-{i}", per_pod, ["sklearn"]) for i in range(pods)},
        models={f"m{i}": policy.ModelView(f"m{i}", "sklearn", sizes[i]) for i in range(models)},
        copies=copies, last_used=last_used, uses={m: 1 for m in last_used},
    )
    return view, unloaded


def run(models: int, pods: int, decisions: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    view, cold = build(models, pods)
    setup = time.perf_counter() - t0
    loaded = sum(1 for cs in view.copies.values() if cs)
    rng = random.Random(5)
    now = 10_000.0
    place_s = 0.0
    evictions = rejected = placed = 0
    t1, c1 = time.perf_counter(), time.process_time()
    for k in range(decisions):
        m = cold[rng.randrange(len(cold))]
        if view.copies.get(m):
            continue
        now += 0.001
        view.touch(m, now)
        placed += 1
        t = time.process_time()
        d = policy.place(view.models[m], view, now)
        place_s += time.process_time() - t
        if d.pod is None:
            rejected += 1
            continue
        for v in d.evict:
            view.set_copies(v, {p: c for p, c in view.copies[v].items() if p != d.pod})
        view.set_copies(m, {d.pod: Copy(CopyState.LOADED, view.models[m].size, now)})
        evictions += len(d.evict)
    total, total_cpu = time.perf_counter() - t1, time.process_time() - c1
    return {
        "models": models, "pods": pods, "loaded_models": loaded, "decisions": placed,
        "setup_seconds": round(setup, 1),
        # CPU seconds of this process: the machine is shared, so wall time says more about the neighbours.
        "decisions_per_cpu_s": round(placed / place_s),
        "decisions_per_cpu_s_including_apply": round(placed / total_cpu),
        "decisions_per_wall_s_including_apply": round(placed / total),
        "rejected": rejected,
        "mean_evictions_per_decision": round(evictions / placed, 2),
        "target_decisions_per_s": 10_000,
        "meets_target": placed / place_s >= 10_000,
    }


def main() -> None:
    from bench.common import write

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=1_000_000)
    ap.add_argument("--pods", type=int, default=1_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    args = ap.parse_args()
    doc = run(args.models, args.pods, args.decisions)
    print(doc)
    print(write("placement_throughput", doc))


if __name__ == "__main__":
    main()
