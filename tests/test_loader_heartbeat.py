"""Kind: real Valkey, in-memory runtime stand-in. The loader's heartbeat never waits on its
runtime, and a pod that placement has forgotten registers again by itself within a heartbeat
period, telling placement what it still holds and at what size (issue 18 §1)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import Pod
from meshserve.settings import Settings
from meshserve_loader.agent import Agent

PERIOD = 0.2


class StuckRuntime:
    """A runtime busy with one long inference on its event loop, as the built-in one was: its
    stats call answers only when `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = {"m__isvc-1": {"requests": 3, "last_used": time.time(), "size": 4096}}

    async def wait_ready(self, timeout: float = 60.0) -> None:
        return None

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        raise RuntimeError("not used")

    async def unload(self, model_id: str) -> None:
        return None

    async def stats(self) -> dict[str, Any]:
        await self.release.wait()
        return self.held


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


@pytest.fixture
async def stuck(valkey: Any, tmp_path: Path) -> AsyncIterator[tuple[Agent, StuckRuntime, st.State]]:
    s = Settings(data_dir=tmp_path, redis_url=valkey.url, heartbeat_seconds=PERIOD)
    state = st.State.from_url(valkey.url)
    await state.r.flushdb()
    rt = StuckRuntime()
    a = Agent(s, Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["sklearn"]), rt, state)
    rt.release.set()
    await a.register()
    rt.release.clear()
    tasks = [asyncio.create_task(a.heartbeat_loop()), asyncio.create_task(a.usage_loop())]
    try:
        yield a, rt, state
    finally:
        rt.release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.close()


async def test_heartbeats_go_on_while_the_runtime_does_not_answer(stuck: tuple[Agent, StuckRuntime, st.State]) -> None:
    _, rt, state = stuck
    assert not rt.release.is_set()
    first = await state.r.zscore(st.HEARTBEATS, "pod-0")
    await asyncio.sleep(PERIOD * 8)
    last = await state.r.zscore(st.HEARTBEATS, "pod-0")
    assert last - first >= PERIOD * 5, (first, last)
    assert time.time() - last < PERIOD * 2


async def test_a_forgotten_pod_registers_again_within_a_period(stuck: tuple[Agent, StuckRuntime, st.State]) -> None:
    agent, rt, state = stuck
    rt.release.set()
    events_before = await state.r.xlen(st.EVENTS)
    # What placement's withdrawal does to the pod's registration.
    await state.commit([["HDEL", st.PODS, "pod-0"]], [(st.KIND_POD, "pod-0")])
    t0 = time.monotonic()
    while not await state.r.hexists(st.PODS, "pod-0"):
        assert time.monotonic() - t0 < PERIOD * 5, "the pod never registered again"
        await asyncio.sleep(0.01)
    assert time.monotonic() - t0 <= PERIOD * 2
    await asyncio.sleep(0.1)
    events = await state.r.xrange(st.EVENTS)
    reg = [f for _, f in events[events_before:] if f[b"op"] == b"register"]
    assert reg, events
    assert json.loads(reg[-1][b"models"]) == ["m__isvc-1"]
    assert json.loads(reg[-1][b"sizes"]) == {"m__isvc-1": 4096}
    assert agent.metrics.reregistrations._value.get() == 1
