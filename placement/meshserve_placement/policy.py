"""Placement policy: pure functions over plain data, shared by the live service and the simulator.

A decision runs a chain of filters (which pods may take the model) and then scorers (which of
those is best), as Seldon's scheduler does. Every step has a name and a one-line description,
and every decision returns the trace of what each step said, so `meshserve explain` and the
"could not place" 503 can say exactly why.

Scale: `ClusterView` keeps an index (per-pod bytes, loads and models; per-pod and global
eviction heaps) that its mutators maintain incrementally, so a decision costs O(candidates x
log models), not O(models). On large clusters a decision considers a bounded candidate set:
the pods holding the globally cheapest evictions (global LRU) plus a random sample
(power of d choices). bench/placement_sim.py measures both hit ratio and decisions/s.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from meshserve.model import Copy, CopyState, auto_selected

# At most this many pods are checked one by one; larger clusters use the candidate set below.
FULL_SCAN_PODS = 16
SAMPLE_PODS = 4  # random pods added to the candidate set (power of d choices)
VICTIM_PODS = 3  # pods holding the globally cheapest evictions added to the candidate set

# Eviction value: a copy is kept in order of `last_used + horizon * ln(uses * ref / size)`,
# lowest evicted first. With horizon 0 it is exact global LRU. With the default, a model that is
# used twice as often, or is half as big, counts as used `horizon * ln 2` seconds later: the
# size/frequency-aware LRU that bench/placement_sim.py found within 95% of Belady (plain LRU
# reaches ~86% of it). See docs/design/placement.md.
DEFAULT_HORIZON_S = 300.0
DEFAULT_REF_SIZE = 64 << 20
# A busy copy that landed less than this ago is not evicted even as a last resort: the requests
# held for it are being forwarded to it right now (the activator reacts to the load within
# milliseconds; evicting it first would send them back to wait for another load).
DEFAULT_LANDED_GRACE_S = 1.0


@dataclass
class PodView:
    id: str
    capacity: int
    formats: list[str]  # every format its runtime declares (a model may name the runtime)
    healthy: bool = True
    max_loading: int = 2
    draining: bool = False  # the pod is shutting down: nothing new goes there
    runtime: str = ""  # its ServingRuntime's name
    auto_formats: list[str] | None = None  # formats it is picked for without `runtime:`; None: all of `formats`


@dataclass(frozen=True)
class RuntimeView:
    """A ServingRuntime as the cluster declares it (cluster mode: the controller publishes
    them), whether or not any pod runs it yet."""

    name: str
    formats: tuple[str, ...]
    auto_formats: tuple[str, ...]


@dataclass
class ModelView:
    id: str
    format: str
    size: int
    pinned: bool = False
    min_copies: int = 0
    max_copies: int = 0
    runtime: str = ""  # the InferenceService's explicit `runtime:`, or ""


# Bytes a pod has promised: loaded copies and loads decided (queued or under way). An UNLOADING
# copy's bytes are already promised to the load that evicted it; the leader dispatches that load
# only once the unload is confirmed, so the pod's real memory never exceeds its capacity either.
_BOOKED = (CopyState.LOADED, CopyState.LOADING)


@dataclass
class _PodIndex:
    used: int = 0  # booked bytes: LOADED + LOADING copies
    unloading: int = 0  # bytes still held by copies being unloaded
    loading: int = 0
    models: dict[str, Copy] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)  # (key, model), lazily invalidated


class _CopyTable(dict):  # type: ignore[type-arg]
    """`copies` that keeps the owner's index in step with plain dict writes."""

    owner: "ClusterView"

    def __setitem__(self, model: str, copies: dict[str, Copy]) -> None:
        self.owner._reindex(model, self.get(model, {}), copies)
        super().__setitem__(model, copies)

    def __delitem__(self, model: str) -> None:
        self.owner._reindex(model, self.get(model, {}), {})
        super().__delitem__(model)

    def pop(self, model: str, *default: Any) -> Any:  # type: ignore[override]
        if model in self:
            self.owner._reindex(model, self[model], {})
        return super().pop(model, *default)


