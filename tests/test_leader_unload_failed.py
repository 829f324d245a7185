"""Kind: real Valkey, the real placement leader in-process, a stand-in loader speaking the real
order/event protocol. An unload the pod reports failed keeps its copy UNLOADING (its memory
still booked), so the load queued behind that eviction waits instead of pushing the pod over its
capacity, and the leader orders the unload again (issue 15: it used to drop the copy as if it
were gone and dispatch the load at once)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import ModelSpec, Pod, copies_from_json
from meshserve.settings import Settings
from meshserve_placement import maintain as maintain_mod
from meshserve_placement.scheduler import Scheduler
from meshserve_placement.tuning import Tuning

MB = 1 << 20


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


class Loader:
    """Carries out load orders at once; fails the first `fail_unloads` unloads."""

    def __init__(self, state: st.State, pod: str, fail_unloads: int):
        self.state, self.pod, self.fail = state, pod, fail_unloads
        self.orders: list[tuple[str, str, float]] = []

    async def run(self) -> None:
        last = "0"
        while True:
            resp = await self.state.r.xread({st.orders_key(self.pod): last}, block=200)
            for _, entries in resp or []:
                for eid, f in entries:
                    last = eid
                    op, model = f[b"op"].decode(), f[b"model"].decode()
                    self.orders.append((op, model, time.monotonic()))
                    ok = 1
                    if op == "unload" and self.fail > 0:
                        self.fail -= 1
                        ok = 0
                    ev = {"pod": self.pod, "model": model, "op": op, "ok": str(ok), "size": str(60 * MB) if op == "load" else "0",
                          "reason": "" if ok else "the runtime refused the unload"}
                    await self.state.r.xadd(st.EVENTS, ev)


@pytest.fixture
async def leader(valkey: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[st.State, Loader]]:
    monkeypatch.setattr(maintain_mod, "UNLOAD_RETRY_SECONDS", 1.0)
    state = st.State.from_url(valkey.url)
    await state.r.flushdb()
    s = Settings(redis_url=valkey.url, heartbeat_seconds=0.5, lease_seconds=1.0)
    pod = Pod("pod-0", "127.0.0.1", 1, 2, 100 * MB, ["sklearn"], max_loading=1)
    await state.r.zadd(st.HEARTBEATS, {pod.id: time.time() + 3600})  # alive throughout
    await state.commit([["HSET", st.PODS, pod.id, pod.to_json()]], [(st.KIND_POD, pod.id)])
    await state.register_models([ModelSpec(id=m, alias=m, format="sklearn", size_hint=60 * MB, storage={"path": "x"}) for m in ("a", "b")])
    loader = Loader(state, pod.id, fail_unloads=1)
    sched = Scheduler(s, state, Tuning(busy_window_seconds=0.01, maintain_seconds=0.2, rate_poll_seconds=60))
    tasks = [asyncio.create_task(sched.run()), asyncio.create_task(loader.run())]
    try:
        await asyncio.wait_for(sched.leading.wait(), 10)
        yield state, loader
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.close()


async def _copies(state: st.State, model: str) -> dict[str, str]:
    raw = await state.r.hget(st.PLACEMENTS, model)
    return {p: c.state for p, c in copies_from_json(raw).items()} if raw else {}


async def test_a_failed_unload_keeps_the_memory_booked_and_is_ordered_again(leader: tuple[st.State, Loader]) -> None:
    state, loader = leader
    await state.r.xadd(st.LOAD_REQUESTS, st.load_request("a"))
    await _until(lambda: _loaded(state, "a"), 10)
    await asyncio.sleep(0.3)  # a's busy window passes
    await state.r.xadd(st.LOAD_REQUESTS, st.load_request("b"))  # 60 + 60 MB on 100 MB: a is evicted
    await _until(lambda: _has(loader, "unload", "a"), 10)
    await asyncio.sleep(0.5)
    assert (await _copies(state, "a")).get("pod-0") == "unloading", await _copies(state, "a")
    assert not _has_now(loader, "load", "b"), f"b's load went out while a is still held: {loader.orders}"
    await _until(lambda: _loaded(state, "b"), 10)
    ops = [(op, m) for op, m, _ in loader.orders]
    assert ops == [("load", "a"), ("unload", "a"), ("unload", "a"), ("load", "b")], ops
    assert await _copies(state, "a") == {}


async def _loaded(state: st.State, model: str) -> bool:
    return (await _copies(state, model)).get("pod-0") == "loaded"


async def _has(loader: Loader, op: str, model: str) -> bool:
    return _has_now(loader, op, model)


def _has_now(loader: Loader, op: str, model: str) -> bool:
    return any(o == op and m == model for o, m, _ in loader.orders)


async def _until(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
