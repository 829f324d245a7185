"""Placement policy: pure functions over plain data, shared by the live service and the simulator.

A decision runs a chain of filters (which pods may take the model) and then scorers (which of
those is best), as Seldon's scheduler does. Every step has a name and a one-line description,
and every decision returns the trace of what each step said, so `meshserve explain` and the
"could not place" 503 can say exactly why. The parts live in their own modules; this one is the
policy's public facade, kept on purpose (not a compatibility shim): the simulator
(bench/placement_sim.py), the throughput bench and the policy tests program against "the policy"
as one thing and must not care how it is split. Modules inside this package import the parts
directly.

- view.py: `ClusterView`, the cluster and its index (bytes per pod, eviction heaps); eviction order.
- filters.py: which pods may take a model, and why not.
- scorers.py: which of those is best.
- decide.py: `place()`, the candidate set on large clusters, and the `Decision` with its trace.
"""

from __future__ import annotations

from meshserve_placement.decide import FULL_SCAN_PODS, SAMPLE_PODS, VICTIM_PODS, Decision, Verdict, candidate_pods, generic_refusal, place
from meshserve_placement.filters import FILTERS, Context, Filter
from meshserve_placement.scorers import SCORERS, Scorer
from meshserve_placement.view import (
    DEFAULT_HORIZON_S, DEFAULT_LANDED_GRACE_S, DEFAULT_REF_SIZE, ClusterView, ModelView, PodView, RuntimeView, evictable,
    reserve_room, unload_reserve,
)

__all__ = [
    "FULL_SCAN_PODS", "SAMPLE_PODS", "VICTIM_PODS", "Decision", "Verdict", "candidate_pods", "generic_refusal", "place",
    "FILTERS", "Context", "Filter", "SCORERS", "Scorer",
    "DEFAULT_HORIZON_S", "DEFAULT_LANDED_GRACE_S", "DEFAULT_REF_SIZE", "ClusterView", "ModelView", "PodView", "RuntimeView", "evictable",
    "reserve_room", "unload_reserve",
]
