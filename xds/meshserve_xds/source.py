"""Feeds the snapshot cache from Redis: reads routing state, has each group's layout (layout.py)
turn it into resources or patches, hands those to the cache, debounces bursts.

At start it reads every routing hash once. After that it follows `ms:changes`: each entry names
the kind and id of what changed, so a batch re-reads only those objects (one pipelined HMGET
per kind) into the in-memory state. A revision gap in the stream means entries were missed,
and only then does it read everything again.

Changes arrive on the `ms:changes` stream. Bursts are batched: a push waits for a quiet
window (default 20 ms) but never longer than a maximum delay (default 200 ms) after the first
change, so a storm of loads becomes a handful of pushes while a lone change lands fast.

While Redis is away the last snapshot keeps being served; reconnects back off exponentially
with jitter (tenacity).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, retry_if_not_exception_type, wait_exponential, wait_random

from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_ALIAS, KIND_MODEL, KIND_PAUSED, KIND_PLACEMENT, KIND_POD, KIND_RULE, KIND_TRANSITION, Change
from meshserve.store.state import Snapshot, State
from meshserve.model import CopyState, Pod, alias_of_id, copies_from_json
from meshserve.rules import store as rules_store
from meshserve.settings import Settings
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.layout import EXTRA_GROUPS, Layout, extra_layout, gateway_layout

log = logging.getLogger("meshserve.xds")

M_BUILD = Histogram("meshserve_xds_build_seconds", "Time to read state and build all resources",
                    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
M_REV = Gauge("meshserve_xds_state_revision", "Redis state revision the current snapshot reflects")
M_RESYNCS = Counter("meshserve_xds_resyncs", "Full rebuilds from Redis")
M_INCREMENTAL = Counter("meshserve_xds_incremental_updates", "Change batches applied by targeted re-reads")


def routing_state(snap: Snapshot, settings: Settings, versions: dict[str, str | set[str]] | None = None) -> r.RoutingState:
    """The routing state of a snapshot. `versions`, when given, is filled with alias -> the
    models named after it that have a placement (`alias_of_id`): one id, or a set of several."""
    pods = {p.id: r.Endpoint(p.host, p.rest_port, p.grpc_port, p.id in snap.paused) for p in snap.pods.values()}
    loaded: dict[str, list[str]] = {}
    versions = {} if versions is None else versions
    get = versions.get
    resolving = {p.id for p in snap.pods.values() if p.resolves_names} if settings.xds_shared_routes else set()
    for model, copies in snap.placements.items():
        holders = sorted(p for p, c in copies.items() if c.state == CopyState.LOADED and p in pods)
        if holders:
            loaded[model] = holders
        if not resolving:
            continue  # nothing shares routes: versions are not looked at (0.07 s at 10^5 placements)
        alias, sep, _ = model.partition("__")  # alias_of_id(), inlined: this runs per placement
        if sep and alias:
            v = get(alias)
            if v is None:
                versions[alias] = model
            elif isinstance(v, str):
                versions[alias] = {v, model}
            else:
                v.add(model)
    return r.RoutingState(
        pods=pods,
        loaded=loaded,
        registered=set(snap.models),
        aliases=dict(snap.aliases),
        activator=r.Endpoint(settings.host, settings.activator_rest_port, settings.activator_grpc_port),
        cold_timeout_s=settings.cold_start_timeout_seconds + 5,
        route_stats=settings.xds_route_stats,
        resolving=resolving,
        shared_routes=settings.xds_shared_routes,
        contested={a: holding(snap, v) for a, v in versions.items() if not isinstance(v, str)},
    )


def holding(snap: Snapshot, models: set[str]) -> dict[str, tuple[str, ...]]:
    """model -> the pods where it has a copy a runtime may hold (any state but failed): where
    two models with one alias have one on the same pod, the alias needs the gateway's rewrite
    (scoped_routes.loaded_target)."""
    return {m: tuple(p for p, c in snap.placements.get(m, {}).items() if c.state != CopyState.FAILED) for m in models}


def _note_version(versions: dict[str, str | set[str]], model: str, placed: bool) -> None:
    """Keep `versions` (routing_state) up to date for one model whose placement changed."""
    alias = alias_of_id(model)
    if alias is None:
        return
    v = versions.get(alias)
    if placed:
        if v is None:
            versions[alias] = model
        elif isinstance(v, str):
            if v != model:
                versions[alias] = {v, model}
        else:
            v.add(model)
    elif v == model:
        del versions[alias]
    elif isinstance(v, set):
        v.discard(model)
        if len(v) == 1:
            versions[alias] = next(iter(v))


async def read_snapshot(state: State) -> Snapshot:
    """Every routing hash at one revision, as `State.snapshot` reads it, except the model
    specs: routing needs only which ids are registered, so their keys are read (HKEYS) and
    their values left None. At 1,000,000 registered models that skips about 280 MB of replies
    and a million JSON parses, most of a resync (docs/benchmarks.md, "A million models")."""
    async with state.r.pipeline(transaction=True) as p:
        p.get(k.REV).hkeys(k.MODELS).hgetall(k.ALIASES).hgetall(k.PODS).hgetall(k.PLACEMENTS).hgetall(k.PAUSED)
        rev, ids, aliases, pods, placements, paused = await p.execute()

    def parse() -> Snapshot:
        # An alias's model id is the registered id's own string object, not a copy decoded
        # again: a million aliases held a million duplicate id strings (~75 MiB).
        canon = {i: i for i in map(bytes.decode, ids)}
        get = canon.get
        return Snapshot(
            rev=int(rev or 0),
            models=dict.fromkeys(canon),  # type: ignore[arg-type]  # ids only
            aliases={a.decode(): get(m := v.decode(), m) for a, v in aliases.items()},
            pods={i.decode(): Pod.from_json(v) for i, v in pods.items()},
            placements={i.decode(): copies_from_json(v) for i, v in placements.items()},
            paused={i.decode(): v.decode() for i, v in paused.items()},
        )

    return await asyncio.to_thread(parse)


async def read_transformers(state: State) -> dict[str, r.Transformer]:
    """The transformers `meshserve up` runs (their records: meshserve/transformer.py `record`),
    read at each resync: they are written before the xDS server starts and change only with a
    restart."""
    out: dict[str, r.Transformer] = {}
    for name, raw in (await ops.transformers(state.r)).items():
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
    # An entry at or below the snapshot's revision: normal just after a resync (committed
    # before it was read), or the state's revision starting again (Redis lost its data).
    behind: bool = False


# Kinds whose objects are re-read one by one; rules are few and re-read whole.
_TARGETED = {KIND_MODEL: k.MODELS, KIND_ALIAS: k.ALIASES, KIND_POD: k.PODS, KIND_PLACEMENT: k.PLACEMENTS, KIND_PAUSED: k.PAUSED}
_RULE_KINDS = {KIND_RULE, KIND_TRANSITION}
# Reconnecting to Redis: 0.1 s doubling to 10 s, with up to 1 s of jitter so that replicas
# that lost it together do not come back in step.
RETRY_WAIT = wait_exponential(multiplier=0.1, max=10) + wait_random(0, 1)
HEALTHY_S = 10.0


def plan_batch(current_rev: int, entries: list[tuple[bytes, Change]]) -> ChangeBatch:
    """Pure. Entries at or below `current_rev` are already in the snapshot. A revision that
    skips one (a trimmed stream, a commit with no entry, a reader that fell behind) or a kind
    we don't know means something may be missing: resync from the hashes."""
    rev = current_rev
    ids: dict[str, set[str]] = {}
    behind = False
    for _, c in entries:
        if c.rev <= current_rev:
            behind = True
            continue
        if c.rev > rev + 1:
            return ChangeBatch(True, c.rev)
        rev = c.rev
        if c.kind not in _TARGETED and c.kind not in _RULE_KINDS:
            return ChangeBatch(True, rev)
        ids.setdefault(c.kind, set()).add(c.id)
    return ChangeBatch(False, rev, ids, behind)


