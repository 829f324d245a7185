"""The leader's view, rebuilt from Redis when it takes the lease, and kept current from the
registries: model specs (following ms:changes), pods and declared ServingRuntimes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Iterable

from meshserve.model import Copy, CopyState, ModelSpec, Pod
from meshserve.store.state import PlacedSnapshot
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_ALIAS, KIND_ALL, KIND_MODEL
from meshserve.store.state import parse_runtimes
from meshserve_placement import bases
from meshserve_placement.bases import resolve_base
from meshserve_placement.view import ClusterView, ModelView, PodView, RuntimeView, reserve_room
from meshserve_placement.sizes import booked_size, reported_of
from meshserve_placement.specs import Fields, Specs, view_fields

log = logging.getLogger("meshserve.placement")
SPEC_SLICE = 1000  # specs applied per hold of the leader's lock (_refresh_specs)


class Reload:
    async def _rebuild(self) -> None:
        """Everything the previous leader decided is in Redis: rebuild the view from it.

        The view holds the models the leader has a use for, not every registered one: those
        with copies, pinned ones, those whose requests wait here, and the bases of adapters
        among them; a model asked for later joins with its request (`_refresh_model_and_pods`),
        a registration with its change (`_refresh_specs`), and a model that must keep copies
        without having any (minCopies, pinned by annotation) with the walk over the registry
        that follows the reload (`_find_kept`). At a million registered models, reading and
        parsing every spec took most of a reload and 2 KiB a model (docs/benchmarks.md)."""
        r = self.state.r
        # Where to follow ms:changes from: taken before the snapshot, so a change made between
        # the two is read again (harmless), never missed.
        last_id, self._changes_rev = await ops.last_change(r)
        self._changes_id = last_id.decode()
        snap = await self.state.placed_snapshot()
        self.pods = dict(snap.pods)
        hb = await r.zrange(k.HEARTBEATS, 0, -1, withscores=True)
        self.heartbeats = {p.decode(): v for p, v in hb}
        lu = await r.zrange(k.LAST_USED, 0, -1, withscores=True)
        now = time.time()
        excluded = {}
        for field, v in (await r.hgetall(k.EXCLUDED)).items():
            m, _, p = field.decode().rpartition("|")
            if float(v) > now:
                excluded[(m, p)] = float(v)
        self.pins = {m.decode() for m in await r.hkeys(k.PINS)}
        self.queues = {}
        for pod in self.pods:
            q = await r.zrange(k.loadq_key(pod), 0, -1, withscores=True)
            if q:
                self.queues[pod] = {m.decode(): v for m, v in q}
        # Models whose requests wait for room or for a pool (in memory only) stay waiting across
        # a reload by this process: forgetting them left loads asked for once never made.
        held = {m for m in self.waiting if m in self.room or m in self.pending}
        wanted = set(snap.placements) | self.pins | held | {m for q in self.queues.values() for m in q}
        # The specs stay the bytes Redis sent until one is asked for (specs.py).
        self.specs = Specs(await self.state.models_raw(sorted(wanted)))
        # Building the view is pure and O(its models): off the event loop, so the lease keeps.
        models, adapters = await asyncio.to_thread(_model_views, self.specs, snap.placements)
        # The aliases adapters name as their base, and only those: the leader resolves no other
        # name (bases.resolve_base); bases not in the view yet join it.
        self.aliases = {}
        for b in await self._refresh_bases([b for _, b in adapters]):
            self.specs[b.id] = b
            models[b.id] = _model_view(b)
        for m, b in adapters:
            models[m] = replace(models[m], base=resolve_base(b, self.aliases, self.specs))
        self.view = await asyncio.to_thread(_build_view, snap, models, lu, excluded, self.t.eviction_horizon_seconds,
                                            self.t.unload_reserve_fraction)
        self._failed_unloads = {
            (m, p): time.time() for m, cs in self.view.copies.items() for p, c in cs.items()
            if c.state == CopyState.UNLOADING and c.reason.startswith("unload failed")
        }
        # Adapter copies over a superseded version of their base (keys.PLACEMENT_OVER), and the
        # copies of such versions kept for them.
        for a, pod, b in await ops.read_over(r):
            self.view.hold_over(a, pod, b)
        self._held = bases.held(self.view)
        for m in self.pins:
            if m in self.view.models:
                self.view.set_model(replace(self.view.models[m], pinned=True))
        await self._refresh_pods()  # the declared runtimes too, before any decision on the new view
        self._lastused_seen = max((v for _, v in lu), default=0.0)
        self.waiting = {m for q in self.queues.values() for m, prio in q.items() if prio < k.BACKGROUND} | held
        self._rebuilds += 1  # the registry is walked again for this view (`_walk_registry`)
        log.info("%s: state reloaded: %d models in view, %d pods, %d placements, %d queued loads", self.id,
                 len(self.specs), len(self.pods), len(snap.placements), sum(len(q) for q in self.queues.values()))

    async def _walk_registry(self) -> None:
        """While leading: the registry walk after every rebuild of the view (`_find_kept`)."""
        while True:
            if self._walked != self._rebuilds:
                await self._find_kept()
            await asyncio.sleep(self.t.maintain_seconds)

    async def _find_kept(self) -> None:
        """The walk over the registry that follows a reload: models that must keep copies
        (minCopies, the pinned annotation) but have none join the view, for the copy reconcile
        to place them. In chunks (HSCAN), each applied under the lock on its own; the fields
        are decoded without a full parse (specs.view_fields). Until it ends, such a model waits
        for its copies a little longer than one that has some: a failover's gap, at most."""
        gen, n = self._rebuilds, 0
        async for batch in self.state.scan_models():
            found = await asyncio.to_thread(_kept_in, batch, self.view.models)
            if found:
                n += len(found)
                await self._apply_specs([ModelSpec.from_json(v) for v in found])
        self._walked = gen
        log.info("%s: registry walked: %d models to keep copies of joined the view", self.id, n)

    async def _reload(self) -> None:
        await self._rebuild()
        async with self._deciding():
            for pod in list(self.pods):
                await self._dispatch(pod)  # slots may have freed while nobody led

    def _apply_spec(self, spec: ModelSpec) -> None:
        self.specs[spec.id] = spec
        old = self.view.models.get(spec.id)
        mv = _model_view(spec, self.reported.get(spec.id, 0), resolve_base(spec.base, self.aliases, self.specs))
        mv = replace(mv, pinned=mv.pinned or spec.id in self.pins)
        if old is not None and self.view.live_copies(spec.id):
            mv = replace(mv, size=old.size)  # keep the measured size once loaded
        self.view.set_model(mv)

    async def _refresh_model_and_pods(self, model_id: str) -> ModelSpec | None:
        """The model's spec, always fresh (annotations: min/max/pinned may change), and the pods
        (`_refresh_pods`), in one Redis round trip: a cold request's decision waits for both
        (issue 19 §4: one round trip fewer on the cold path)."""
        async with self.state.r.pipeline(transaction=False) as p:
            p.hget(k.MODELS, model_id).hgetall(k.PODS).hgetall(k.RUNTIMES)
            raw_spec, raw, raw_runtimes = await p.execute()
        self._apply_pods(raw, raw_runtimes)
        if not raw_spec:
            return self.specs.get(model_id)
        spec = ModelSpec.from_json(raw_spec)
        if spec.base and self.aliases.get(spec.base) not in self.specs:
            # An adapter whose base is new to the leader: its current model and spec. Known
            # bases are kept current by _refresh_specs, so the cold path has no round trip more.
            for b in await self._refresh_bases([spec.base]):
                self._apply_spec(b)
        self._apply_spec(spec)
        return spec

    async def _join_models(self, ids: Iterable[str]) -> None:
        """Models the leader has a use for now that its view lacks (it holds only what it has
        a use for, `_rebuild`): their specs read and applied, an adapter's base first. The
        caller holds the lock. A model not registered stays out."""
        new = sorted({m for m in ids if m not in self.view.models})
        if not new:
            return
        specs = [ModelSpec.from_json(v) for v in (await self.state.models_raw(new)).values()]
        bases = [s.base for s in specs if s.base]
        if bases:
            specs = [b for b in await self._refresh_bases(bases) if b.id not in new] + specs
        for spec in specs:
            self._apply_spec(spec)

    async def _refresh_bases(self, names: list[str]) -> list[ModelSpec]:
        """The models adapters name as their base (aliases, updated here), and the specs of those
        new to the leader (for the caller to apply under the decision lock)."""
        names = sorted(set(names))
        if not names:
            return []
        ids = await self.state.r.hmget(k.ALIASES, names)
        for name, raw in zip(names, ids):
            if raw:
                self.aliases[name] = raw.decode()
            else:
                self.aliases.pop(name, None)
        # A name that is no alias may be a concrete id (resolve_base): read it as one.
        new = sorted({i for n in names if (i := self.aliases.get(n, n)) not in self.specs})
        return [ModelSpec.from_json(raw) for raw in (await self.state.r.hmget(k.MODELS, new) if new else []) if raw]

    async def _refresh_pods(self) -> None:
        """Pods register themselves and flag draining; pick up new pods and changed fields,
        and the declared ServingRuntimes."""
        async with self.state.r.pipeline(transaction=False) as p:
            p.hgetall(k.PODS).hgetall(k.RUNTIMES)
            raw, raw_runtimes = await p.execute()
        self._apply_pods(raw, raw_runtimes)

    def _apply_pods(self, raw: dict[bytes, bytes], raw_runtimes: dict[bytes, bytes]) -> None:
        runtimes = {n: RuntimeView(n, tuple(f), tuple(a)) for n, (f, a) in parse_runtimes(raw_runtimes).items()}
        if runtimes != self.view.runtimes:
            self.view.runtimes = runtimes
        for key, v in raw.items():
            pid = key.decode()
            p = Pod.from_json(v)
            self.pods[pid] = p
            pv = self.view.pods.get(pid)
            if pv is None:
                self.view.pods[pid] = _pod_view(p, self.t.unload_reserve_fraction)
                self.heartbeats.setdefault(pid, time.time())
            else:
                if (pv.runtime, pv.formats, pv.auto_formats) != (p.runtime, p.formats, p.auto_formats):
                    pv.runtime, pv.formats, pv.auto_formats = p.runtime, p.formats, p.auto_formats
                    self.view.pods_changed()
                pv.max_loading, pv.draining = p.max_loading, p.draining
                reserve_room(pv, p.capacity_bytes, p.max_loading, self.t.unload_reserve_fraction)

    def _mark_health(self, now: float) -> None:
        for pid, pv in self.view.pods.items():
            pv.healthy = now - self.heartbeats.get(pid, 0) <= self.s.heartbeat_seconds * self.s.heartbeat_misses

    async def _refresh_specs(self) -> None:
        """Models registered (or re-annotated) since the last look, so minCopies and pinning
        apply without a request. Follows ms:changes: the cost is the changes', not the
        registry's (100,000 models re-read every poll would starve everything else)."""
        ids, full = await self._changed_models()
        moved, self._moved_aliases = self._moved_aliases, set()
        if moved:
            await self._follow_bases(moved)
        if full:
            # Only the models the view holds, and those that must keep copies: the rest join it
            # when asked for (a revision gap must not parse a million specs into the view).
            # The same walk as after a reload, in chunks.
            specs = []
            async for batch in self.state.scan_models():
                specs += [ModelSpec.from_json(v) for v in await asyncio.to_thread(_kept_in, batch, self.view.models, True)]
        elif ids:
            raw_ids = await self.state.r.hmget(k.MODELS, sorted(ids))
            specs = await asyncio.to_thread(lambda: [ModelSpec.from_json(v) for v in raw_ids if v])
        else:
            return
        await self._apply_specs(specs)

    async def _apply_specs(self, specs: list[ModelSpec]) -> None:
        """Apply specs read from Redis, the bases their adapters name first."""
        # Bases named by changed adapters, and known bases with a changed model (a new version).
        named = [s.base for s in specs if s.base] + [s.alias for s in specs if s.alias in self.aliases]
        if named:
            ids = {s.id for s in specs}
            specs = [b for b in await self._refresh_bases(named) if b.id not in ids] + specs  # bases first
        # In slices, each under the lock on its own: 20,000 models registered at once took the
        # event loop for seconds in one go, long enough to lose the lease (2 s) and to see every
        # pod's heartbeat as late (bench/density.py).
        for i in range(0, len(specs), SPEC_SLICE):
            async with self._deciding():
                for spec in specs[i:i + SPEC_SLICE]:
                    self._apply_spec(spec)

    async def _follow_bases(self, names: set[str]) -> None:
        """Names adapters use as their base whose alias moved (a rollout moved it to a new
        version): the adapters follow it now, so their next loads go over the new version, not
        only once their specs are read again. The copies already loaded stay counted for the
        version they are over (ClusterView.set_model); the old version's copies are kept for
        them when the rollout withdraws it (leader_requests._retire)."""
        async with self._deciding():
            for old in sorted({self.aliases[n] for n in names if n in self.aliases}):
                await self._repoint_adapters(old)

    async def _changed_models(self, batch: int = 10_000, most: int = 20_000) -> tuple[set[str], bool]:
        """Model ids named by ms:changes since the last call, or (∅, True) when that cannot be
        told: a revision gap (entries trimmed away) or more changes than are worth targeting."""
        ids: set[str] = set()
        full = False
        while True:
            entries = await ops.changes_since(self.state.r, self._changes_id, batch)
            if not entries:
                return (set(), True) if full else (ids, False)
            for _, ch in entries:
                if ch.rev > self._changes_rev + 1:
                    full = True
                self._changes_rev = max(self._changes_rev, ch.rev)
                if ch.kind == KIND_ALL:
                    full = True
                elif ch.kind == KIND_MODEL and not full:
                    ids.add(ch.id)
                elif ch.kind == KIND_ALIAS and ch.id in self.aliases:
                    self._moved_aliases.add(ch.id)  # a base's name moved: its adapters follow (_follow_bases)
            self._changes_id = entries[-1][0].decode()
            if len(ids) > most:
                full, ids = True, set()


