"""Kind: real server. The placement leader's batched stream handling against a real Valkey on
127.0.0.1 (stopped at the end): a batch's acknowledgements go in its commit (the in-memory fake
took stream ids that Valkey refuses, and every batch fell back to one entry at a time)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator

import pytest

from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_POD, LoadRequest
from meshserve_placement.leader import GROUP, Scheduler
from meshserve_placement.tuning import Tuning
from meshserve_testing import devmesh

MB = 1 << 20


@pytest.fixture(scope="module")
def valkey() -> Iterator[Any]:
    with devmesh.valkey() as v:
        yield v


async def test_a_batch_of_requests_is_committed_and_acknowledged_in_one_go(valkey: Any) -> None:
    state = State.from_url(valkey.url)
    try:
        await state.r.flushdb()
        await state.r.zadd(k.HEARTBEATS, {"p0": time.time() + 3600})
        await state.commit([ops.set_pod(Pod("p0", "127.0.0.1", 1, 2, 1000 * MB, ["sklearn"]))], [(KIND_POD, "p0")])
        models = [f"m{i}" for i in range(20)]
        await state.register_models([ModelSpec(id=m, alias=m, format="sklearn", size_hint=MB, storage={"path": "x"}) for m in models])
        sched = Scheduler(Settings(redis_url=valkey.url, lease_seconds=5.0), state, Tuning())
        await state.r.set(k.LEASE, sched.id)
        await sched._reload()
        await ops.ensure_group(state.r, k.LOAD_REQUESTS, GROUP)
        rebuilds = 0
        real = sched._rebuild

        async def counted() -> None:
            nonlocal rebuilds
            rebuilds += 1
            await real()

        sched._rebuild = counted  # type: ignore[method-assign]
        task = asyncio.create_task(sched._consume(k.LOAD_REQUESTS, sched._on_load_request))
        try:
            # Each model asked for twice, in two batches: the second changes no routing (the
            # loads are under way), so it is a write without a revision, acknowledgements and all.
            for n in (20, 40):
                async with state.r.pipeline(transaction=False) as p:
                    for m in models:
                        ops.queue_request(p, LoadRequest(m))
                    await p.execute()
                for _ in range(500):
                    info = (await state.r.xinfo_groups(k.LOAD_REQUESTS))[0]
                    if info["entries-read"] == n and info["pending"] == 0:
                        break
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert rebuilds == 0, "the batch failed and fell back to one entry at a time"
        assert (await state.r.xpending(k.LOAD_REQUESTS, GROUP))["pending"] == 0
        assert all(cs["p0"].state == CopyState.LOADING for cs in sched.view.copies.values())
        assert len(await state.r.hgetall(k.PLACEMENTS)) == 20
    finally:
        await state.close()
