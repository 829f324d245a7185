"""A placement decision: the candidate pods, the filters' verdicts, the scorers' choice, and
the trace that explains it (`meshserve explain`, the "could not place" 503).

On large clusters a decision considers a bounded candidate set: the pods holding the globally
cheapest evictions (global LRU) plus a random sample (power of d choices).
bench/placement_sim.py measures both hit ratio and decisions/s.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from meshserve.model import CopyState
from meshserve_placement.filters import FILTERS, Context
from meshserve_placement.scorers import SCORERS
from meshserve_placement.view import ClusterView, ModelView, PodView

# At most this many pods are checked one by one; larger clusters use the candidate set below.
FULL_SCAN_PODS = 16
SAMPLE_PODS = 4  # random pods added to the candidate set (power of d choices)
VICTIM_PODS = 3  # pods holding the globally cheapest evictions added to the candidate set


@dataclass
class Verdict:
    pod: str
    step: str
    result: str = ""
    scores: tuple[float, ...] | None = None  # per SCORERS, formatted only when explained

    def text(self) -> str:
        if self.scores is None:
            return self.result
        total = sum(s.weight * v for s, v in zip(SCORERS, self.scores))
        return f"{total:.3f} (" + ", ".join(f"{s.name}={v:.2f}" for s, v in zip(SCORERS, self.scores)) + ")"


@dataclass
class Decision:
    model: str
    pod: str | None
    evict: list[str]
    trace: list[Verdict]
    reason: str = ""
    candidates: dict[str, str] = field(default_factory=dict)  # on large clusters: pod -> why considered
    pods_total: int = 0
    waits_for: str = ""  # not placed because this runtime's pool has no pods yet: worth waiting
    # Not placed now, but it fits once copies that are busy, loading or unloading free up (on
    # these pods): worth waiting for, up to the cold-start timeout, rather than a 503.
    waits_for_room: list[str] = field(default_factory=list)
    # The busy copies among `evict` (requests in flight or used within the busy window): evicted
    # only because idle ones did not free enough room (the `fits` filter's last resort).
    evict_busy: list[str] = field(default_factory=list)
    # An adapter (issue 17): its base, and whether a copy of the base goes on `pod` with this
    # decision (booked there once, loaded before the adapter; bases.py).
    base: str = ""
    with_base: bool = False

    def refused_after_failures(self) -> bool:
        """Not placed, and some pod refused only because a load of the model failed there."""
        return self.pod is None and any(v.step == "not-excluded" for v in self.trace)

    @property
    def considered(self) -> str:
        if not self.candidates:
            return ""
        return f"considered {len(self.candidates)} of {self.pods_total} pods: " + ", ".join(f"{p} ({w})" for p, w in sorted(self.candidates.items()))

    def explain(self) -> list[str]:
        lines = [self.considered] if self.candidates else []
        lines += [f"{s.pod}: {s.step}: {s.text()}" for s in self.trace]
        busy = f" (busy, evicted as a last resort: {', '.join(self.evict_busy)})" if self.evict_busy else ""
        base = (f", with its base {self.base} (loaded first)" if self.with_base else f", beside its base {self.base}") if self.base and self.pod else ""
        lines.append(f"=> {self.pod}{base}" + (f", evicting {', '.join(self.evict)}{busy}" if self.evict else "") if self.pod else f"=> not placed: {self.reason}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pod": self.pod,
            "evict": self.evict,
            "evict_busy": self.evict_busy,
            "base": self.base,
            "with_base": self.with_base,
            "reason": self.reason,
            "considered": self.considered,
            "trace": [{"pod": s.pod, "step": s.step, "result": s.text()} for s in self.trace],
        }


_ASK: Any = object()


def candidate_pods(model: ModelView, cluster: ClusterView, now: float, runtime: Any = _ASK) -> tuple[list[PodView], dict[str, str]]:
    """All pods on small clusters; on large ones the pods that hold the globally cheapest
    evictions plus a random sample, so a decision stays O(1) in the number of pods."""
    if len(cluster.pods) <= FULL_SCAN_PODS:
        return sorted(cluster.pods.values(), key=lambda p: p.id), {}
    if runtime is _ASK:  # place() passes the one it already has
        runtime = cluster.serving_runtime(model)
    pool = cluster.pool(runtime) if runtime is not None else []
    if len(pool) <= FULL_SCAN_PODS:
        # Few pods run this model's runtime (or none: every pod is checked, so the trace says
        # why each was refused): look at all of them rather than sample a mostly foreign cluster.
        ids = pool or sorted(cluster.pods)[:FULL_SCAN_PODS]
        return [cluster.pods[i] for i in ids], {i: f"runs {runtime}" for i in pool}
    pooled = len(pool) < len(cluster.pods)
    ids: dict[str, str] = {}  # pod -> why it is a candidate
    if model.base:  # an adapter: the pods holding its base are where it costs least
        for pod, c in sorted(cluster.copies.get(model.base, {}).items())[:SAMPLE_PODS]:
            if pod in cluster.pods and c.state in (CopyState.LOADED, CopyState.LOADING):
                ids[pod] = f"holds its base {model.base}"
    for m, pod in cluster.cheapest_victims(VICTIM_PODS):
        if pod in cluster.pods and (not pooled or cluster.pods[pod].runtime == runtime):
            ids.setdefault(pod, f"holds {m}, a cheapest eviction")
    # Seeded by the model and time (not Python's salted hash), so a decision can be replayed exactly.
    x = zlib.crc32(f"{model.id}/{now}".encode())
    n = len(pool)
    for _ in range(SAMPLE_PODS * 2):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF  # 64-bit LCG step
        ids.setdefault(pool[(x >> 33) % n], "random sample")
        if len(ids) >= VICTIM_PODS + SAMPLE_PODS:
            break
    return [cluster.pods[i] for i in sorted(ids)], ids


def place(model: ModelView, cluster: ClusterView, now: float) -> Decision:
    """Choose a pod for one more copy of `model`, with the evictions that make room."""
    ctx = Context(model, cluster, now, cluster.index(), cluster.copies.get(model.id) or {}, runtime=cluster.serving_runtime(model),
                  base=cluster.models.get(model.base) if model.base else None)
    trace: list[Verdict] = []
    candidates: list[PodView] = []
    if cluster.waits_for_pool(ctx.runtime):
        assert ctx.runtime is not None
        reason = f"ServingRuntime {ctx.runtime} has no pods yet (a pool scaled to zero comes back once an InferenceService uses it)"
        return Decision(model.id, None, [], [], reason, {}, len(cluster.pods), waits_for=ctx.runtime)
    pods, considered = candidate_pods(model, cluster, now, ctx.runtime)
    for p in pods:
        for f in FILTERS:
            why = f.check(p, ctx)
            if why:
                trace.append(Verdict(p.id, f.name, "rejected: " + why))
                break
        else:
            candidates.append(p)
    if not candidates:
        if not cluster.pods:
            reason = "no runtime pods are registered"
        elif ctx.later:
            reason = "waiting for room: " + "; ".join(f"{pid}: {w}" for pid, w in sorted(ctx.later.items()))
        else:
            reason = "no pod can take it: " + "; ".join(f"{s.pod} {s.result}" for s in trace)
        return Decision(model.id, None, [], trace, reason, considered, len(cluster.pods), waits_for_room=sorted(ctx.later), base=model.base)
    evicting = [p.id for p in candidates if ctx.evictions.get(p.id)]
    if len(evicting) > 1:
        dearest = {pid: max(cluster.key_of(m) for m in ctx.evictions[pid]) for pid in evicting}
        order = sorted(evicting, key=lambda pid: (dearest[pid], pid))
        ctx.eviction_rank = {pid: i / len(order) for i, pid in enumerate(order)}
    elif evicting:
        ctx.eviction_rank = {evicting[0]: 0.0}
    best, best_score = None, -1.0
    weighted = [(s.weight, s.score) for s in SCORERS]
    for p in candidates:
        scores = tuple([fn(p, ctx) for _, fn in weighted])
        total = 0.0
        for (w, _), v in zip(weighted, scores):
            total += w * v
        trace.append(Verdict(p.id, "score", scores=scores))
        if total > best_score:
            best, best_score = p, total
    assert best is not None
    return Decision(model.id, best.id, ctx.evictions.get(best.id, []), trace, "", considered, len(cluster.pods), evict_busy=ctx.busy.get(best.id, []),
                    base=model.base, with_base=best.id in ctx.with_base)


# Filters whose verdict depends only on the pod, the model's runtime, format and size, and the
# cluster: not on the model's own copies or exclusions.
GENERIC_FILTERS = frozenset({"pod-healthy", "not-draining", "serves-model", "fits"})


def generic_refusal(d: Decision) -> bool:
    """Pure. A refusal that any model of the same runtime, format and size would get from the
    same view at the same time: every pod was checked (no sampled candidate set) and each was
    refused by a filter that does not look at the model's own copies or exclusions."""
    # An adapter's `fits` depends on where its base is: not generic.
    return d.pod is None and not d.base and not d.candidates and bool(d.trace) and all(s.step in GENERIC_FILTERS for s in d.trace)
