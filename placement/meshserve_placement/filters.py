"""The filters of a placement decision: which pods may take the model, each with a name and a
one-line description, and the reason a pod is refused (`meshserve explain` shows them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from meshserve.model import Copy, CopyState
from meshserve_placement.view import ClusterView, ModelView, PodView, _PodIndex


@dataclass
class Context:
    model: ModelView
    cluster: ClusterView
    now: float
    ix: dict[str, _PodIndex] = field(default_factory=dict)  # the cluster's per-pod index
    held: dict[str, Copy] = field(default_factory=dict)  # the model's own copies
    evictions: dict[str, list[str]] = field(default_factory=dict)  # pod -> models to evict
    eviction_rank: dict[str, float] = field(default_factory=dict)  # pod -> 0 (cheapest) .. 1
    runtime: str | None = None  # the runtime that serves the model (ClusterView.serving_runtime)
    later: dict[str, str] = field(default_factory=dict)  # pod -> what must free up before the model fits there
    busy: dict[str, list[str]] = field(default_factory=dict)  # pod -> busy copies among its evictions (last resort)
    base: ModelView | None = None  # an adapter's base (issue 17), when registered
    with_base: set[str] = field(default_factory=set)  # pods where the base must be loaded with the adapter


@dataclass(frozen=True)
class Filter:
    name: str
    description: str
    check: Callable[[PodView, Context], str]  # "" when the pod passes, else the reason


def _healthy(p: PodView, ctx: Context) -> str:
    if p.healthy:
        return ""
    # A pod still registered with a late heartbeat comes back or is withdrawn within the stall
    # grace. Under CPU starvation every pod's heartbeat is late at once (issue 19's peer run:
    # "no runtime pod can hold it" for models that fit): worth waiting for, like room.
    if not _runtime(p, ctx) and p.capacity - ctx.cluster.kept_bytes(p.id) >= ctx.model.size:
        ctx.later[p.id] = "its heartbeat is late (placed once it comes back)"
    return "pod heartbeat expired"


def _not_draining(p: PodView, ctx: Context) -> str:
    return "pod is draining (shutting down)" if p.draining else ""


def _runtime(p: PodView, ctx: Context) -> str:
    want = ctx.runtime
    if want is None:
        where = "no ServingRuntime" if ctx.cluster.runtimes else "no registered pod's runtime"
        return f"{where} auto-selects format {ctx.model.format}: name a runtime in `runtime:` or add one that does"
    if p.runtime != want:
        how = "named in its `runtime:`" if ctx.model.runtime else f"the first by name that auto-selects {ctx.model.format}"
        return f"runs {p.runtime or 'an unnamed runtime'}; the model's runtime is {want} ({how})"
    if ctx.model.format not in p.formats:
        return f"its runtime {p.runtime or '(unnamed)'} declares {', '.join(p.formats) or 'no formats'}, not {ctx.model.format}"
    return ""


def _not_holding(p: PodView, ctx: Context) -> str:
    c = ctx.held.get(p.id)
    return "" if c is None or c.state == CopyState.FAILED else f"already holds a copy ({c.state})"


def _not_excluded(p: PodView, ctx: Context) -> str:
    if not ctx.cluster.excluded:
        return ""
    until = ctx.cluster.excluded.get((ctx.model.id, p.id), 0.0)
    return "" if until <= ctx.now else f"a load failed here; excluded for {until - ctx.now:.0f}s more"


def _base_loadable(p: PodView, ctx: Context) -> str:
    base = ctx.model.base
    if not base:
        return ""
    c = ctx.cluster.copies.get(base, {}).get(p.id)
    if c is not None and c.state in (CopyState.LOADED, CopyState.LOADING):
        return ""
    if c is not None and c.state == CopyState.UNLOADING:
        ctx.later[p.id] = f"its base {base} is being unloaded here"
        return f"its base {base} is being unloaded here (placed once that is done)"
    bm = ctx.base
    if bm is None:
        return f"its base {base} is not registered"
    until = ctx.cluster.excluded.get((base, p.id), 0.0) if ctx.cluster.excluded else 0.0
    if until > ctx.now:
        return f"a load of its base {base} failed here; excluded for {until - ctx.now:.0f}s more"
    if p.runtime == ctx.cluster.serving_runtime(bm) and bm.format in p.formats:
        ctx.with_base.add(p.id)  # `fits` books base plus adapter; the decision loads the base first
    # Else the base is served by another runtime than the adapter's (an MLServer pool whose
    # MLModel loads the base from the path the loader hands it): no copy of the base can go
    # here, and the adapter is booked as an ordinary model, at what its load reports.
    return ""


_EMPTY = _PodIndex()


def _fits(p: PodView, ctx: Context) -> str:
    pix = ctx.ix.get(p.id, _EMPTY)
    free = p.capacity - pix.used
    need = ctx.model.size
    if p.id in ctx.with_base and ctx.base is not None:
        need += ctx.base.size  # booked once per pod: as a copy of the base, loaded with this adapter
    what = "model and its base need" if p.id in ctx.with_base else "model needs"
    if need > p.capacity:
        if p.limit > p.capacity:
            return (f"{what} {need} bytes, more than the pod's whole capacity {p.capacity} "
                    f"({p.limit} less {p.limit - p.capacity} kept for unloads: unload_reserve_fraction)")
        return f"{what} {need} bytes, more than the pod's whole capacity {p.capacity}"
    if free >= need:
        return ""
    chosen, freed = ctx.cluster.victims(p.id, need - free, spare=ctx.model.base)
    free += freed
    if free >= need:
        ctx.evictions[p.id] = chosen
        return ""
    # Last resort: busy copies, least valuable first. A copy used within the busy window is
    # not protected any more once idle ones cannot make room: under churn more distinct
    # models are used per window than fit, and protecting them all starved new models.
    busy, more = ctx.cluster.busy_victims(p.id, need - free, ctx.now, chosen + [ctx.model.base] if ctx.model.base else chosen)
    if free + more >= need:
        ctx.evictions[p.id] = chosen + busy
        ctx.busy[p.id] = busy
        return ""
    why = f"{'needs' if what == 'model needs' else 'needs, with its base,'} {need} bytes; only {free + more} free even after evicting every idle and busy model"
    kept = ctx.cluster.kept_bytes(p.id)
    base_here = ctx.model.base and pix.models.get(ctx.model.base)
    if base_here and base_here.state in (CopyState.LOADED, CopyState.LOADING):
        kept += base_here.size  # the adapter's own base stays for it
    if p.capacity - kept >= need:
        # The rest is held by copies that will free up by themselves (loads land and become
        # evictable, unloads complete, a copy just landed for held requests is served): wait.
        ctx.later[p.id] = f"{need - free - more} more bytes must free up (copies loading, unloading or just loaded)"
        return why + "; fits once loading, unloading or just-loaded copies free up"
    return why + f"; {kept} bytes are pinned or kept for minCopies"


FILTERS: list[Filter] = [
    Filter("pod-healthy", "the pod's heartbeat is fresh", _healthy),
    Filter("not-draining", "the pod is not shutting down", _not_draining),
    Filter("serves-model", "the pod runs the model's runtime (its `runtime:`, else the first by name that auto-selects its format), which declares the format", _runtime),
    Filter("not-holding", "the pod does not already hold or load this model", _not_holding),
    Filter("not-excluded", "no load of this model failed on the pod recently", _not_excluded),
    Filter("base-loadable", "an adapter's pod holds its base or can load it (no recent failed load of the base there, the base not being unloaded there); where the base's runtime runs, a copy of the base is booked and loaded with the adapter", _base_loadable),
    Filter("fits", "free bytes, after evicting the cheapest idle models (size-aware LRU; a base only after all of its adapters there, never the adapter's own base) and, as a last resort, the cheapest busy ones (never pinned or minCopies), cover the model, and its base when the pod does not hold it (when only loading, unloading or just-loaded copies are in the way, the decision is to wait for them)", _fits),
]
