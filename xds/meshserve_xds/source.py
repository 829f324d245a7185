"""Feeds the snapshot cache from Redis: reads routing state, builds resources, debounces bursts.

At start it reads every routing hash once. After that it follows `ms:changes`: each entry names
the kind and id of what changed, so a batch re-reads only those objects (one pipelined HMGET
per kind) into the in-memory state. A revision gap in the stream means entries were missed,
and only then does it read everything again.

Changes arrive on the `ms:changes` stream. Bursts are batched: a push waits for a quiet
window (default 20 ms) but never longer than a maximum delay (default 200 ms) after the first
change, so a storm of loads becomes a handful of pushes while a lone change lands fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from meshserve import state as st
from meshserve.model import CopyState, ModelSpec, Pod, copies_from_json
from meshserve.rules import store as rules_store
from meshserve.settings import Settings
from meshserve_xds import proxyless, scoped
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import GATEWAY_GROUP, ISTIO_GROUP, PROXYLESS_GROUP

log = logging.getLogger("meshserve.xds")

M_BUILD = Histogram("meshserve_xds_build_seconds", "Time to read state and build all resources",
                    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
M_REV = Gauge("meshserve_xds_state_revision", "Redis state revision the current snapshot reflects")
M_RESYNCS = Counter("meshserve_xds_resyncs", "Full rebuilds from Redis")
M_INCREMENTAL = Counter("meshserve_xds_incremental_updates", "Change batches applied by targeted re-reads")


def routing_state(snap: st.Snapshot, settings: Settings) -> r.RoutingState:
    pods = {p.id: r.Endpoint(p.host, p.rest_port, p.grpc_port) for p in snap.pods.values()}
    loaded: dict[str, list[str]] = {}
    for model, copies in snap.placements.items():
        holders = sorted(p for p, c in copies.items() if c.state == CopyState.LOADED and p in pods)
        if holders:
            loaded[model] = holders
    return r.RoutingState(
        pods=pods,
        loaded=loaded,
        registered=set(snap.models),
        aliases=dict(snap.aliases),
        activator=r.Endpoint(settings.host, settings.activator_rest_port, settings.activator_grpc_port),
        cold_timeout_s=settings.cold_start_timeout_seconds + 5,
        route_stats=settings.xds_route_stats,
    )


async def read_transformers(state: st.State) -> dict[str, r.Transformer]:
    """The transformers `meshserve up` runs (meshserve/transformer.py), read at each resync:
    they are written before the xDS server starts and change only with a restart."""
    import json

    from meshserve.transformer import TRANSFORMERS

    out: dict[str, r.Transformer] = {}
    for name, raw in (await state.r.hgetall(TRANSFORMERS)).items():
        try:
            d = json.loads(raw)
            out[name.decode()] = r.Transformer(r.Endpoint(d["host"], int(d["rest_port"]), int(d["grpc_port"])), str(d["predictor"]))
        except (ValueError, KeyError, TypeError):
            log.warning("xds: ignoring a malformed transformer record %r", name)
    return out


@dataclass
class ChangeBatch:
    """What a batch of `ms:changes` entries asks for: targeted re-reads, or a full resync."""

    resync: bool
    rev: int
    ids: dict[str, set[str]] = field(default_factory=dict)  # kind -> ids to re-read


# Kinds whose objects are re-read one by one; rules are few and re-read whole.
_TARGETED = {st.KIND_MODEL: st.MODELS, st.KIND_ALIAS: st.ALIASES, st.KIND_POD: st.PODS, st.KIND_PLACEMENT: st.PLACEMENTS}
_RULE_KINDS = {st.KIND_RULE, st.KIND_TRANSITION}
LAYOUTS = ("scoped", "matcher")


def plan_batch(current_rev: int, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> ChangeBatch:
    """Pure. Entries at or below `current_rev` are already in the snapshot. A revision that
    skips one (a trimmed stream, a commit with no entry, a reader that fell behind) or a kind
    we don't know means something may be missing: resync from the hashes."""
    rev = current_rev
    ids: dict[str, set[str]] = {}
    for _, fields in entries:
        e_rev = int(fields.get(b"rev", b"0"))
        if e_rev <= current_rev:
            continue
        if e_rev > rev + 1:
            return ChangeBatch(True, e_rev)
        rev = e_rev
        kind = fields.get(b"kind", b"").decode()
        if kind not in _TARGETED and kind not in _RULE_KINDS:
            return ChangeBatch(True, rev)
        ids.setdefault(kind, set()).add(fields.get(b"id", b"").decode())
    return ChangeBatch(False, rev, ids)