def _model_view(m: ModelSpec, reported: int = 0, base: str = "") -> ModelView:
    return _view_of(m.id, m, reported, base)


def _view_of(model: str, f: ModelSpec | Fields, reported: int = 0, base: str = "") -> ModelView:
    # The size a load reported, else the stated size, else the files' prediction, else the
    # unknown-size default (sizes.py). Equal sizes share one int (a million models, a few sizes).
    size = booked_size(f.size_hint, reported, predicted=f.predicted_size)
    return ModelView(model, f.format, _SIZES.setdefault(size, size), f.pinned, f.min_copies, f.max_copies, f.runtime, base)


_SIZES: dict[int, int] = {}


def _model_views(specs: Specs, placements: dict[str, dict[str, Copy]]) -> tuple[dict[str, ModelView], list[tuple[str, str]]]:
    """Every model's view from its spec's bytes (specs.view_fields), and the (model, base name)
    of the adapters, whose bases the caller resolves. A new leader knows a model's reported
    size from the copies it finds booked; most models have none, and only those are looked at."""
    models: dict[str, ModelView] = {}
    adapters: list[tuple[str, str]] = []
    for key, raw in specs.raw_items():
        m = key.decode()
        f = view_fields(raw)
        cs = placements.get(m)
        models[m] = _view_of(m, f, reported_of(c.size for c in cs.values() if c.state == CopyState.LOADED) if cs else 0)
        if f.base:
            adapters.append((m, f.base))
    return models, adapters


