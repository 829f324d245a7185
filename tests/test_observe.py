"""Kind: unit and integration (a real Valkey, from devmesh; fixtures in conftest.py). The state
metrics keep their counts per change: a tally updated model by model agrees with one counted
from scratch, and the collector re-reads only the placements ms:changes names, reading the whole
hash again only when a revision is missing."""

from __future__ import annotations

import random

from meshserve.model import Copy, CopyState, Pod
from meshserve.observe import MeshStateCollector, PlacementTally
from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.messages import KIND_PLACEMENT
from meshserve.store.state import State

STATES = (CopyState.LOADED, CopyState.LOADING, CopyState.FAILED, CopyState.UNLOADING)


def reference(copies: dict[str, dict[str, Copy]], lu: dict[str, float]) -> dict[str, object]:
    """The counts as the state metrics computed them over every placement, each refresh."""
    used: dict[str, int] = {}
    count: dict[str, int] = {}
    oldest: dict[str, float] = {}
    loaded = loading = failing = 0
    for m, cs in copies.items():
        live = any(c.state == CopyState.LOADED for c in cs.values())
        loaded += live
        loading += any(c.state == CopyState.LOADING for c in cs.values())
        failing += bool(cs) and not live and any(c.state == CopyState.FAILED for c in cs.values())
        for p, c in cs.items():
            if c.state == CopyState.FAILED:
                continue
            used[p] = used.get(p, 0) + c.size
            count[p] = count.get(p, 0) + 1
            if c.state == CopyState.LOADED:
                oldest[p] = min(oldest.get(p, float("inf")), lu.get(m, c.since))
    return {"loaded": loaded, "loading": loading, "failing": failing,
            "used": {p: v for p, v in used.items() if v}, "count": {p: v for p, v in count.items() if v}, "oldest": oldest}


def counted(t: PlacementTally, pods: list[str]) -> dict[str, object]:
    oldest = {p: t.oldest(p) for p in pods}
    return {"loaded": len(t.live), "loading": t.loading, "failing": t.failing,
            "used": {p: v for p, v in t.used.items() if v}, "count": {p: v for p, v in t.count.items() if v},
            "oldest": {p: v for p, v in oldest.items() if v is not None}}


def test_a_tally_kept_per_change_agrees_with_one_counted_from_scratch() -> None:
    rnd = random.Random(7)
    pods = ["pod-0", "pod-1", "pod-2"]
    models = [f"m{i}" for i in range(60)]
    t = PlacementTally()
    truth: dict[str, dict[str, Copy]] = {}
    lu: dict[str, float] = {}
    for step in range(3000):
        m = rnd.choice(models)
        if rnd.random() < 0.3:
            when = rnd.uniform(0, 1000)
            t.touch(m, when)
            lu[m] = max(lu.get(m, float("-inf")), when)  # ZADD GT: only forward
        else:
            cs = {p: Copy(rnd.choice(STATES), rnd.randint(1, 100), rnd.uniform(0, 1000))
                  for p in pods if rnd.random() < 0.5}
            t.set(m, cs)
            if cs:
                truth[m] = cs
            else:
                truth.pop(m, None)
        if step % 100 == 0:
            assert counted(t, pods) == reference(truth, lu)
    assert counted(t, pods) == reference(truth, lu)
    # Stale heap entries are dropped, so the heaps stay near the copies they index.
    assert all(len(h) <= 2 * t.count.get(p, 0) + 1024 for p, h in t._heaps.items())


def values(col: MeshStateCollector) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, tuple(sorted(s.labels.values()))): s.value for f in col.collect() for s in f.samples}


async def test_the_collector_reads_only_what_changed_and_everything_after_a_gap(state: State) -> None:
    await store_ops.register_pod(state, Pod("pod-0", "127.0.0.1", 1, 2, 1000, ["sklearn"]))
    await state.commit([store_ops.set_copies("a", {"pod-0": Copy(CopyState.LOADED, 10, 100.0)})], [(KIND_PLACEMENT, "a")])
    col = MeshStateCollector(state)
    await col.refresh()
    v = values(col)
    assert col.full_reads == 1 and v[("meshserve_pod_used_bytes", ("pod-0",))] == 10 and v[("meshserve_models_loaded", ())] == 1
    assert v[("meshserve_model_copies", ("a", "loaded", "pod-0"))] == 1

    # Followed from ms:changes: the new placement counts, the hash is not read whole.
    await state.commit([store_ops.set_copies("b", {"pod-0": Copy(CopyState.LOADING, 5, 200.0)}),
                        store_ops.set_copies("a", {"pod-0": Copy(CopyState.FAILED, 10, 150.0)})],
                       [(KIND_PLACEMENT, "b"), (KIND_PLACEMENT, "a")])
    await col.refresh()
    v = values(col)
    assert col.full_reads == 1
    assert v[("meshserve_pod_used_bytes", ("pod-0",))] == 5 and v[("meshserve_models_loading", ())] == 1
    assert v[("meshserve_models_failing", ())] == 1 and v[("meshserve_models_loaded", ())] == 0
    assert ("meshserve_model_copies", ("a", "failed", "pod-0")) not in v

    # A last use moves the LRU age; the next refresh picks it up from ms:lastused.
    await state.commit([store_ops.set_copies("b", {"pod-0": Copy(CopyState.LOADED, 5, 200.0)})], [(KIND_PLACEMENT, "b")])
    await col.refresh()
    assert col.tally.oldest("pod-0") == 200.0
    await store_ops.mark_used(state.r, {"b": 300.0})
    await col.refresh()
    assert col.tally.oldest("pod-0") == 300.0 and col.full_reads == 1

    # A revision with no entry (what a trimmed stream looks like): everything is read again.
    await state.r.incr(keys.REV)
    await state.r.hset(keys.PLACEMENTS, "c", '{"pod-0":{"state":"loaded","size":7,"since":1.0}}')
    await state.commit([store_ops.set_copies("d", {"pod-0": Copy(CopyState.LOADED, 1, 400.0)})], [(KIND_PLACEMENT, "d")])
    await col.refresh()
    v = values(col)
    assert col.full_reads == 2 and v[("meshserve_pod_used_bytes", ("pod-0",))] == 13 and v[("meshserve_models_loaded", ())] == 3


async def test_the_collector_counts_afresh_when_redis_lost_its_data(state: State) -> None:
    """Redis restarted without its data: the revision starts again from 0. Before, the entries
    at revisions below the collector's were taken as already counted, and the metrics kept the
    old placements."""
    await store_ops.register_pod(state, Pod("pod-0", "127.0.0.1", 1, 2, 1000, ["sklearn"]))
    for m in "abc":
        await state.commit([store_ops.set_copies(m, {"pod-0": Copy(CopyState.LOADED, 10, 100.0)})], [(KIND_PLACEMENT, m)])
    col = MeshStateCollector(state)
    await col.refresh()
    assert values(col)[("meshserve_models_loaded", ())] == 3
    await state.r.flushall()
    await store_ops.register_pod(state, Pod("pod-0", "127.0.0.1", 1, 2, 1000, ["sklearn"]))
    await state.commit([store_ops.set_copies("z", {"pod-0": Copy(CopyState.LOADED, 4, 500.0)})], [(KIND_PLACEMENT, "z")])
    await col.refresh()
    v = values(col)
    assert col.full_reads == 2
    assert v[("meshserve_models_loaded", ())] == 1 and v[("meshserve_pod_used_bytes", ("pod-0",))] == 4
