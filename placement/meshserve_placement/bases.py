"""Adapters over a shared base (issue 17 item 2): pure rules the leader and the simulator share.

An adapter (a model whose spec names a base, `ModelSpec.base`) needs its base resident on its
pod. Placement books the base there once, as an ordinary copy of the base's own registered
model, placed in the same decision as the adapter when the pod does not hold it yet
(`Decision.with_base`), and loaded first: the adapter's load order is held back until the base's
copy on that pod is LOADED (`waits_for_base`), so the runtime finds the base resident, shares it,
and the adapter reports its own bytes only (loader/meshserve_loader/builtin/table.py
`load_with_base`). The rest of the rules live where their kind lives:

- where an adapter goes: the `base-loadable` filter and `fits` (base plus adapter where the base
  is not booked), the `holds-base` scorer (filters.py, scorers.py);
- a base is never evicted while its adapters have copies on the pod; they go first, the base in
  the same decision once they all go (ClusterView.victims, `base_stays`); never scaled down or
  unloaded from such a pod either (copies.plan_copies);
- a base's recency and frequency include its adapters' use (ClusterView.touch).
"""

from __future__ import annotations

from typing import Mapping

from meshserve.model import CopyState
from meshserve_placement.view import ClusterView


def resolve_base(name: str, aliases: Mapping[str, str], models: Mapping[str, object]) -> str:
    """The concrete id of the base an adapter names (an InferenceService name, or a concrete
    id): the alias's current model, as the loader resolves it (State.resolve). "" when the
    name is empty or nothing is registered under it yet."""
    if not name:
        return ""
    if name in aliases:
        return aliases[name]
    return name if name in models else ""


def waits_for_base(view: ClusterView, model: str, pod: str) -> bool:
    """The adapter `model`'s load on `pod` waits: its base's copy there is still loading. Once
    the base is LOADED the adapter's order goes and the runtime shares the resident base. A
    base copy that failed holds it too: the leader fails the adapters queued behind it in the
    same handler (events.py), and none may be sent meanwhile. A base copy gone for another
    reason does not hold the adapter up: the runtime then loads the base itself with the
    adapter and reports both (the old, conservative booking)."""
    mv = view.models.get(model)
    if mv is None or not mv.base:
        return False
    c = view.copies.get(mv.base, {}).get(pod)
    return c is not None and c.state in (CopyState.LOADING, CopyState.FAILED)


def base_priority(prio: float) -> float:
    """The queue priority of a base loaded for an adapter: just ahead of the adapter's."""
    return prio - 1e-3
