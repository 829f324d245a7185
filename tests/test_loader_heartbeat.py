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
from meshserve.store import State, keys
from meshserve.store.messages import KIND_POD
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
async def stuck(valkey: Any, tmp_path: Path) -> AsyncIterator[tuple[Agent, StuckRuntime, State]]:
    s = Settings(data_dir=tmp_path, redis_url=valkey.url, heartbeat_seconds=PERIOD)
    state = State.from_url(valkey.url)
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


async def test_heartbeats_go_on_while_the_runtime_does_not_answer(stuck: tuple[Agent, StuckRuntime, State]) -> None:
    _, rt, state = stuck
    assert not rt.release.is_set()
    first = await state.r.zscore(keys.HEARTBEATS, "pod-0")
    await asyncio.sleep(PERIOD * 8)
    last = await state.r.zscore(keys.HEARTBEATS, "pod-0")
    assert last - first >= PERIOD * 5, (first, last)
    # And they go on after that, the runtime still stuck. Waited for rather than read at once:
    # CI's first run of this test saw the newest heartbeat 0.98 s old, the whole test process
    # having stalled (a 2-core machine, a pytest process 900 tests old) for about 1 s.
    end = time.time()
    deadline = time.monotonic() + 10
    while (await state.r.zscore(keys.HEARTBEATS, "pod-0")) <= end:
        assert time.monotonic() < deadline, "the heartbeats stopped while the runtime was stuck"
        await asyncio.sleep(PERIOD / 4)
    assert not rt.release.is_set()


async def test_a_forgotten_pod_registers_again_within_a_period(stuck: tuple[Agent, StuckRuntime, State]) -> None:
    agent, rt, state = stuck
    rt.release.set()
    events_before = await state.r.xlen(keys.EVENTS)
    # What placement's withdrawal does to the pod's registration.
    await state.commit([["HDEL", keys.PODS, "pod-0"]], [(KIND_POD, "pod-0")])
    t0 = time.monotonic()
    while not await state.r.hexists(keys.PODS, "pod-0"):
        assert time.monotonic() - t0 < PERIOD * 5, "the pod never registered again"
        await asyncio.sleep(0.01)
    assert time.monotonic() - t0 <= PERIOD * 2
    await asyncio.sleep(0.1)
    events = await state.r.xrange(keys.EVENTS)
    reg = [f for _, f in events[events_before:] if f[b"op"] == b"register"]
    assert reg, events
    assert json.loads(reg[-1][b"models"]) == ["m__isvc-1"]
    assert json.loads(reg[-1][b"sizes"]) == {"m__isvc-1": 4096}
    assert agent.metrics.reregistrations._value.get() == 1


class ServingRuntime(StuckRuntime):
    """Answers at once; `m__isvc-1` was used once, at `held[...]["last_used"]`."""

    async def stats(self) -> dict[str, Any]:
        return self.held


async def test_uses_read_while_redis_is_paused_reach_it_afterwards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Valkey stopped (SIGSTOP) across a few usage reports: each says Redis was slow, not the
    runtime (it used to blame the runtime), and the use read meanwhile is written once Redis
    answers again, although the runtime's counter no longer changes (it used to be dropped)."""
    import os
    import signal

    with devmesh.valkey() as v:
        s = Settings(data_dir=tmp_path, redis_url=v.url, heartbeat_seconds=PERIOD)
        state = State.from_url(v.url)
        rt = ServingRuntime()
        a = Agent(s, Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["sklearn"]), rt, state)
        a._runtime_up.set()
        caplog.set_level("INFO", logger="meshserve.loader")
        os.kill(v.proc.pid, signal.SIGSTOP)
        task = asyncio.create_task(a.usage_loop())
        try:
            await asyncio.sleep(PERIOD * 6)
            os.kill(v.proc.pid, signal.SIGCONT)
            t0 = time.monotonic()
            while await state.r.zscore(keys.LAST_USED, "m__isvc-1") is None:
                assert time.monotonic() - t0 < 10, "the use read while Redis was paused never reached it"
                await asyncio.sleep(0.05)
            assert await state.r.zscore(keys.LAST_USED, "m__isvc-1") == pytest.approx(rt.held["m__isvc-1"]["last_used"])
        finally:
            os.kill(v.proc.pid, signal.SIGCONT)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await state.close()
    skipped = [r.getMessage() for r in caplog.records if "usage report skipped" in r.getMessage()]
    assert skipped and all("Redis did not answer" in m for m in skipped), skipped
