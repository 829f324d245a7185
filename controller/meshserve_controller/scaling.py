"""Scale to zero: a runtime pool that no InferenceService uses goes to zero pods, and comes
back to one as soon as one does. Pure: pools and the runtimes in use in, scale requests out.

ModelMesh's `scaleToZero` has the same rule (a grace period after the last predictor using the
runtime goes). Only the 0 <-> 1 steps are ours. From one pod up, the HPA (istio/autoscaling.yaml)
scales on cache pressure, and a Kubernetes HPA stops acting on a workload at zero replicas, so
the two never fight. Scaling down drains each pod through its preStop hook, as any scale-down
does; a pool nobody uses holds nothing that is still wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from meshserve.k8s.objects import Pool

DEFAULT_GRACE_SECONDS = 60.0  # ModelMesh's scaleToZero.gracePeriodSeconds default


@dataclass(frozen=True)
class Scale:
    workload: str
    runtime: str
    replicas: int
    why: str


def plan_scaling(
    pools: Iterable[Pool], in_use: set[str], unused_since: dict[str, float], now: float, grace_seconds: float = DEFAULT_GRACE_SECONDS,
    replicas: int = 1,
) -> tuple[list[Scale], dict[str, float]]:
    """What to scale now, and the new `unused_since` (runtime -> when it was first seen
    unused; the caller keeps it between passes, so the grace period survives short flaps).
    `replicas`: what a pool comes back to from zero (model-serving-config podsPerRuntime)."""
    out: list[Scale] = []
    since: dict[str, float] = {}
    for p in sorted(pools, key=lambda p: p.workload):
        if p.runtime in in_use:
            if p.replicas == 0:
                out.append(Scale(p.workload, p.runtime, max(1, replicas), f"an InferenceService uses ServingRuntime {p.runtime}"))
            continue
        first = since[p.runtime] = min(unused_since.get(p.runtime, now), since.get(p.runtime, now))
        if p.replicas > 0 and now - first >= grace_seconds:
            out.append(Scale(p.workload, p.runtime, 0, f"no InferenceService has used ServingRuntime {p.runtime} for {now - first:.0f}s"))
    return out, since
