"""The scorers of a placement decision: which of the pods that passed the filters is best,
each with a name, a weight and a one-line description (`meshserve explain` shows the scores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from meshserve.model import CopyState
from meshserve_placement.filters import _EMPTY, Context
from meshserve_placement.view import PodView


@dataclass(frozen=True)
class Scorer:
    name: str
    description: str
    weight: float
    score: Callable[[PodView, Context], float]  # 0..1, higher is better


def _free_space(p: PodView, ctx: Context) -> float:
    return max(0.0, (p.capacity - ctx.ix.get(p.id, _EMPTY).used) / p.capacity) if p.capacity else 0.0


def _spares_busy(p: PodView, ctx: Context) -> float:
    # Outweighs every other scorer together: a pod that can make room from idle copies always
    # wins over one that must evict busy copies, so busy eviction is the cluster's last resort.
    return 0.0 if ctx.busy.get(p.id) else 1.0


def _cheap_eviction(p: PodView, ctx: Context) -> float:
    if not ctx.evictions.get(p.id):
        return 1.0
    # Among the candidates that must evict, the one whose dearest victim is cheapest wins:
    # that is what makes the cluster one global LRU rather than one LRU per pod.
    return 0.5 * (1.0 - ctx.eviction_rank.get(p.id, 1.0))


def _holds_base(p: PodView, ctx: Context) -> float:
    # An adapter where its base is already booked costs its own bytes only; elsewhere it costs
    # a copy of the base too. Weighted to beat free space, models and loads together, but not
    # a pod that needs no eviction over one that does: a second copy of the base in idle memory
    # is better than evicting for the adapter.
    if not ctx.model.base:
        return 0.0
    c = ctx.ix.get(p.id, _EMPTY).models.get(ctx.model.base)
    return 1.0 if c is not None and c.state in (CopyState.LOADED, CopyState.LOADING) else 0.0


def _fewest_models(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + len(ctx.ix.get(p.id, _EMPTY).models))


def _least_loading(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + ctx.ix.get(p.id, _EMPTY).loading)


SCORERS: list[Scorer] = [
    Scorer("spares-busy", "prefer pods that make room without evicting a busy copy (busy eviction is the last resort)", 8.0, _spares_busy),
    Scorer("holds-base", "prefer pods that already hold an adapter's base (issue 17: the base is booked once per pod)", 4.0, _holds_base),
    Scorer("cheapest-eviction", "prefer pods that need no eviction, then those whose evictions are cheapest (global LRU)", 4.0, _cheap_eviction),
    Scorer("free-space", "prefer pods with more free bytes", 2.0, _free_space),
    Scorer("least-loading", "prefer pods with fewer loads in progress", 1.0, _least_loading),
    Scorer("fewest-models", "prefer pods holding fewer models", 0.5, _fewest_models),
]
