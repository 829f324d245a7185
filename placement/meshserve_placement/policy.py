"""Placement policy: pure functions over plain data, shared by the live service and the simulator.

A decision runs a chain of filters (which pods may take the model) and then scorers (which of
those is best), as Seldon's scheduler does. Every step has a name and a one-line description,
and every decision returns the trace of what each step said, so `meshserve explain` and the
"could not place" 503 can say exactly why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from meshserve.model import Copy, CopyState


@dataclass
class PodView:
    id: str
    capacity: int
    formats: list[str]
    healthy: bool = True
    max_loading: int = 2


@dataclass
class ModelView:
    id: str
    format: str
    size: int
    pinned: bool = False
    min_copies: int = 0
    max_copies: int = 0


@dataclass
class ClusterView:
    """What the policy sees. `copies[model][pod]` mirrors Redis; sizes are reserved bytes."""

    pods: dict[str, PodView]
    models: dict[str, ModelView]
    copies: dict[str, dict[str, Copy]] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)  # models with requests being served now
    excluded: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, pod) -> until

    def pod_models(self, pod: str) -> dict[str, Copy]:
        # Kept simple and O(models); the live service maintains an index (see PodIndex).
        return {m: c[pod] for m, c in self.copies.items() if pod in c}

    def used(self, pod: str) -> int:
        return sum(c.size for c in self.pod_models(pod).values() if c.state != CopyState.FAILED)

    def loading(self, pod: str) -> int:
        return sum(1 for c in self.pod_models(pod).values() if c.state == CopyState.LOADING)


@dataclass
class Context:
    model: ModelView
    cluster: ClusterView
    now: float
    evictions: dict[str, list[str]] = field(default_factory=dict)  # pod -> models to evict


@dataclass(frozen=True)
class Filter:
    name: str
    description: str
    check: Callable[[PodView, Context], str]  # "" when the pod passes, else the reason


@dataclass(frozen=True)
class Scorer:
    name: str
    description: str
    weight: float
    score: Callable[[PodView, Context], float]  # 0..1, higher is better


@dataclass
class Step:
    pod: str
    step: str
    result: str


@dataclass
class Decision:
    model: str
    pod: str | None
    evict: list[str]
    trace: list[Step]
    reason: str = ""

    def explain(self) -> list[str]:
        lines = [f"{s.pod}: {s.step}: {s.result}" for s in self.trace]
        lines.append(f"=> {self.pod}" + (f", evicting {', '.join(self.evict)}" if self.evict else "") if self.pod else f"=> not placed: {self.reason}")
        return lines


def _healthy(p: PodView, ctx: Context) -> str:
    return "" if p.healthy else "pod heartbeat expired"


def _format(p: PodView, ctx: Context) -> str:
    return "" if ctx.model.format in p.formats else f"runtime serves {', '.join(p.formats) or 'nothing'}, not {ctx.model.format}"


def _not_holding(p: PodView, ctx: Context) -> str:
    c = ctx.cluster.copies.get(ctx.model.id, {}).get(p.id)
    return "" if c is None or c.state == CopyState.FAILED else f"already holds a copy ({c.state})"


def _not_excluded(p: PodView, ctx: Context) -> str:
    until = ctx.cluster.excluded.get((ctx.model.id, p.id), 0.0)
    return "" if until <= ctx.now else f"a load failed here; excluded for {until - ctx.now:.0f}s more"


def evictable(pod: str, cluster: ClusterView) -> list[str]:
    """Models this pod could drop, least recently used first: loaded, not pinned, not busy,
    and not a copy that would take the model under its minimum."""
    out = []
    for m, c in cluster.pod_models(pod).items():
        if c.state != CopyState.LOADED or m in cluster.in_flight:
            continue
        mv = cluster.models.get(m)
        if mv is not None:
            if mv.pinned:
                continue
            live = sum(1 for x in cluster.copies.get(m, {}).values() if x.state == CopyState.LOADED)
            if live <= mv.min_copies:
                continue
        out.append(m)
    out.sort(key=lambda m: (cluster.last_used.get(m, 0.0), m))
    return out


def _fits(p: PodView, ctx: Context) -> str:
    free = p.capacity - ctx.cluster.used(p.id)
    need = ctx.model.size
    if need > p.capacity:
        return f"model needs {need} bytes, more than the pod's whole capacity {p.capacity}"
    if free >= need:
        return ""
    chosen = []
    for m in evictable(p.id, ctx.cluster):
        free += ctx.cluster.copies[m][p.id].size
        chosen.append(m)
        if free >= need:
            ctx.evictions[p.id] = chosen
            return ""
    return f"needs {need} bytes; only {free} free even after evicting every idle model"


FILTERS: list[Filter] = [
    Filter("pod-healthy", "the pod's heartbeat is fresh", _healthy),
    Filter("serves-format", "the pod's runtime serves the model's format", _format),
    Filter("not-holding", "the pod does not already hold or load this model", _not_holding),
    Filter("not-excluded", "no load of this model failed on the pod recently", _not_excluded),
    Filter("fits", "free bytes, after evicting idle least-recently-used models, cover the model", _fits),
]


def _free_space(p: PodView, ctx: Context) -> float:
    return max(0.0, (p.capacity - ctx.cluster.used(p.id)) / p.capacity) if p.capacity else 0.0


def _cheap_eviction(p: PodView, ctx: Context) -> float:
    ev = ctx.evictions.get(p.id)
    if not ev:
        return 1.0
    newest = max(ctx.cluster.last_used.get(m, 0.0) for m in ev)
    age = max(0.0, ctx.now - newest)
    # Evicting something idle for an hour is nearly free; evicting something used just now is not.
    return 0.5 * min(1.0, age / 3600.0)


def _fewest_models(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + len(ctx.cluster.pod_models(p.id)))


def _least_loading(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + ctx.cluster.loading(p.id))


SCORERS: list[Scorer] = [
    Scorer("cheapest-eviction", "prefer pods that need no eviction, then those whose evictions are oldest", 4.0, _cheap_eviction),
    Scorer("free-space", "prefer pods with more free bytes", 2.0, _free_space),
    Scorer("least-loading", "prefer pods with fewer loads in progress", 1.0, _least_loading),
    Scorer("fewest-models", "prefer pods holding fewer models", 0.5, _fewest_models),
]


def place(model: ModelView, cluster: ClusterView, now: float) -> Decision:
    """Choose a pod for one more copy of `model`, with the evictions that make room."""
    ctx = Context(model, cluster, now)
    trace: list[Step] = []
    candidates: list[PodView] = []
    for p in sorted(cluster.pods.values(), key=lambda p: p.id):
        for f in FILTERS:
            why = f.check(p, ctx)
            if why:
                trace.append(Step(p.id, f.name, "rejected: " + why))
                break
        else:
            candidates.append(p)
    if not candidates:
        reason = "no pod can take it: " + "; ".join(f"{s.pod} {s.result}" for s in trace) if trace else "no runtime pods are registered"
        return Decision(model.id, None, [], trace, reason)
    best, best_score = None, -1.0
    for p in candidates:
        total = sum(s.weight * s.score(p, ctx) for s in SCORERS)
        trace.append(Step(p.id, "score", f"{total:.3f} (" + ", ".join(f"{s.name}={s.score(p, ctx):.2f}" for s in SCORERS) + ")"))
        if total > best_score:
            best, best_score = p, total
    assert best is not None
    return Decision(model.id, best.id, ctx.evictions.get(best.id, []), trace)
