"""Kind: unit test of the placement leader over the in-memory store fake (tests/placement_fakes.py).

Issue 19 §3-4, a miss into a full cache: the load that evicts waited for its victim's unload,
which waits for the gateways to withdraw the route (about 50 ms of the 81 ms cold start into
full caches, against Ray's 19 ms). ModelMesh keeps part of each pod's capacity for copies being
unloaded (its unload buffer, 1% to 10% of the capacity: ModelMesh.java `unloadsReservedSizeUnits`,
ModelCacheUnloadBufManager.java) and books models against the rest, so a load that evicts
starts at once while the pod never holds more than its capacity. Placement does the same
(view.unload_reserve)."""

from __future__ import annotations

import asyncio

from meshserve.model import CopyState
from meshserve.store.messages import LoadRequest, LoadResult
from meshserve_placement.view import unload_reserve
from meshserve_placement.sizes import UNKNOWN_MODEL_BYTES
from tests.test_placement_findings import MB, _handle, _leader


def test_the_reserve_is_modelmeshs_unload_buffer() -> None:
    # Two loading slots: one default-sized model, halved, within 1% and 10% of the capacity.
    assert unload_reserve(10 * MB, 2) == MB  # 10% cap
    assert unload_reserve(4 << 30, 2) == UNKNOWN_MODEL_BYTES  # 2 slots x 64 MiB / 2
    assert unload_reserve(4 << 30, 8) == 2 * UNKNOWN_MODEL_BYTES  # 8 slots x 64 MiB / 4
    assert unload_reserve(8 << 30, 2) == (8 << 30) // 100  # the 1% floor
    assert unload_reserve(10 * MB, 2, fraction=0.0) == 0


async def _fill_then_miss(reserve: float) -> tuple[int, int, bool, int]:
    """A 10 MB pod filled with 1 MB models, then one more: (models that fit, bytes the pod holds
    at most, whether the new load was ordered at once, its victims)."""
    models = {f"m{i}": MB for i in range(11)} | {"new": MB}
    r, sched = await _leader({"p0": 10 * MB}, models, unload_reserve_fraction=reserve)
    fitted = 0
    for i in range(11):
        m = f"m{i}"
        await _handle(sched, sched._on_load_request(LoadRequest(m).encode()))
        if sched.view.copies.get(m, {}).get("p0") is None or any(c.state == CopyState.UNLOADING for cs in sched.view.copies.values() for c in cs.values()):
            break
        await _handle(sched, sched._on_event(LoadResult("p0", m, True, MB).encode()))
        await asyncio.sleep(0)
        fitted += 1
        if fitted == 10 or sched.view.used("p0") + MB > sched.view.pods["p0"].capacity:
            break
    sched.view.in_flight.clear()  # all idle
    await _handle(sched, sched._on_load_request(LoadRequest("new").encode()))
    d = sched.last_decisions["new"]
    held = sched.view.used("p0") - sched.view.queued_bytes("p0") + sched.view.unloading("p0")
    ordered = sched.view.copies["new"]["p0"].state == CopyState.LOADING and sched.view.sent("p0") == 1
    return fitted, held, ordered, len(d.evict)


async def test_a_load_that_evicts_starts_while_its_victim_unloads_and_the_pod_stays_within_its_capacity() -> None:
    fitted, held, ordered, evicted = await _fill_then_miss(-1.0)
    assert (fitted, evicted) == (9, 1)  # 9 MB booked: 1 MB kept for unloads
    assert ordered, "the load started during its victim's unload"
    assert held <= 10 * MB
    # Without a reserve every byte is booked, and the load waits for the unload's confirmation.
    fitted, held, ordered, evicted = await _fill_then_miss(0.0)
    assert (fitted, evicted) == (10, 1)
    assert not ordered and held <= 10 * MB
