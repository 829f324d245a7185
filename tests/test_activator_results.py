"""Kind: integration, real Valkey, no leader. A held cold request goes to the pod whose loader
reported the load (ms:events) without waiting for the leader to commit the copy LOADED and for
that change to come round: two hops off the cold path (issue 19 §4). The leader stays the only
writer of placements; the activator only reads the result."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from meshserve.model import Copy, CopyState, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_PLACEMENT, LoadResult
from meshserve_placement.activator import Activator


async def _loading(state: State, model: str, pod: Pod) -> None:
    await ops.register_pod(state, pod)
    await state.commit([ops.set_copies(model, {pod.id: Copy(CopyState.LOADING, 1)})], [(KIND_PLACEMENT, model)])


async def _report(state: State, result: LoadResult) -> None:
    await state.r.xadd(k.EVENTS, result.encode())  # as the loader's report_result writes it


@pytest.fixture
async def activator(state: State) -> Any:
    act = Activator(Settings(cold_start_timeout_seconds=5), state)
    watcher = asyncio.create_task(act.watch_changes())
    await asyncio.sleep(0.1)  # its first XREAD is out ("$": only what comes after)
    try:
        yield act
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_a_held_request_goes_to_the_pod_that_reported_the_load(state: State, activator: Activator) -> None:
    pod = Pod("p0", "127.0.0.1", 1, 2, 1 << 30)
    await _loading(state, "m", pod)
    activator._requested["m"] = time.time()  # asked for already: the request only waits
    held = asyncio.create_task(activator.ensure_loaded("m"))
    await asyncio.sleep(0.2)
    assert not held.done()  # LOADING: still held
    t0 = time.monotonic()
    await _report(state, LoadResult("p0", "m", True, 123))
    got = await asyncio.wait_for(held, 2)
    assert got.id == "p0"
    assert time.monotonic() - t0 < 0.5  # the result woke it (the copy is still LOADING in Redis)
    assert (await state.copies("m"))["p0"].state == CopyState.LOADING
    assert "m" not in activator._loaded_on  # its bookkeeping went with the hold


async def test_a_failed_load_or_another_models_result_does_not_release_it(state: State, activator: Activator) -> None:
    pod = Pod("p0", "127.0.0.1", 1, 2, 1 << 30)
    await _loading(state, "m", pod)
    activator._requested["m"] = time.time()
    held = asyncio.create_task(activator.ensure_loaded("m"))
    await asyncio.sleep(0.1)
    await _report(state, LoadResult("p0", "m", False, 0, "out of memory"))
    await _report(state, LoadResult("p0", "other", True, 1))
    await asyncio.sleep(0.3)
    assert not held.done()
    assert activator._loaded_on == {}  # a result for a model nobody waits for is not kept
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