class RedisSource:
    """Keeps routing state in memory, follows the change stream with targeted re-reads, and
    rebuilds from the hashes only at start and on a revision gap."""

    def __init__(self, settings: Settings, state: State, cache: SnapshotCache, layout: str | None = None):
        self.s, self.state, self.cache = settings, state, cache
        listeners = r.ListenerConfig(settings.host, settings.gateway_rest_port, settings.gateway_grpc_port)
        # "scoped" (default) or "matcher" (docs/design/routing.md); MESHSERVE_XDS_LAYOUT picks it.
        self.layout: Layout = gateway_layout(layout or os.environ.get("MESHSERVE_XDS_LAYOUT") or "scoped", listeners)
        # Groups built only while a client of theirs is connected (Istio, proxyless).
        self.extras: dict[str, Layout] = {}
        self._full = True  # the next publish builds every group whole (start, resync)
        self._alias_of: dict[str, str] = {}
        self._aliases_by_model: dict[str, str | set[str]] = {}  # see aliases_by_model
        # alias -> the models named after it with a placement (routing_state)
        self._versions: dict[str, str | set[str]] = {}
        self.rev = 0
        self.snap: Snapshot | None = None
        self.traffic: dict = {}
        self.transformers: dict[str, r.Transformer] = {}
        self.published: set[str] = set()
        self.sleep = asyncio.sleep  # the backoff's; a test may count the waits instead

    async def rebuild(self) -> None:
        """Full resync: read every routing hash at one revision."""
        t0 = time.perf_counter()
        snap = await read_snapshot(self.state)
        self.snap = snap
        self.traffic = await rules_store.plans(self.state, snap.aliases, set(snap.models))
        self.transformers = await read_transformers(self.state)
        self._full = True  # a resync replaces everything
        self._publish()
        self.rev = snap.rev
        M_REV.set(snap.rev)
        M_RESYNCS.inc()
        M_BUILD.observe(time.perf_counter() - t0)

    async def apply(self, entries: list[tuple[bytes, Change]]) -> None:
        """Follow a batch of change entries: re-read only what they name."""
        batch = plan_batch(self.rev, entries)
        if batch.behind and (now := await self.state.rev()) < self.rev:
            # Without this the gateway kept the old routes until the new revisions passed the
            # old ones: requests went to pods that had since unloaded their models (404).
            log.warning("xds: the state's revision went back from %d to %d (Redis restarted without its data?); resyncing", self.rev, now)
            await self.rebuild()
            return
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
        if batch.ids.keys() & (_RULE_KINDS | {KIND_ALIAS, KIND_MODEL}):
            before, self.traffic = self.traffic, await rules_store.plans(self.state, snap.aliases, set(snap.models))
            plans_moved = self.traffic != before
        if plans_moved or not self._publish_partial(batch.ids):
            self._publish()
        self.rev = batch.rev
        M_REV.set(self.rev)
        M_INCREMENTAL.inc()
        M_BUILD.observe(time.perf_counter() - t0)

    def _routing_state(self) -> r.RoutingState:
        assert self.snap is not None
        self._versions = {}
        rs = routing_state(self.snap, self.s, self._versions)
        rs.traffic = self.traffic
        rs.transformers = self.transformers
        return rs

    def _publish(self) -> None:
        """Every wanted group from the whole routing state: built whole after a resync or for a
        group just wanted, else as each layout's change (the scoped layout patches)."""
        rs = self._routing_state()
        # The alias maps let a later change find a model's names without walking all aliases.
        # rs.aliases is this publish's own copy (routing_state), kept as it is.
        self._alias_of = rs.aliases
        self._aliases_by_model = aliases_by_model(rs.aliases)
        updates: dict[str, r.Resources | r.Patch] = {}
        # The gateway first: the Istio group may share its build.
        updates[r.GATEWAY_GROUP] = self.layout.build_full(rs) if self._full else self.layout.apply_change(rs)
        for group in EXTRA_GROUPS:
            if group not in self.cache.wanted:
                continue
            layout = self.extras.get(group)
            if layout is None or self._full:
                layout = self.extras[group] = extra_layout(group, self.layout)
                updates[group] = layout.build_full(rs)
            else:
                updates[group] = layout.apply_change(rs)
        self._full = False
        self.cache.apply_many(updates)
        self.published = set(updates)

    def _publish_partial(self, ids: dict[str, set[str]]) -> bool:
        """Placement/model/alias changes only: touch just what they name, without walking
        every model. False when the change needs the whole state (pods, rules, a group just
        wanted, or a layout that cannot patch this change)."""
        if self._full or self.snap is None or ids.keys() - {KIND_PLACEMENT, KIND_MODEL, KIND_ALIAS}:
            return False
        if self.cache.wanted - self.published:
            return False
        snap = self.snap
        models = set(ids.get(KIND_PLACEMENT, ())) | set(ids.get(KIND_MODEL, ()))
        names = set(models) | set(ids.get(KIND_ALIAS, ()))
        by_model = self._aliases_by_model
        for a in ids.get(KIND_ALIAS, ()):
            old, new = self._alias_of.get(a), snap.aliases.get(a)
            if old is not None:
                _drop_alias(by_model, old, a)
                models.add(old)
            if new is not None:
                _add_alias(by_model, new, a)
                models.add(new)
                self._alias_of[a] = new
            else:
                self._alias_of.pop(a, None)
        # A copy coming or going may make a model's alias name another model on a pod, or stop
        # doing so (scoped_routes.loaded_target): the alias's scope is looked at again, with its
        # current target.
        for m in ids.get(KIND_PLACEMENT, ()):
            _note_version(self._versions, m, m in snap.placements)
        for m in list(models):
            a = alias_of_id(m)
            if a is not None and a in snap.aliases:
                names.add(a)
                models.add(snap.aliases[a])
        aliases = {a: m for m in models for a in _aliases_of(by_model, m)}
        names |= models | set(aliases)
        contested = {}
        for m in models:
            a = alias_of_id(m)
            if a is not None and isinstance(self._versions.get(a), set):
                contested[a] = holding(snap, self._versions[a])  # type: ignore[arg-type]
        loaded = {}
        for m in models:
            holders = sorted(p for p, c in snap.placements.get(m, {}).items() if c.state == CopyState.LOADED and p in snap.pods)
            if holders:
                loaded[m] = holders
        held = {p for ps in loaded.values() for p in ps}
        part = r.RoutingState(
            pods={p: r.Endpoint(snap.pods[p].host, snap.pods[p].rest_port, snap.pods[p].grpc_port, p in snap.paused) for p in held},
            loaded=loaded, aliases=aliases, registered={m for m in models if m in snap.models},
            activator=r.Endpoint(self.s.host, self.s.activator_rest_port, self.s.activator_grpc_port),
            cold_timeout_s=self.s.cold_start_timeout_seconds + 5,
            route_stats=self.s.xds_route_stats,
            resolving={p for p in held if snap.pods[p].resolves_names},
            shared_routes=self.s.xds_shared_routes,
            contested=contested,
        )
        layouts = {r.GATEWAY_GROUP: self.layout, **{g: self.extras[g] for g in self.published if g in self.extras}}
        for group, layout in layouts.items():
            # Each group's patch goes to the cache at once: a layout that answers None changed
            # nothing, and the whole-state publish that follows diffs from what each holds.
            patch = layout.apply_partial(part, models, names)
            if patch is None:
                return False  # the whole state then; the alias maps are rebuilt there too
            self.cache.apply(group, patch)
        return True

    async def run(self) -> None:
        """Sync, then follow the change stream, forever. While Redis is away the last snapshot
        keeps being served and reconnects back off exponentially with jitter (RETRY_WAIT); a
        loss after a good stretch (HEALTHY_S) starts the backoff afresh."""
        while True:
            try:
                async for attempt in AsyncRetrying(
                    wait=RETRY_WAIT, sleep=self.sleep, before_sleep=self._log_retry,
                    retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(_Lost),
                ):
                    with attempt:
                        await self._sync_and_follow()
            except _Lost as e:
                log.warning("xds: state source error (%s); serving last snapshot, reconnecting", e.__cause__)

    @staticmethod
    def _log_retry(rs: RetryCallState) -> None:
        wait = rs.next_action.sleep if rs.next_action else 0.0
        log.warning("xds: state source error (%s); serving last snapshot, retrying in %.1f s",
                    rs.outcome.exception() if rs.outcome else None, wait)

    async def _sync_and_follow(self) -> None:
        last = await self.state.last_change_id()
        await self.rebuild()
        log.info("xds: built snapshot at revision %d", self.rev)
        synced = time.monotonic()
        try:
            await self._follow(last)
        except Exception as e:
            if time.monotonic() - synced >= HEALTHY_S:
                raise _Lost() from e
            raise

    async def _follow(self, last: bytes | str) -> None:
        quiet = self.s.debounce_quiet_ms / 1000
        max_delay = self.s.debounce_max_ms / 1000
        while True:
            entries = await ops.read_changes(self.state.r, last, count=10_000, block=1000)
            if not entries:
                if self.cache.wanted - self.published and self.snap is not None:
                    self._publish()  # a client of a group not built yet
                continue
            first = time.monotonic()
            last = entries[-1][0]
            # Debounce: keep reading while changes keep coming, up to the max delay. The
            # quiet window is timed here, not by XREAD's BLOCK: Redis checks blocked
            # clients' timeouts at its `hz` tick (100 ms by default), which turned a
            # 20 ms window into ~95 ms (bench/xds_e2e_latency.py).
            while time.monotonic() - first < max_delay:
                await asyncio.sleep(min(quiet, max(0.0, max_delay - (time.monotonic() - first))))
                more = await ops.read_changes(self.state.r, last, count=10_000)
                if not more:
                    break
                entries += more
                last = entries[-1][0]
            await self.apply(entries)