def _pod_view(p: Pod, reserve_fraction: float) -> PodView:
    pv = PodView(p.id, p.capacity_bytes, p.formats, max_loading=p.max_loading, draining=p.draining, runtime=p.runtime,
                 auto_formats=p.auto_formats)
    reserve_room(pv, p.capacity_bytes, p.max_loading, reserve_fraction)
    return pv


def _kept_in(batch: dict[bytes, bytes], known: Any, and_known: bool = False) -> list[bytes]:
    """The specs of `batch` for models not in the view (`known`) that must keep copies, and
    with `and_known` those in the view too."""
    out = []
    for key, raw in batch.items():
        if key.decode() in known:
            if and_known:
                out.append(raw)
        else:
            f = view_fields(raw)
            if f.min_copies > 0 or f.pinned:
                out.append(raw)
    return out


def _build_view(snap: PlacedSnapshot, models: dict[str, ModelView], lastused: list[tuple[bytes, float]],
                excluded: dict[tuple[str, str], float], horizon_s: float, reserve_fraction: float = -1.0) -> ClusterView:
    return ClusterView(
        pods={p.id: _pod_view(p, reserve_fraction) for p in snap.pods.values()},
        models=models,
        copies={m: cs for m, cs in snap.placements.items() if cs},
        excluded=excluded,
        # Each recorded use counts once, as a touch would: given to the constructor, the index
        # is built once with its final keys instead of re-pushed per use.
        last_used={key.decode(): v for key, v in lastused},
        uses={key.decode(): 1 for key, _ in lastused},
        horizon_s=horizon_s,
    )