@dataclass
class ClusterView:
    """What the policy sees. `copies[model][pod]` mirrors Redis; sizes are reserved bytes.

    Replace a model's copies with `copies[m] = {...}` (never mutate the inner dict in place),
    and report use with `touch()`: both keep the index current. Assigning a whole new
    `copies` or `last_used` marks the index stale; it is rebuilt on the next read.
    """

    pods: dict[str, PodView]
    models: dict[str, ModelView]
    copies: dict[str, dict[str, Copy]] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)  # models with requests being served now
    excluded: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, pod) -> until
    uses: dict[str, int] = field(default_factory=dict)  # observed uses, for the eviction value
    horizon_s: float = DEFAULT_HORIZON_S
    ref_size: int = DEFAULT_REF_SIZE
    # Declared ServingRuntimes by name. Empty (`meshserve up`): the runtimes the registered
    # pods run are all there is.
    runtimes: dict[str, RuntimeView] = field(default_factory=dict)
    landed_grace_s: float = DEFAULT_LANDED_GRACE_S

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "copies" and not isinstance(value, _CopyTable):
            t = _CopyTable(value)
            t.owner = self
            value = t
        object.__setattr__(self, name, value)
        if name in ("copies", "last_used", "uses", "horizon_s", "ref_size", "models"):
            object.__setattr__(self, "_stale", True)

    # --- index --------------------------------------------------------------------------
    def _ix(self) -> dict[str, _PodIndex]:
        if self.__dict__.get("_stale", True):
            self._rebuild()
        return self.__dict__["_pods_ix"]

    def _rebuild(self) -> None:
        d = self.__dict__
        d["_stale"] = False
        d["_pods_ix"] = {}
        d["_keys"] = {}
        d["_global"] = []
        for m, cs in dict.items(self.copies):
            self._reindex(m, {}, cs)

    def _pod_ix(self, pod: str) -> _PodIndex:
        ix = self.__dict__["_pods_ix"]
        p = ix.get(pod)
        if p is None:
            p = ix[pod] = _PodIndex()
        return p

    def _reindex(self, model: str, old: dict[str, Copy], new: dict[str, Copy]) -> None:
        if self.__dict__.get("_stale", True):
            return  # a rebuild will read the final state anyway
        for pod, c in old.items():
            p = self._pod_ix(pod)
            if c.state in _BOOKED:
                p.used -= c.size
            elif c.state == CopyState.UNLOADING:
                p.unloading -= c.size
            if c.state == CopyState.LOADING:
                p.loading -= 1
            p.models.pop(model, None)
        loaded = False
        for pod, c in new.items():
            p = self._pod_ix(pod)
            if c.state in _BOOKED:
                p.used += c.size
            elif c.state == CopyState.UNLOADING:
                p.unloading += c.size
            if c.state == CopyState.LOADING:
                p.loading += 1
            p.models[model] = c
            loaded = loaded or c.state == CopyState.LOADED
        if loaded:
            was = any(c.state == CopyState.LOADED for c in old.values())
            newly = [
                pod for pod, c in new.items()
                if c.state == CopyState.LOADED and (pod not in old or old[pod].state != CopyState.LOADED)
            ]
            if newly:
                self._push(model, newly, push_global=not was)

    def eviction_key(self, model: str) -> float:
        """Lower is evicted first: last use, shifted by how often and how small the model is."""
        last = self.last_used.get(model, 0.0)
        if not self.horizon_s:
            return last
        mv = self.models.get(model)
        size = mv.size if mv is not None and mv.size > 0 else self.ref_size
        return last + self.horizon_s * math.log(max(1, self.uses.get(model, 1)) * self.ref_size / size)

    def _push(self, model: str, pods: list[str], push_global: bool) -> None:
        key = self.eviction_key(model)
        keys = self.__dict__["_keys"]
        changed = keys.get(model) != key
        keys[model] = key
        for pod in pods:
            p = self._pod_ix(pod)
            heapq.heappush(p.heap, (key, model))
            if len(p.heap) > 64 + 4 * len(p.models):
                self._compact(p.heap, p.models)  # every use pushes an entry; drop the stale ones now and then
        if push_global or changed:
            g = self.__dict__["_global"]
            heapq.heappush(g, (key, model))
            if len(g) > 1024 + 4 * len(keys):
                self._compact(g)

    def touch(self, model: str, when: float, uses: int = 1) -> None:
        """A model was used at `when` (`uses` times since the last report)."""
        if when < self.last_used.get(model, -math.inf):
            return
        self.last_used[model] = when
        self.uses[model] = self.uses.get(model, 0) + uses
        if self.__dict__.get("_stale", True):
            return
        cs = self.copies.get(model)
        if cs:
            loaded = [p for p, c in cs.items() if c.state == CopyState.LOADED]
            if loaded:
                self._push(model, loaded, push_global=True)

    def pod_models(self, pod: str) -> dict[str, Copy]:
        """The pod's copies (read-only view of the index)."""
        p = self._ix().get(pod)
        return p.models if p is not None else {}

    def used(self, pod: str) -> int:
        p = self._ix().get(pod)
        return p.used if p is not None else 0

    def unloading(self, pod: str) -> int:
        p = self._ix().get(pod)
        return p.unloading if p is not None else 0

    def loading(self, pod: str) -> int:
        p = self._ix().get(pod)
        return p.loading if p is not None else 0

    def live_copies(self, model: str) -> int:
        return sum(1 for c in self.copies.get(model, {}).values() if c.state == CopyState.LOADED)

    def kept_bytes(self, pod: str) -> int:
        """Bytes on `pod` that will never free up by themselves: copies of pinned models and
        copies that keep a model at its minCopies. Everything else booked (busy, loading,
        unloading) becomes evictable in time. O(the pod's models): only asked when a model
        does not fit now."""
        n = 0
        for m, c in self.pod_models(pod).items():
            if c.state not in _BOOKED:
                continue
            mv = self.models.get(m)
            if mv is not None and (mv.pinned or (mv.min_copies > 0 and self.live_copies(m) <= mv.min_copies)):
                n += c.size
        return n

    def can_evict(self, model: str, busy: bool = False) -> bool:
        """Loaded copies of this model may be dropped: not pinned, above its minimum, and not
        busy (unless `busy`: the last resort, see `busy_victims`)."""
        if not busy and model in self.in_flight:
            return False
        mv = self.models.get(model)
        if mv is not None and (mv.pinned or (mv.min_copies > 0 and self.live_copies(model) <= mv.min_copies)):
            return False
        return True

    def _walk(self, heap: list[tuple[float, str]], valid: Callable[[float, str], bool]) -> Iterator[tuple[float, str]]:
        """Entries of a lazy heap in key order, dropping stale ones; the heap is restored after."""
        keep: list[tuple[float, str]] = []
        keys = self.__dict__["_keys"]
        seen: set[str] = set()
        try:
            while heap:
                e = heapq.heappop(heap)
                k, m = e
                if keys.get(m) != k or m in seen or not valid(k, m):
                    continue  # stale: the model was used again, evicted, or is a duplicate
                seen.add(m)
                keep.append(e)
                yield e
        finally:
            for e in keep:
                heapq.heappush(heap, e)

    def _compact(self, heap: list[tuple[float, str]], held: dict[str, Copy] | None = None) -> None:
        """Drop stale entries: superseded keys, and (for a pod's heap) models no longer held."""
        keys = self.__dict__["_keys"]
        live = {(k, m) for k, m in heap if keys.get(m) == k and (held is None or m in held)}
        heap[:] = list(live)
        heapq.heapify(heap)

    def evictable(self, pod: str) -> Iterator[str]:
        """Models this pod could drop, cheapest first (see eviction_key)."""
        p = self._ix().get(pod)
        if p is None:
            return iter(())

        def ok(_: float, m: str) -> bool:
            c = p.models.get(m)
            return c is not None and c.state == CopyState.LOADED

        return (m for _, m in self._walk(p.heap, ok) if self.can_evict(m))

    def victims(self, pod: str, need: int) -> tuple[list[str], int]:
        """The cheapest evictable models on `pod` whose bytes add up to `need`, and the bytes
        they free (less than `need` when even evicting all of them would not do). A plain loop
        over the lazy heap rather than `evictable()`: this is the hot path of every decision."""
        p = self._ix().get(pod)
        if p is None:
            return [], 0
        heap, keys, models = p.heap, self.__dict__["_keys"], p.models
        while heap:  # drop stale entries at the top for good
            k, m = heap[0]
            c = models.get(m)
            if keys.get(m) == k and c is not None and c.state == CopyState.LOADED:
                if c.size >= need and self.can_evict(m):
                    return [m], c.size  # the common case: the cheapest copy alone makes room
                break
            heapq.heappop(heap)
        keep: list[tuple[float, str]] = []
        chosen: list[str] = []
        freed = 0
        while heap and freed < need:
            e = heapq.heappop(heap)
            k, m = e
            c = models.get(m)
            if keys.get(m) != k or c is None or c.state != CopyState.LOADED or m in chosen:
                continue  # stale entry: used again since, evicted, or a duplicate
            keep.append(e)
            if self.can_evict(m):
                chosen.append(m)
                freed += c.size
        for e in keep:
            heapq.heappush(heap, e)
        return chosen, freed

    def busy_victims(self, pod: str, need: int, now: float, skip: list[str] | tuple[str, ...] = ()) -> tuple[list[str], int]:
        """The last resort when idle copies do not free `need` bytes: the pod's busy loaded
        copies (requests in flight or used within the busy window), least valuable first by the
        same eviction key (recency and frequency), never pinned ones, never one that keeps its
        model at minCopies, never one that landed within `landed_grace_s` (its held requests
        are being forwarded to it). Safe for the requests: the unload waits for the route
        withdrawal (unload_grace_seconds), a request inside the runtime finishes on the model
        it started with, and the activator sends one whose copy vanished back to wait.
        Returns the models and the bytes they free. O(the pod's models): only asked when a
        model does not fit after the idle evictions."""
        p = self._ix().get(pod)
        if p is None:
            return [], 0
        chosen: list[str] = []
        freed = 0

        def ok(_: float, m: str) -> bool:
            c = p.models.get(m)
            return c is not None and c.state == CopyState.LOADED

        walk = self._walk(p.heap, ok)
        try:
            for _, m in walk:
                if m in skip or m not in self.in_flight or not self.can_evict(m, busy=True):
                    continue
                c = p.models[m]
                if now - c.since < self.landed_grace_s:
                    continue
                chosen.append(m)
                freed += c.size
                if freed >= need:
                    break
        finally:
            walk.close()  # restores the heap
        return chosen, freed

    def cheapest_victims(self, n: int) -> list[tuple[str, str]]:
        """Up to `n` (model, pod) copies that the global LRU would evict first."""
        self._ix()
        heap, keys = self.__dict__["_global"], self.__dict__["_keys"]
        keep: list[tuple[float, str]] = []
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        while heap and len(out) < n:
            e = heapq.heappop(heap)
            k, m = e
            cs = self.copies.get(m)
            if keys.get(m) != k or m in seen or not cs:
                continue  # stale: used again since, or no longer loaded anywhere
            loaded = [pod for pod, c in cs.items() if c.state == CopyState.LOADED]
            if not loaded:
                continue  # re-pushed by _reindex when a copy loads again
            seen.add(m)
            keep.append(e)
            if self.can_evict(m):
                out += [(m, pod) for pod in loaded]
        for e in keep:
            heapq.heappush(heap, e)
        return out[:n]

    def serving_runtime(self, model: ModelView) -> str | None:
        """The runtime that serves `model`: the one it names, else KServe's rule, the first by
        name that auto-selects its format, over the declared runtimes when they are known
        (`runtimes`), or else over the ones the registered pods run. The rule is the same as
        loader/meshserve_loader/serving_runtime.py `select_runtime`. None when nothing auto-selects it."""
        if model.runtime:
            return model.runtime
        if self.runtimes:
            return auto_selected(model.format, {n: r.auto_formats for n, r in self.runtimes.items()})
        return self._pools()[1].get(model.format)

    def waits_for_pool(self, runtime: str | None) -> bool:
        """The model's runtime is declared but no pod runs it yet: a pool scaled to zero that
        the controller is bringing back (meshserve/k8s/scaling.py)."""
        return runtime is not None and runtime in self.runtimes and not self.pool(runtime)

    def pool(self, runtime: str) -> list[str]:
        """Ids of the pods that run `runtime`, sorted."""
        return self._pools()[0].get(runtime, [])

    def pods_changed(self) -> None:
        """Call after changing a pod's runtime or formats in place (adding or removing pods
        is noticed without it)."""
        self.__dict__.pop("_pool_cache", None)

    def _pools(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        # Pods come and go rarely and a decision runs per load: cached, keyed on the dict and
        # its size so an added or removed pod rebuilds it.
        sig = (id(self.pods), len(self.pods))
        c = self.__dict__.get("_pool_cache")
        if c is None or c[0] != sig:
            pools: dict[str, list[str]] = {}
            auto: dict[str, str] = {}
            for pid in sorted(self.pods):
                p = self.pods[pid]
                pools.setdefault(p.runtime, []).append(pid)
            for rt in sorted(pools):
                for pid in pools[rt]:
                    p = self.pods[pid]
                    for f in (p.formats if p.auto_formats is None else p.auto_formats):
                        auto.setdefault(f, rt)
            c = (sig, pools, auto)
            self.__dict__["_pool_cache"] = c
        return c[1], c[2]


def evictable(pod: str, cluster: ClusterView) -> list[str]:
    """Models this pod could drop, cheapest first: loaded, not pinned, not busy, and not a copy
    that would take the model under its minimum."""
    return list(cluster.evictable(pod))


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
    trace: list[Step]
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

    @property
    def considered(self) -> str:
        if not self.candidates:
            return ""
        return f"considered {len(self.candidates)} of {self.pods_total} pods: " + ", ".join(f"{p} ({w})" for p, w in sorted(self.candidates.items()))

    def explain(self) -> list[str]:
        lines = [self.considered] if self.candidates else []
        lines += [f"{s.pod}: {s.step}: {s.text()}" for s in self.trace]
        busy = f" (busy, evicted as a last resort: {', '.join(self.evict_busy)})" if self.evict_busy else ""
        lines.append(f"=> {self.pod}" + (f", evicting {', '.join(self.evict)}{busy}" if self.evict else "") if self.pod else f"=> not placed: {self.reason}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pod": self.pod,
            "evict": self.evict,
            "evict_busy": self.evict_busy,
            "reason": self.reason,
            "considered": self.considered,
            "trace": [{"pod": s.pod, "step": s.step, "result": s.text()} for s in self.trace],
        }


def _healthy(p: PodView, ctx: Context) -> str:
    return "" if p.healthy else "pod heartbeat expired"


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


_EMPTY = _PodIndex()


def _fits(p: PodView, ctx: Context) -> str:
    pix = ctx.ix.get(p.id, _EMPTY)
    free = p.capacity - pix.used
    need = ctx.model.size
    if need > p.capacity:
        return f"model needs {need} bytes, more than the pod's whole capacity {p.capacity}"
    if free >= need:
        return ""
    chosen, freed = ctx.cluster.victims(p.id, need - free)
    free += freed
    if free >= need:
        ctx.evictions[p.id] = chosen
        return ""
    # Last resort: busy copies, least valuable first. A copy used within the busy window is
    # not protected any more once idle ones cannot make room: under churn more distinct
    # models are used per window than fit, and protecting them all starved new models.
    busy, more = ctx.cluster.busy_victims(p.id, need - free, ctx.now, chosen)
    if free + more >= need:
        ctx.evictions[p.id] = chosen + busy
        ctx.busy[p.id] = busy
        return ""
    why = f"needs {need} bytes; only {free + more} free even after evicting every idle and busy model"
    kept = ctx.cluster.kept_bytes(p.id)
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
    Filter("fits", "free bytes, after evicting the cheapest idle models (size-aware LRU) and, as a last resort, the cheapest busy ones (never pinned or minCopies), cover the model (when only loading, unloading or just-loaded copies are in the way, the decision is to wait for them)", _fits),
]


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


