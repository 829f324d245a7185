"""Kind: real server (Valkey on 127.0.0.1, stopped at the end); the placement leader and the
activator in one event loop, as `python -m meshserve_placement` runs them. While this process
leads, a cold request's load is asked for in memory (Scheduler.ask_local), not through
ms:loadreq; a process that does not lead asks through the stream, where the leader reads it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterator

import pytest

from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import LoadRequest
from meshserve_placement.activator import Activator
from meshserve_placement.leader import Scheduler
from meshserve_placement.tuning import Tuning
from meshserve_testing import devmesh

MB = 1 << 20


@pytest.fixture(scope="module")
def valkey() -> Iterator[Any]:
    with devmesh.valkey() as v:
        yield v


@pytest.fixture
async def state(valkey: Any) -> AsyncIterator[State]:
    s = State.from_url(valkey.url)
    await s.r.flushdb()
    # A pod of the built-in runtime (it holds a request sent ahead of its load), its heartbeat
    # fresh for the test's length, and 20 models.
    await ops.register_pod(s, Pod("p0", "127.0.0.1", 1, 2, 1000 * MB, ["sklearn"], runtime="builtin", awaits_loads=True))
    await s.r.zadd(k.HEARTBEATS, {"p0": time.time() + 3600})
    await s.register_models([ModelSpec(id=f"m{i}", alias=f"m{i}", format="sklearn", size_hint=MB, storage={"path": "x"})
                             for i in range(20)])
    try:
        yield s
    finally:
        await s.close()


async def _leading(sched: Scheduler) -> asyncio.Task[None]:
    task = asyncio.create_task(sched.run())
    await asyncio.wait_for(sched.leading.wait(), 10)
    return task


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_leader_in_process_takes_the_ask_without_the_stream(state: State) -> None:
    s = Settings(redis_url="unused", lease_seconds=5.0, cold_start_timeout_seconds=10)
    sched = Scheduler(s, state, Tuning(maintain_seconds=60, rate_poll_seconds=60))
    lead = await _leading(sched)
    act = Activator(s, state, ask_local=sched.ask_local)
    watch = asyncio.create_task(act.watch_changes())
    try:
        await asyncio.sleep(0.1)  # the watcher's first read is out
        # Twenty cold requests at once: each placed (the copy loading on p0, where the request
        # goes ahead of its load), none of their asks written to ms:loadreq.
        got = await asyncio.wait_for(asyncio.gather(*(act._hold(f"m{i}", ahead_ok=True) for i in range(20))), 10)
        assert all(pod.id == "p0" and loading for pod, loading in got)
        for i in range(20):
            assert (await state.copies(f"m{i}"))["p0"].state == CopyState.LOADING
        assert await state.r.xlen(k.LOAD_REQUESTS) == 0
        # Leadership lost: the activator asks through the stream again.
        await _stop(lead)
        assert not sched.ask_local(LoadRequest("m0"))
    finally:
        await _stop(watch, lead)


async def test_an_activator_whose_process_does_not_lead_asks_through_the_stream(state: State) -> None:
    s = Settings(redis_url="unused", lease_seconds=5.0, cold_start_timeout_seconds=10)
    leader = Scheduler(s, state, Tuning(maintain_seconds=60, rate_poll_seconds=60))
    lead = await _leading(leader)
    standby = Scheduler(s, state, Tuning(maintain_seconds=60, rate_poll_seconds=60))  # never leads: the lease is taken
    act = Activator(s, state, ask_local=standby.ask_local)
    watch = asyncio.create_task(act.watch_changes())
    try:
        await asyncio.sleep(0.1)
        pod, loading = await asyncio.wait_for(act._hold("m3", ahead_ok=True), 10)
        assert (pod.id, loading) == ("p0", True)
        entries = await state.r.xrange(k.LOAD_REQUESTS)
        assert [f[b"model"] for _, f in entries] == [b"m3"] and b"traceparent" in entries[0][1]
    finally:
        await _stop(watch, lead)