class RedisSource:
    """Keeps routing state in memory, follows the change stream with targeted re-reads, and
    rebuilds from the hashes only at start and on a revision gap."""

    def __init__(self, settings: Settings, state: st.State, cache: SnapshotCache, layout: str | None = None):
        self.s, self.state, self.cache = settings, state, cache
        # "scoped" (default) or "matcher" (docs/design/routing.md); MESHSERVE_XDS_LAYOUT picks it.
        self.layout = layout or os.environ.get("MESHSERVE_XDS_LAYOUT") or "scoped"
        if self.layout not in LAYOUTS:
            raise ValueError(f"MESHSERVE_XDS_LAYOUT={self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        self._index: scoped.Index | None = None
        self._alias_of: dict[str, str] = {}
        self._aliases_by_model: dict[str, set[str]] = {}
        self.listeners = r.ListenerConfig(settings.host, settings.gateway_rest_port, settings.gateway_grpc_port)
        self.rev = 0
        self.snap: st.Snapshot | None = None
        self.traffic: dict = {}
        self.transformers: dict[str, r.Transformer] = {}
        self.published: set[str] = set()

    async def rebuild(self) -> None:
        """Full resync: read every routing hash at one revision."""
        t0 = time.perf_counter()
        snap = await self.state.snapshot()
        self.snap = snap
        self.traffic = await rules_store.plans(self.state, snap.aliases, set(snap.models))
        self.transformers = await read_transformers(self.state)
        self._index = None  # a resync replaces everything
        await self._publish()
        self.rev = snap.rev
        M_REV.set(snap.rev)
        M_RESYNCS.inc()
        M_BUILD.observe(time.perf_counter() - t0)

    async def apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Follow a batch of change entries: re-read only what they name."""
        batch = plan_batch(self.rev, entries)
        if batch.resync or self.snap is None:
            log.info("xds: revision gap or unknown change after %d; resyncing", self.rev)
            await self.rebuild()
            return
        if not batch.ids:
            return
        t0 = time.perf_counter()
        snap = self.snap
        targeted = [(k, sorted(ids)) for k, ids in batch.ids.items() if k in _TARGETED]
        values: list = []
        if targeted:
            async with self.state.r.pipeline(transaction=True) as p:
                for kind, ids in targeted:
                    p.hmget(_TARGETED[kind], ids)
                values = await p.execute()
        for (kind, ids), vals in zip(targeted, values):
            _apply_values(snap, kind, ids, vals)
        # What was just read may already include later commits; their entries come next and
        # re-reading them is harmless, so the revision is the batch's own.
        snap.rev = batch.rev
        plans_moved = False
        if batch.ids.keys() & (_RULE_KINDS | {st.KIND_ALIAS, st.KIND_MODEL}):
            before, self.traffic = self.traffic, await rules_store.plans(self.state, snap.aliases, set(snap.models))
            plans_moved = self.traffic != before
        if not (self.layout == "scoped" and not plans_moved and await self._publish_scoped_partial(batch.ids)):
            await self._publish()
        self.rev = batch.rev
        M_REV.set(self.rev)
        M_INCREMENTAL.inc()
        M_BUILD.observe(time.perf_counter() - t0)

    async def _publish(self) -> None:
        assert self.snap is not None
        rs = routing_state(self.snap, self.s)
        rs.traffic = self.traffic
        rs.transformers = self.transformers
        if self.layout == "scoped":
            await self._publish_scoped(rs)
            return
        gateway = r.build_all(rs, self.listeners)
        # Istio mode is the same resources without our listeners: build and serialize once.
        istio = r.Resources(by_type={**gateway.by_type, r.LISTENER_TYPE: {}})
        groups = {GATEWAY_GROUP: gateway, ISTIO_GROUP: istio}
        # Proxyless clients get a route list (O(loaded models)): built only once one connected.
        if PROXYLESS_GROUP in self.cache.wanted:
            groups[PROXYLESS_GROUP] = proxyless.build_all(rs)
        self.published = set(groups)
        await self.cache.set_many(groups)

    async def _publish_scoped_partial(self, ids: dict[str, set[str]]) -> bool:
        """Scoped layout, placement/model/alias changes only: touch just what they name, without
        walking every model. False when the change needs the full diff (pods, rules, a group
        that builds whole, or a name or model that a traffic plan involves)."""
        if self._index is None or self.snap is None or ids.keys() - {st.KIND_PLACEMENT, st.KIND_MODEL, st.KIND_ALIAS}:
            return False
        if self.cache.wanted & {ISTIO_GROUP, PROXYLESS_GROUP}:
            return False
        snap = self.snap
        models = set(ids.get(st.KIND_PLACEMENT, ())) | set(ids.get(st.KIND_MODEL, ()))
        names = set(models) | set(ids.get(st.KIND_ALIAS, ()))
        for a in ids.get(st.KIND_ALIAS, ()):
            old, new = self._alias_of.get(a), snap.aliases.get(a)
            if old is not None:
                self._aliases_by_model.get(old, set()).discard(a)
                models.add(old)
            if new is not None:
                self._aliases_by_model.setdefault(new, set()).add(a)
                models.add(new)
                self._alias_of[a] = new
            else:
                self._alias_of.pop(a, None)
        aliases = {a: m for m in models for a in self._aliases_by_model.get(m, ())}
        names |= models | set(aliases)
        if scoped.involves_traffic(self._index, models, names):
            # A plan's RouteConfiguration depends on every model it names: take the full diff,
            # which rebuilds it. The alias maps are rebuilt there too.
            return False
        loaded = {}
        for m in models:
            holders = sorted(p for p, c in snap.placements.get(m, {}).items() if c.state == CopyState.LOADED and p in snap.pods)
            if holders:
                loaded[m] = holders
        held = {p for ps in loaded.values() for p in ps}
        part = r.RoutingState(
            pods={p: r.Endpoint(snap.pods[p].host, snap.pods[p].rest_port, snap.pods[p].grpc_port) for p in held},
            loaded=loaded, aliases=aliases, registered={m for m in models if m in snap.models},
            activator=r.Endpoint(self.s.host, self.s.activator_rest_port, self.s.activator_grpc_port),
            cold_timeout_s=self.s.cold_start_timeout_seconds + 5,
            route_stats=self.s.xds_route_stats,
        )
        patch = scoped.diff_partial(self._index, part, models, names)
        # Clusters first: the server holds routes back until the clusters they name are answered.
        for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE, r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE):
            await self.cache.patch(GATEWAY_GROUP, t, patch.upserts.get(t, {}), patch.removes.get(t, []))
        return True

    async def _publish_scoped(self, rs: r.RoutingState) -> None:
        """Scoped layout: patch only the scopes and route configurations that changed."""
        # The alias maps let a later change find a model's names without walking all aliases.
        self._alias_of = dict(rs.aliases)
        self._aliases_by_model = {}
        for a, m in rs.aliases.items():
            self._aliases_by_model.setdefault(m, set()).add(a)
        if self._index is None:
            await self.cache.set(GATEWAY_GROUP, scoped.build_all(rs, self.listeners))
            self._index = scoped.index(rs)
        else:
            patch, self._index = scoped.diff(self._index, rs)
            full = scoped.build_all(r.RoutingState(pods=rs.pods, loaded={}, aliases={}, activator=rs.activator), self.listeners)
            full.by_type[r.CLUSTER_TYPE], full.by_type[r.ENDPOINT_TYPE] = r.build_clusters(rs, copy_sets=True)
            # Clusters, endpoints and listeners follow pods and copy sets, not models: small,
            # replaced whole (the cache sends only those whose bytes changed).
            for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE, r.LISTENER_TYPE):
                held = self.cache.group(GATEWAY_GROUP).types.get(t)
                gone = [n for n in (held.resources if held else {}) if n not in full.by_type[t]]
                await self.cache.patch(GATEWAY_GROUP, t, full.by_type[t], gone)
            for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE):
                await self.cache.patch(GATEWAY_GROUP, t, patch.upserts.get(t, {}), patch.removes.get(t, []))
        self.published = {GATEWAY_GROUP}
        # Istio mode takes RDS `meshserve_rest` from a listener we don't own: that one is a
        # single RouteConfiguration, built only while such a gateway is connected.
        extra: dict[str, r.Resources] = {}
        if ISTIO_GROUP in self.cache.wanted:
            extra[ISTIO_GROUP] = r.build_all(rs, None)
        if PROXYLESS_GROUP in self.cache.wanted:
            extra[PROXYLESS_GROUP] = proxyless.build_all(rs)
        if extra:
            await self.cache.set_many(extra)
            self.published |= set(extra)

    async def run(self) -> None:
        quiet = self.s.debounce_quiet_ms / 1000
        max_delay = self.s.debounce_max_ms / 1000
        while True:
            try:
                last = await self.state.last_change_id()
                await self.rebuild()
                log.info("xds: built snapshot at revision %d", self.rev)
                while True:
                    resp = await self.state.r.xread({st.CHANGES: last}, block=1000, count=10_000)
                    if not resp:
                        if self.cache.wanted - self.published and self.snap is not None:
                            await self._publish()  # a client of a group not built yet
                        continue
                    first = time.monotonic()
                    entries = list(resp[0][1])
                    last = entries[-1][0]
                    # Debounce: keep reading while changes keep coming, up to the max delay. The
                    # quiet window is timed here, not by XREAD's BLOCK: Redis checks blocked
                    # clients' timeouts at its `hz` tick (100 ms by default), which turned a
                    # 20 ms window into ~95 ms (bench/xds_e2e_latency.py).
                    while time.monotonic() - first < max_delay:
                        await asyncio.sleep(min(quiet, max(0.0, max_delay - (time.monotonic() - first))))
                        more = await self.state.r.xread({st.CHANGES: last}, count=10_000)
                        if not more:
                            break
                        entries += more[0][1]
                        last = entries[-1][0]
                    await self.apply(entries)
            except Exception as e:  # Redis gone: keep serving the last snapshot, retry
                log.warning("xds: state source error (%s); serving last snapshot, retrying", e)
                await asyncio.sleep(1.0)


def _apply_values(snap: st.Snapshot, kind: str, ids: list[str], vals: list[bytes | None]) -> None:
    """Write re-read hash values into the in-memory snapshot; a missing value is a delete."""
    for i, v in zip(ids, vals):
        if kind == st.KIND_MODEL:
            if v is None:
                snap.models.pop(i, None)
            else:
                snap.models[i] = ModelSpec.from_json(v)
        elif kind == st.KIND_ALIAS:
            if v is None:
                snap.aliases.pop(i, None)
            else:
                snap.aliases[i] = v.decode()
        elif kind == st.KIND_POD:
            if v is None:
                snap.pods.pop(i, None)
            else:
                snap.pods[i] = Pod.from_json(v)
        elif kind == st.KIND_PLACEMENT:
            copies = copies_from_json(v)
            if copies:
                snap.placements[i] = copies
            else:
                snap.placements.pop(i, None)