def aliases_by_model(aliases: dict[str, str]) -> dict[str, str | set[str]]:
    """model -> its alias, or a set of them when it has several. A set per model was 1,000,000
    sets (~200 MiB) and 1.5 s of a resync at a million models with one alias each; built by a
    comprehension, then a pass for the models that have more than one."""
    out: dict[str, str | set[str]] = {m: a for a, m in aliases.items()}
    if len(out) != len(aliases):
        for a, m in aliases.items():
            x = out[m]
            if x.__class__ is str:
                if x != a:
                    out[m] = {x, a}
            else:
                x.add(a)  # type: ignore[union-attr]
    return out


def _aliases_of(by_model: dict[str, str | set[str]], model: str) -> tuple[str, ...] | set[str]:
    x = by_model.get(model)
    return () if x is None else (x,) if x.__class__ is str else x  # type: ignore[return-value]


def _add_alias(by_model: dict[str, str | set[str]], model: str, alias: str) -> None:
    x = by_model.get(model)
    if x is None:
        by_model[model] = alias
    elif x.__class__ is str:
        if x != alias:
            by_model[model] = {x, alias}  # type: ignore[arg-type]
    else:
        x.add(alias)  # type: ignore[union-attr]


def _drop_alias(by_model: dict[str, str | set[str]], model: str, alias: str) -> None:
    x = by_model.get(model)
    if x is None:
        return
    if x.__class__ is str:
        if x == alias:
            del by_model[model]
    else:
        x.discard(alias)  # type: ignore[union-attr]


class _Lost(Exception):
    """The state source failed after following well for HEALTHY_S: reconnect with a fresh backoff."""


def _apply_values(snap: Snapshot, kind: str, ids: list[str], vals: list[bytes | None]) -> None:
    """Write re-read hash values into the in-memory snapshot; a missing value is a delete."""
    for i, v in zip(ids, vals):
        if kind == KIND_MODEL:
            if v is None:
                snap.models.pop(i, None)
            else:
                snap.models[i] = None  # type: ignore[assignment]  # ids only (read_snapshot)
        elif kind == KIND_ALIAS:
            if v is None:
                snap.aliases.pop(i, None)
            else:
                snap.aliases[i] = v.decode()
        elif kind == KIND_POD:
            if v is None:
                snap.pods.pop(i, None)
            else:
                snap.pods[i] = Pod.from_json(v)
        elif kind == KIND_PAUSED:
            if v is None:
                snap.paused.pop(i, None)
            else:
                snap.paused[i] = v.decode()
        elif kind == KIND_PLACEMENT:
            copies = copies_from_json(v)
            if copies:
                snap.placements[i] = copies
            else:
                snap.placements.pop(i, None)