def _fewest_models(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + len(ctx.ix.get(p.id, _EMPTY).models))


def _least_loading(p: PodView, ctx: Context) -> float:
    return 1.0 / (1.0 + ctx.ix.get(p.id, _EMPTY).loading)


SCORERS: list[Scorer] = [
    Scorer("spares-busy", "prefer pods that make room without evicting a busy copy (busy eviction is the last resort)", 8.0, _spares_busy),
    Scorer("cheapest-eviction", "prefer pods that need no eviction, then those whose evictions are cheapest (global LRU)", 4.0, _cheap_eviction),
    Scorer("free-space", "prefer pods with more free bytes", 2.0, _free_space),
    Scorer("least-loading", "prefer pods with fewer loads in progress", 1.0, _least_loading),
    Scorer("fewest-models", "prefer pods holding fewer models", 0.5, _fewest_models),
]


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
    ctx = Context(model, cluster, now, cluster._ix(), cluster.copies.get(model.id) or {}, runtime=cluster.serving_runtime(model))
    trace: list[Step] = []
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
                trace.append(Step(p.id, f.name, "rejected: " + why))
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
        return Decision(model.id, None, [], trace, reason, considered, len(cluster.pods), waits_for_room=sorted(ctx.later))
    evicting = [p.id for p in candidates if ctx.evictions.get(p.id)]
    if len(evicting) > 1:
        keys = cluster.__dict__["_keys"]
        dearest = {pid: max(keys[m] for m in ctx.evictions[pid]) for pid in evicting}
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
        trace.append(Step(p.id, "score", scores=scores))
        if total > best_score:
            best, best_score = p, total
    assert best is not None
    return Decision(model.id, best.id, ctx.evictions.get(best.id, []), trace, "", considered, len(cluster.pods), evict_busy=ctx.busy.get(best.id, []))
