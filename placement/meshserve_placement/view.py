# Over 400 lines: the index and the eviction walks over it are one data structure (they share its heaps).
"""The cluster as the placement policy sees it: pods, models, copies, and the index that makes
a decision O(candidates x log models) instead of O(models): per-pod booked bytes, loads and
models, and per-pod and global eviction heaps, kept current by the view's own write methods.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from meshserve.model import Copy, CopyState, auto_selected
from meshserve_placement.sizes import UNKNOWN_MODEL_BYTES


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
# The reason a decided load carries while it waits in its pod's load queue (no order sent yet);
# an adapter's base queued with it says so after it.
QUEUED = "queued for a loading slot"
# The reason of a superseded base's copy kept for the adapters still loaded over it (a base
# rolled to a new version, bases.py): UNLOADING, so it carries no route, but still booked (the
# runtime holds its weights while those adapters use them), and no unload order sent until the
# last of them leaves the pod. A new leader finds these copies by this prefix.
HELD = "kept for the adapters loaded over it"
# The reason of a base's copy evicted with its adapters in one decision: UNLOADING (its bytes
# count as being freed, for the load that evicted it) but its unload order waits until those
# adapters' unloads are confirmed, since the runtime keeps a base's weights while an adapter
# uses them (an adapter's unload that fails would otherwise leave the base in memory unbooked).
AFTER_ADAPTERS = "unloaded after its adapters here"


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
    # What the pod may really hold at once; 0: `capacity`. Where an unload reserve is kept
    # (unload_reserve), `capacity` is what placement books against, the pod's capacity less the
    # reserve, and `limit` the pod's own: the bytes of unloads still in their grace use the
    # difference while the loads they made room for start (dispatch.plan_dispatch).
    limit: int = 0
    # placement judged it paused (store keys.PAUSED): its runtime accepts connections and answers
    # nothing; a model only it holds gets a copy on a pod that answers (copies.plan_copies)
    paused: bool = False


def unload_reserve(capacity: int, max_loading: int, fraction: float = -1.0) -> int:
    """The part of a pod's capacity kept for copies being unloaded, so that a load which evicts
    starts at once instead of waiting out its victims' unload grace, and the pod still never
    holds more than its capacity. `fraction` >= 0 sets it; below 0 (the default) it is
    ModelMesh's unload buffer (ModelMesh.java, `unloadsReservedSizeUnits`): one default-sized
    model per loading slot, halved for up to 2 slots and quartered above, kept between 1% and
    10% of the capacity. Our default-sized model is the unknown-size default."""
    if fraction >= 0:
        return int(capacity * min(fraction, 0.9))
    want = max_loading * UNKNOWN_MODEL_BYTES // (2 if max_loading <= 2 else 4)
    return max(capacity // 100, min(capacity // 10, want))


def reserve_room(pv: PodView, capacity: int, max_loading: int, fraction: float = -1.0) -> None:
    """Set the pod's booking capacity and its limit from its reported capacity (the leader on
    each pod record, the simulator on its pods: both keep the same reserve)."""
    pv.limit = capacity
    pv.capacity = capacity - unload_reserve(capacity, max_loading, fraction)


@dataclass(frozen=True)
class RuntimeView:
    """A ServingRuntime as the cluster declares it (cluster mode: the controller publishes
    them), whether or not any pod runs it yet."""

    name: str
    formats: tuple[str, ...]
    auto_formats: tuple[str, ...]


# Slots: a leader holds one per registered model (a million in bench/million.py), 200 -> 100 bytes each.
@dataclass(frozen=True, slots=True)
class ModelView:
    id: str
    format: str
    size: int
    pinned: bool = False
    min_copies: int = 0
    max_copies: int = 0
    runtime: str = ""  # the InferenceService's explicit `runtime:`, or ""
    # The concrete id of the model this one adapts (issue 17; bases.resolve_base), "" for an
    # ordinary model. Its copies need a copy of the base on the same pod (bases.py).
    base: str = ""


# Bytes a pod has promised: loaded copies and loads decided (queued or under way). An UNLOADING
# copy's bytes are already promised to the load that evicted it; the leader dispatches that load
# while the pod's unload reserve holds them, else once the unload is confirmed, so the pod's real
# memory never exceeds its capacity either (dispatch.plan_dispatch).
_BOOKED = (CopyState.LOADED, CopyState.LOADING)


def booked(c: Copy) -> bool:
    """The copy's bytes are booked on its pod: loaded, being loaded, or a superseded base kept
    for its adapters (HELD: withdrawn from routing, its memory still in use)."""
    return c.state in _BOOKED or (c.state == CopyState.UNLOADING and c.reason.startswith(HELD))


@dataclass
class _PodIndex:
    used: int = 0  # booked bytes: LOADED + LOADING copies (and HELD bases: `booked`)
    unloading: int = 0  # bytes still held by copies being unloaded
    loading: int = 0
    queued: int = 0  # of the loading ones, those still in the pod's load queue (no order sent)
    queued_bytes: int = 0
    models: dict[str, Copy] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)  # (key, model), lazily invalidated
    # base -> how many adapters have a copy here over it (any state): such a base stays here.
    # A copy counts for the base it was loaded over (`ClusterView.copy_base`), which is its
    # model's base unless that base rolled to a new version since.
    adapters: dict[str, int] = field(default_factory=dict)


class ClusterView:
    """What the policy sees: `copies[model][pod]` mirrors Redis; sizes are reserved bytes.

    A plain index: every write goes through a method (`set_copies`, `set_model`, `exclude`,
    `touch`), which keeps the per-pod bytes and the eviction heaps current; `copies` and
    `models` are read-only mappings. Writes made after `begin()` are journaled, so the leader
    can take them back (`rollback`) when the commit that carries them fails: its view never
    differs from Redis.
    """

    def __init__(
        self, pods: dict[str, PodView], models: dict[str, ModelView], copies: dict[str, dict[str, Copy]] | None = None,
        last_used: dict[str, float] | None = None, in_flight: set[str] | None = None,
        excluded: dict[tuple[str, str], float] | None = None, uses: dict[str, int] | None = None,
        horizon_s: float = DEFAULT_HORIZON_S, ref_size: int = DEFAULT_REF_SIZE,
        runtimes: dict[str, RuntimeView] | None = None, landed_grace_s: float = DEFAULT_LANDED_GRACE_S,
    ):
        self.pods = pods  # pods are added and removed by the leader directly: no index depends on them
        self._models = dict(models)
        self._copies = {m: dict(cs) for m, cs in (copies or {}).items() if cs}
        self._last_used = dict(last_used or {})
        self.in_flight = set(in_flight or ())  # models with requests being served now
        self._excluded = dict(excluded or {})  # (model, pod) -> until
        self.uses = dict(uses or {})  # observed uses, for the eviction value
        self.horizon_s, self.ref_size, self.landed_grace_s = horizon_s, ref_size, landed_grace_s
        # Declared ServingRuntimes by name. Empty (`meshserve up`): the runtimes the registered
        # pods run are all there is.
        self.runtimes = dict(runtimes or {})
        # Read-only views for callers, made once: they follow the dicts they wrap.
        self._ro_copies, self._ro_models = MappingProxyType(self._copies), MappingProxyType(self._models)
        self._ro_excluded, self._ro_last_used = MappingProxyType(self._excluded), MappingProxyType(self._last_used)
        for m, mv in self._models.items():  # a base's use includes its adapters' (see touch)
            if mv.base and m in self._last_used:
                self._last_used[mv.base] = max(self._last_used[m], self._last_used.get(mv.base, 0.0))
                self.uses[mv.base] = self.uses.get(mv.base, 0) + self.uses.get(m, 1)
        self._journal: list[tuple[str, Any, Any]] | None = None
        # adapter -> pod -> the base its copy there was loaded over, where that is no longer
        # the adapter's base (its base rolled to a new version: `set_model`); such a copy keeps
        # counting for the old base, which stays booked there until the copy goes (bases.py).
        self._over: dict[str, dict[str, str]] = {}
        # base -> the adapters whose ModelView names it (a rolled base's adapters are re-pointed at once)
        self._adapters_of: dict[str, set[str]] = {}
        for m, mv in self._models.items():
            if mv.base:
                self._adapters_of.setdefault(mv.base, set()).add(m)
        self.changed: set[str] = set()  # models whose copies or spec changed: see take_changed
        self._pool_cache: tuple[Any, dict[str, list[str]], dict[str, str]] | None = None
        self._build_index()

    # --- reads ---------------------------------------------------------------------------
    @property
    def copies(self) -> Mapping[str, dict[str, Copy]]:
        return self._ro_copies

    @copies.setter
    def copies(self, copies: dict[str, dict[str, Copy]]) -> None:
        """A whole new set of copies (tests, the simulator): the index is rebuilt."""
        self._copies = {m: dict(cs) for m, cs in copies.items() if cs}
        self._ro_copies = MappingProxyType(self._copies)
        self._over = {m: over for m, o in self._over.items() if (over := {p: b for p, b in o.items() if p in self._copies.get(m, {})})}
        self._build_index()

    @property
    def models(self) -> Mapping[str, ModelView]:
        return self._ro_models

    @property
    def excluded(self) -> Mapping[tuple[str, str], float]:
        return self._ro_excluded

    @property
    def last_used(self) -> Mapping[str, float]:
        return self._ro_last_used

    @last_used.setter
    def last_used(self, last_used: dict[str, float]) -> None:
        self._last_used = dict(last_used)
        self._ro_last_used = MappingProxyType(self._last_used)
        self._build_index()

    def index(self) -> dict[str, _PodIndex]:
        """The per-pod index (bytes, loads, models, eviction heap); read-only for callers."""
        return self._ix

    def key_of(self, model: str) -> float:
        """The eviction key the heaps hold for a loaded model (see eviction_key)."""
        return self._keys[model]

    # --- writes --------------------------------------------------------------------------
    def set_copies(self, model: str, copies: dict[str, Copy]) -> None:
        """Replace a model's copies ({} drops them). The dict is the view's from now on."""
        old = self._copies.get(model, {})
        self._log("copies", model, old if model in self._copies else None)
        self.changed.add(model)
        self._reindex(model, old, copies)
        if copies:
            self._copies[model] = copies
        else:
            self._copies.pop(model, None)

    def set_model(self, mv: ModelView) -> None:
        """Add or replace a model. A changed size moves its eviction key (the heaps are re-pushed).

        An adapter whose base changes (its base rolled to a new version): its copies stay counted
        for the base they were booked with (`copy_base`), so that base stays booked beside them;
        a load still queued is ordered over that base too (dispatch: the order names it by id).
        Copies placed from now on are over the new base."""
        old = self._models.get(mv.id)
        was = old.base if old is not None else ""
        if was != mv.base:
            # Before the model's own journal entry: a rollback restores the model first, and
            # the copies' old bases after it (see rollback).
            over = self._over.get(mv.id, {})
            for pod in self._copies.get(mv.id, {}):
                cur = over.get(pod, was)
                if cur:
                    self._set_over(mv.id, pod, "" if cur == mv.base else cur)
                else:  # an adapter's first base (or a model becoming one): counted for it
                    self._count_adapter(mv.id, mv.base, 1, (pod,))
            if was:
                self._adapters_of.get(was, set()).discard(mv.id)
                if not self._adapters_of.get(was, True):
                    del self._adapters_of[was]
            if mv.base:
                self._adapters_of.setdefault(mv.base, set()).add(mv.id)
        self._log("model", mv.id, old)
        self.changed.add(mv.id)
        self._models[mv.id] = mv
        if old is not None and old.size != mv.size:
            loaded = [p for p, c in self._copies.get(mv.id, {}).items() if c.state == CopyState.LOADED]
            if loaded:
                self._push(mv.id, loaded, push_global=True)

    def take_changed(self) -> set[str]:
        """The models whose copies or spec changed since the last call (the copy reconcile
        decides only those again, maintain.py), and forget them."""
        out, self.changed = self.changed, set()
        return out

    def exclude(self, model: str, pod: str, until: float) -> None:
        self._log("excluded", (model, pod), self._excluded.get((model, pod)))
        self._excluded[(model, pod)] = until

    # --- journal: writes are taken back when their commit fails --------------------------
    def begin(self) -> None:
        """Journal the writes from here on (see rollback)."""
        self._journal = []

    def committed(self) -> None:
        """The journaled writes are in Redis now: keep them (and keep journaling)."""
        if self._journal is not None:
            self._journal = []

    def end(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Take back every write since `begin` or the last `committed`, newest first."""
        journal, self._journal = self._journal or [], None
        for kind, k, old in reversed(journal):
            if kind == "copies":
                self.set_copies(k, old or {})
            elif kind == "model":
                if old is None:
                    if k in self._models:
                        pods = self._copies.get(k, {})
                        for pod in pods:
                            self._count_adapter(k, self.copy_base(k, pod), -1, (pod,))
                        gone = self._models.pop(k)
                        self._over.pop(k, None)
                        self._adapters_of.get(gone.base, set()).discard(k)
                else:
                    self.set_model(old)
            elif kind == "over":
                adapter, pod = k
                self._set_over(adapter, pod, old or "")
            elif old is None:
                self._excluded.pop(k, None)
            else:
                self._excluded[k] = old
        self._journal = [] if journal is not None else None

    def _log(self, kind: str, key: Any, old: Any) -> None:
        if self._journal is not None:
            self._journal.append((kind, key, old))

    # --- index --------------------------------------------------------------------------
    def _build_index(self) -> None:
        self._ix: dict[str, _PodIndex] = {}
        self._keys: dict[str, float] = {}
        self._global: list[tuple[float, str]] = []
        # In bulk: the heaps are filled as lists and heapified once each (a new leader indexes
        # 100,000 copies; a push per copy was a sixth of its reload). Same heaps, same order.
        self._bulk = True
        try:
            for m, cs in self._copies.items():
                self._reindex(m, {}, cs)
        finally:
            self._bulk = False
        for p in self._ix.values():
            heapq.heapify(p.heap)
        heapq.heapify(self._global)

    def _pod_ix(self, pod: str) -> _PodIndex:
        p = self._ix.get(pod)
        if p is None:
            p = self._ix[pod] = _PodIndex()
        return p

    def _count_adapter(self, model: str, base: str, sign: int, pods: Any) -> None:
        """Count (sign 1) or uncount (-1) `model`'s copies on `pods` as adapters over `base`."""
        if not base:
            return
        for pod in pods:
            a = self._pod_ix(pod).adapters
            n = a.get(base, 0) + sign
            if n > 0:
                a[base] = n
            else:
                a.pop(base, None)

    def _set_over(self, model: str, pod: str, base: str) -> None:
        """Record ("" forgets) the base `model`'s copy on `pod` is over, when not its model's
        base. The map only: the caller moves the counts (`_count_adapter`)."""
        over = self._over.get(model, {})
        old = over.get(pod, "")
        if old == base:
            return
        self._log("over", (model, pod), old)
        if base:
            self._over.setdefault(model, {})[pod] = base
        else:
            over.pop(pod, None)
            if not over:
                self._over.pop(model, None)

    def copy_base(self, model: str, pod: str) -> str:
        """The base `model`'s copy on `pod` is (or will be loaded) over: its model's base, unless
        that base rolled to a new version since the copy was placed. "" for a model without one."""
        o = self._over.get(model)
        if o is not None and pod in o:
            return o[pod]
        mv = self._models.get(model)
        return mv.base if mv is not None else ""

    def hold_over(self, model: str, pod: str, base: str) -> None:
        """`model`'s copy on `pod` is over `base` (a new leader reading it back: bases.OVER).
        Moves its count from the base it was counted for. Nothing for a copy that is gone."""
        if model not in self._copies or pod not in self._copies[model]:
            return
        cur = self.copy_base(model, pod)
        if cur == base:
            return
        mv = self._models.get(model)
        self._count_adapter(model, cur, -1, (pod,))
        self._set_over(model, pod, "" if mv is not None and mv.base == base else base)
        self._count_adapter(model, base, 1, (pod,))

    def has_over(self, model: str) -> bool:
        """`model` has copies over a base that is no longer its base (cheap: every commit asks)."""
        return model in self._over

    def over_of(self, model: str) -> Mapping[str, str]:
        """pod -> base, for `model`'s copies over a base that is no longer its base (read-only)."""
        return MappingProxyType(self._over.get(model, {}))

    def adapters_of(self, base: str) -> frozenset[str]:
        """The adapters whose base is `base` now (by their ModelView)."""
        return frozenset(self._adapters_of.get(base, ()))

    def adapters_here(self, base: str, pod: str) -> int:
        """How many adapters of `base` have a copy on `pod` (loading, loaded or unloading)."""
        p = self._ix.get(pod)
        return p.adapters.get(base, 0) if p is not None else 0

    def base_stays(self, model: str, pod: str, going: Any = ()) -> bool:
        """`model` is a base that must stay on `pod`: an adapter of it has a copy there that is
        not among `going` (copies chosen for eviction in the same decision). A base is never
        evicted while its adapters are resident; they go first."""
        n = self.adapters_here(model, pod)
        if not n:
            return False
        return n > sum(1 for g in going if self.copy_base(g, pod) == model)

    def _reindex(self, model: str, old: dict[str, Copy], new: dict[str, Copy]) -> None:
        mv = self._models.get(model)
        if mv is not None and (mv.base or model in self._over):
            for pod in old:
                self._count_adapter(model, self.copy_base(model, pod), -1, (pod,))
            for pod in [p for p in self._over.get(model, {}) if p not in new]:
                self._set_over(model, pod, "")  # that copy went: a new one there loads over the current base
            for pod in new:
                self._count_adapter(model, self.copy_base(model, pod), 1, (pod,))
        for pod, c in old.items():
            p = self._pod_ix(pod)
            if booked(c):
                p.used -= c.size
            elif c.state == CopyState.UNLOADING:
                p.unloading -= c.size
            if c.state == CopyState.LOADING:
                p.loading -= 1
                if c.reason.startswith(QUEUED):
                    p.queued, p.queued_bytes = p.queued - 1, p.queued_bytes - c.size
            p.models.pop(model, None)
        loaded = False
        for pod, c in new.items():
            p = self._pod_ix(pod)
            if booked(c):
                p.used += c.size
            elif c.state == CopyState.UNLOADING:
                p.unloading += c.size
            if c.state == CopyState.LOADING:
                p.loading += 1
                if c.reason.startswith(QUEUED):
                    p.queued, p.queued_bytes = p.queued + 1, p.queued_bytes + c.size
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
        last = self._last_used.get(model, 0.0)
        if not self.horizon_s:
            return last
        mv = self._models.get(model)
        size = mv.size if mv is not None and mv.size > 0 else self.ref_size
        return last + self.horizon_s * math.log(max(1, self.uses.get(model, 1)) * self.ref_size / size)

    def _push(self, model: str, pods: list[str], push_global: bool) -> None:
        key = self.eviction_key(model)
        keys = self._keys
        changed = keys.get(model) != key
        keys[model] = key
        if self._bulk:  # _build_index heapifies at its end
            for pod in pods:
                self._pod_ix(pod).heap.append((key, model))
            if push_global or changed:
                self._global.append((key, model))
            return
        for pod in pods:
            p = self._pod_ix(pod)
            heapq.heappush(p.heap, (key, model))
            if len(p.heap) > 64 + 4 * len(p.models):
                self._compact(p.heap, p.models)  # every use pushes an entry; drop the stale ones now and then
        if push_global or changed:
            g = self._global
            heapq.heappush(g, (key, model))
            if len(g) > 1024 + 4 * len(keys):
                self._compact(g)

    def touch(self, model: str, when: float, uses: int = 1) -> None:
        """A model was used at `when` (`uses` times since the last report)."""
        mv = self._models.get(model)
        if mv is not None and mv.base and mv.base != model:
            # A base's recency and frequency include its adapters' use: it serves them all.
            # One level only: a base is a full model, never an adapter (loader bases.py).
            self._touch(mv.base, when, uses)
        self._touch(model, when, uses)

    def _touch(self, model: str, when: float, uses: int) -> None:
        if when < self._last_used.get(model, -math.inf):
            return
        self._last_used[model] = when
        self.uses[model] = self.uses.get(model, 0) + uses
        cs = self._copies.get(model)
        if cs:
            loaded = [p for p, c in cs.items() if c.state == CopyState.LOADED]
            if loaded:
                self._push(model, loaded, push_global=True)

    def pod_models(self, pod: str) -> dict[str, Copy]:
        """The pod's copies (read-only view of the index)."""
        p = self._ix.get(pod)
        return p.models if p is not None else {}

    def used(self, pod: str) -> int:
        p = self._ix.get(pod)
        return p.used if p is not None else 0

    def unloading(self, pod: str) -> int:
        p = self._ix.get(pod)
        return p.unloading if p is not None else 0

    def loading(self, pod: str) -> int:
        p = self._ix.get(pod)
        return p.loading if p is not None else 0

    def sent(self, pod: str) -> int:
        """Loads ordered on the pod and not finished (loading, no longer queued)."""
        p = self._ix.get(pod)
        return p.loading - p.queued if p is not None else 0

    def queued_bytes(self, pod: str) -> int:
        """Bytes booked by the pod's queued loads (decided, no order sent yet)."""
        p = self._ix.get(pod)
        return p.queued_bytes if p is not None else 0

    def live_copies(self, model: str) -> int:
        return sum(1 for c in self._copies.get(model, {}).values() if c.state == CopyState.LOADED)

    def kept_bytes(self, pod: str) -> int:
        """Bytes on `pod` that will never free up by themselves: copies of pinned models and
        copies that keep a model at its minCopies. Everything else booked (busy, loading,
        unloading) becomes evictable in time. O(the pod's models): only asked when a model
        does not fit now."""
        n = 0
        for m, c in self.pod_models(pod).items():
            if c.state not in _BOOKED:
                continue
            mv = self._models.get(m)
            if mv is not None and (mv.pinned or (mv.min_copies > 0 and self.live_copies(m) <= mv.min_copies)):
                n += c.size
        return n

    def can_evict(self, model: str, busy: bool = False) -> bool:
        """Loaded copies of this model may be dropped: not pinned, above its minimum, and not
        busy (unless `busy`: the last resort, see `busy_victims`)."""
        if not busy and model in self.in_flight:
            return False
        mv = self._models.get(model)
        if mv is not None and (mv.pinned or (mv.min_copies > 0 and self.live_copies(model) <= mv.min_copies)):
            return False
        return True

    def _walk(self, heap: list[tuple[float, str]], valid: Callable[[float, str], bool]) -> Iterator[tuple[float, str]]:
        """Entries of a lazy heap in key order, dropping stale ones; the heap is restored after."""
        keep: list[tuple[float, str]] = []
        keys = self._keys
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
        keys = self._keys
        live = {(k, m) for k, m in heap if keys.get(m) == k and (held is None or m in held)}
        heap[:] = list(live)
        heapq.heapify(heap)

    def evictable(self, pod: str) -> Iterator[str]:
        """Models this pod could drop, cheapest first (see eviction_key)."""
        p = self._ix.get(pod)
        if p is None:
            return iter(())

        def ok(_: float, m: str) -> bool:
            c = p.models.get(m)
            return c is not None and c.state == CopyState.LOADED

        return (m for _, m in self._walk(p.heap, ok) if self.can_evict(m) and not self.base_stays(m, pod))

    def victims(self, pod: str, need: int, spare: str = "") -> tuple[list[str], int]:
        """The cheapest evictable models on `pod` whose bytes add up to `need`, and the bytes
        they free (less than `need` when even evicting all of them would not do). Never
        `spare` (the base of the adapter being placed), never a base whose adapters stay: a
        base goes only after all of its adapters here, in the same decision or before. A plain
        loop over the lazy heap rather than `evictable()`: this is the hot path of every decision."""
        p = self._ix.get(pod)
        if p is None:
            return [], 0
        heap, keys, models = p.heap, self._keys, p.models
        while heap:  # drop stale entries at the top for good
            k, m = heap[0]
            c = models.get(m)
            if keys.get(m) == k and c is not None and c.state == CopyState.LOADED:
                if c.size >= need and m != spare and self.can_evict(m) and not (p.adapters and m in p.adapters):
                    return [m], c.size  # the common case: the cheapest copy alone makes room
                break
            heapq.heappop(heap)
        keep: list[tuple[float, str]] = []
        chosen: list[str] = []
        held_back: list[str] = []  # bases whose adapters are here: evictable once those are chosen
        freed = 0
        while heap and freed < need:
            e = heapq.heappop(heap)
            k, m = e
            c = models.get(m)
            if keys.get(m) != k or c is None or c.state != CopyState.LOADED or m in chosen or m in held_back:
                continue  # stale entry: used again since, evicted, or a duplicate
            keep.append(e)
            if m == spare or not self.can_evict(m):
                continue
            if p.adapters and m in p.adapters:
                held_back.append(m)
                continue
            chosen.append(m)
            freed += c.size
            # Its base right after its last adapter here, before other models: evicting more
            # adapters first would cost hits and free little (a base is most of a pair's bytes).
            base = self.copy_base(m, pod)
            bc = models.get(base) if base else None
            if (bc is not None and freed < need and bc.state == CopyState.LOADED and base != spare
                    and self.can_evict(base) and not self.base_stays(base, pod, chosen)):
                chosen.append(base)
                freed += bc.size
                if base in held_back:
                    held_back.remove(base)
        for m in held_back:  # the adapters went first; their base follows if they all go
            if freed < need and not self.base_stays(m, pod, chosen):
                chosen.append(m)
                freed += models[m].size
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
        p = self._ix.get(pod)
        if p is None:
            return [], 0
        chosen: list[str] = []
        freed = 0

        def ok(_: float, m: str) -> bool:
            c = p.models.get(m)
            return c is not None and c.state == CopyState.LOADED

        def evictable(m: str) -> bool:
            c = p.models.get(m)
            return (c is not None and c.state == CopyState.LOADED and m not in skip and m not in chosen
                    and self.can_evict(m, busy=True) and now - c.since >= self.landed_grace_s)

        # A base whose adapters are here is busy with their requests and goes right after the
        # last of them, in the same decision. Skipping it left pods full of busy base+adapter
        # pairs (each adapter over a base of its own, ModelMesh-style) with no room for a new
        # pair until its requests timed out: evicting the adapter alone frees too little.
        walk = self._walk(p.heap, ok)
        try:
            for _, m in walk:
                if p.adapters and m in p.adapters:
                    if not evictable(m) or self.base_stays(m, pod, [*skip, *chosen]):
                        continue  # its adapters stay: it goes, if at all, after them (below)
                elif m not in self.in_flight or not evictable(m):
                    continue
                chosen.append(m)
                freed += p.models[m].size
                base = self.copy_base(m, pod)
                if base and freed < need and base in p.models and evictable(base) and not self.base_stays(base, pod, [*skip, *chosen]):
                    chosen.append(base)
                    freed += p.models[base].size
                if freed >= need:
                    break
        finally:
            walk.close()  # restores the heap
        return chosen, freed

    def cheapest_victims(self, n: int) -> list[tuple[str, str]]:
        """Up to `n` (model, pod) copies that the global LRU would evict first."""
        heap, keys = self._global, self._keys
        keep: list[tuple[float, str]] = []
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        while heap and len(out) < n:
            e = heapq.heappop(heap)
            k, m = e
            cs = self._copies.get(m)
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
        self._pool_cache = None

    def _pools(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        # Pods come and go rarely and a decision runs per load: cached, keyed on the dict and
        # its size so an added or removed pod rebuilds it.
        sig = (id(self.pods), len(self.pods))
        c = self._pool_cache
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
            self._pool_cache = c
        return c[1], c[2]


def evictable(pod: str, cluster: ClusterView) -> list[str]:
    """Models this pod could drop, cheapest first: loaded, not pinned, not busy, and not a copy
    that would take the model under its minimum."""
    return list(cluster.evictable(pod))
