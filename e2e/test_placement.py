"""Issue 4: the placement leader's cache behaviour against a real Valkey.

Kind: e2e/state. Real Valkey (devmesh.valkey()), the real Scheduler and Activator in this
process, and fake loader agents that speak the real protocol (orders on ms:orders:<pod>,
results on ms:events, counters on a real HTTP /v2/meshserve/stats), so each behaviour is
checked in a few seconds without runtimes or Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import pytest
from aiohttp import web

from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve.store.messages import KIND_POD
from meshserve.store.state import runtime_json
from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve_placement.activator import Activator, LoadFailed
from meshserve_placement.leader import Scheduler
from meshserve_placement.tuning import Tuning

pytestmark = pytest.mark.e2e
MB = 1 << 20


@dataclass
class FakePod:
    """A loader agent and its runtime's counters, as far as placement can tell."""

    pod: Pod
    state: State
    load_seconds: float = 0.05
    unload_seconds: float = 0.0  # the loader's unload grace, as far as placement can tell
    fail: set[str] = field(default_factory=set)
    orders: list[tuple[str, str]] = field(default_factory=list)
    held: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {requests, last_used}

    async def run(self) -> None:
        r = self.state.r
        await self.state.commit([["HSET", keys.PODS, self.pod.id, self.pod.to_json()]], [(KIND_POD, self.pod.id)])
        last = "0"
        tasks: set[asyncio.Task[None]] = set()
        while True:
            await r.zadd(keys.HEARTBEATS, {self.pod.id: time.time()})
            resp = await r.xread({keys.orders_key(self.pod.id): last}, block=100, count=16)
            for _, entries in resp or []:
                for eid, f in entries:
                    last = eid
                    op, model = f[b"op"].decode(), f[b"model"].decode()
                    self.orders.append((op, model))
                    size = ModelSpec.from_json(f[b"spec"]).size_hint if b"spec" in f else 0
                    t = asyncio.create_task(self._do(op, model, size))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

    async def _do(self, op: str, model: str, size: int) -> None:
        ok, reason = 1, ""
        if op == "load":
            await asyncio.sleep(self.load_seconds)
            if model in self.fail:
                ok, reason = 0, "simulated: corrupt model file"
            else:
                self.held[model] = {"requests": 0, "last_used": 0.0, "size": size}
        else:
            await asyncio.sleep(self.unload_seconds)
            self.held.pop(model, None)
        await self.state.r.xadd(keys.EVENTS, {"pod": self.pod.id, "model": model, "op": op, "ok": str(ok), "size": str(size if ok else 0), "reason": reason})

    def use(self, model: str, n: int = 1) -> None:
        s = self.held[model]
        s["requests"] += n
        s["last_used"] = time.time()


@contextlib.asynccontextmanager
async def cluster(url: str, pods: int = 2, capacity: int = 100 * MB, max_loading: int = 2, **tuning: float) -> AsyncIterator[tuple[Scheduler, list[FakePod], State]]:
    state = State.from_url(url)
    s = Settings(redis_url=url, heartbeat_seconds=0.5, lease_seconds=1.0, cold_start_timeout_seconds=5.0)
    fakes: list[FakePod] = []
    runners: list[web.AppRunner] = []
    for i in range(pods):
        held: dict[str, dict[str, float]] = {}
        app = web.Application()

        async def stats(_: web.Request, held: dict[str, dict[str, float]] = held) -> web.Response:
            return web.json_response(held)

        app.router.add_get("/v2/meshserve/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()  # the kernel's port, read back
        port = runner.addresses[0][1]
        fakes.append(FakePod(Pod(f"pod-{i}", "127.0.0.1", port, 0, capacity, ["sklearn"], max_loading=max_loading), state, held=held))
        runners.append(runner)
    tasks = [asyncio.create_task(fp.run()) for fp in fakes]
    await asyncio.sleep(0.2)
    sched = Scheduler(s, state, Tuning(**{"maintain_seconds": 0.2, "rate_poll_seconds": 0.3, **tuning}))
    tasks.append(asyncio.create_task(sched.run()))
    try:
        await asyncio.wait_for(sched.leading.wait(), 5)
        yield sched, fakes, state
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        await state.close()


def spec(name: str, size: int = 10 * MB, **kw: object) -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0000000000", alias=name, format="sklearn", storage={}, size_hint=size, **kw)  # type: ignore[arg-type]


async def until(pred, timeout: float = 8.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not true within {timeout}s")


def states(copies: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {p: c.state for p, c in copies.items()}


@pytest.fixture
def valkey() -> Iterator[devmesh.Valkey]:
    with devmesh.valkey() as v:
        yield v


async def test_many_requests_one_load_and_waiting_request_first(valkey: devmesh.Valkey) -> None:
    """One pod with one loading slot: background loads (minCopies) queue behind each other, a
    load with a request waiting jumps the queue, and 20 concurrent requests make one load."""
    async with cluster(valkey.url, pods=1, capacity=1000 * MB, max_loading=1) as (sched, (pod,), state):
        pod.load_seconds = 0.4
        bg = [spec(f"bg{i}", min_copies=1) for i in range(3)]
        hot = spec("hot")
        await state.register_models(bg + [hot])
        await until(lambda: _true(len([o for o in pod.orders if o[0] == "load"]) >= 1), what="first background load")
        act = Activator(sched.s, state)
        watcher = asyncio.create_task(act.watch_changes())
        try:
            got = await asyncio.gather(*(act.ensure_loaded(hot.id) for _ in range(20)))
        finally:
            watcher.cancel()
        assert {p.id for p in got} == {"pod-0"}
        await until(lambda: _true(len([o for o in pod.orders if o[0] == "load"]) == 4), what="all loads")
        loads = [m for op, m in pod.orders if op == "load"]
        assert loads.count(hot.id) == 1, loads
        assert loads.index(hot.id) == 1, f"the waiting load should go right after the one in progress: {loads}"


async def _true(v: bool) -> bool:
    return v


async def test_failed_load_retried_elsewhere_with_exclusion(valkey: devmesh.Valkey) -> None:
    async with cluster(valkey.url, pods=2) as (sched, pods, state):
        m = spec("flaky")
        await state.register_models([m])
        # Make pod-0 the obvious first choice (more free space), so the retry must go elsewhere.
        filler = spec("filler", 50 * MB)
        await state.register_models([filler])
        act = Activator(sched.s, state)
        await state.r.xadd(keys.LOAD_REQUESTS, {"model": filler.id})
        await until(lambda: _loaded(state, filler.id), what="filler loaded")
        where = next(iter((await state.copies(filler.id))))
        bad, good = (pods[0], pods[1]) if where == "pod-1" else (pods[1], pods[0])
        bad.fail, good.fail = {m.id}, set()
        watcher = asyncio.create_task(act.watch_changes())
        try:
            got = await act.ensure_loaded(m.id)
        finally:
            watcher.cancel()
        assert got.id == good.pod.id
        copies = await state.copies(m.id)
        assert copies[bad.pod.id].state == CopyState.FAILED and "corrupt" in copies[bad.pod.id].reason
        assert await state.r.hget(keys.EXCLUDED, f"{m.id}|{bad.pod.id}")
        decision = json.loads(await state.r.hget(keys.DECISIONS, m.id))
        assert decision["pod"] == good.pod.id and "retry" in decision["why"]
        # `meshserve explain` tells the same story, by alias, in text and JSON.
        text = await _cli(valkey.url, "explain", "flaky")
        assert f"loaded on {good.pod.id}" in text and "retry after a failed load" in text
        assert f"{bad.pod.id}: not-excluded: rejected: a load failed here" in text
        doc = json.loads(await _cli(valkey.url, "explain", "flaky", "--json"))
        assert doc["model"] == m.id and bad.pod.id in doc["excluded_pods"]
        assert doc["copies"][bad.pod.id]["reason"] == "simulated: corrupt model file"
        await state.register_models([spec("never")])
        assert "nobody has requested it yet" in await _cli(valkey.url, "explain", "never")
        assert "no InferenceService or model is registered" in await _cli(valkey.url, "explain", "nosuch")


async def _cli(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve.cli", *args, env={**os.environ, "MESHSERVE_REDIS_URL": url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


async def _loaded(state: State, model: str) -> bool:
    return any(c.state == CopyState.LOADED for c in (await state.copies(model)).values())


async def _loading(state: State, model: str) -> bool:
    return any(c.state == CopyState.LOADING for c in (await state.copies(model)).values())


async def test_a_request_waits_for_room_and_only_a_model_that_never_fits_gets_503(valkey: devmesh.Valkey) -> None:
    """Issue 19: the only pod is full of a model with requests in flight: a cold request evicts
    it as a last resort and is served (no wait, no 503). When the room is held by a load still
    under way, the request waits for it (no 503) and is served once the load lands; it fails
    only at the cold-start timeout. A model bigger than the pod gets a 503 at once."""
    async with cluster(valkey.url, pods=1, capacity=100 * MB) as (sched, (pod,), state):
        busy, cold, huge = spec("busy", 80 * MB), spec("cold", 80 * MB), spec("huge", 120 * MB)
        slow, late = spec("slow", 80 * MB), spec("late", 80 * MB)
        await state.register_models([busy, cold, huge, slow, late])
        await state.r.xadd(keys.LOAD_REQUESTS, {"model": busy.id})
        await until(lambda: _loaded(state, busy.id), what="busy loaded")
        pod.use(busy.id)
        await state.touch([busy.id])
        act = Activator(sched.s, state)
        watcher = asyncio.create_task(act.watch_changes())
        await asyncio.sleep(0.5)  # the leader sees the use
        try:
            with pytest.raises(LoadFailed) as e:
                await act.ensure_loaded(huge.id)
            assert e.value.status == 503 and "no runtime pod can hold it" in str(e.value)
            assert "more than the pod's whole capacity" in json.loads(await state.r.hget(keys.DECISIONS, huge.id))["reason"]
            # Busy, but the only room there is: evicted as a last resort, the request served.
            keep_busy = asyncio.create_task(_keep_using(pod, state, busy.id, 2.0))
            got = await asyncio.wait_for(act.ensure_loaded(cold.id), 5)
            await keep_busy
            assert got.id == "pod-0" and ("unload", busy.id) in pod.orders
            d = json.loads(await state.r.hget(keys.DECISIONS, cold.id))
            assert d["evict"] == [busy.id] and d["evict_busy"] == [busy.id], d
            # Now the room is held by a load under way (3 s): a request that would pass the
            # cold-start timeout waiting gets its 503 then; a patient one waits and is served.
            pod.load_seconds = 3.0
            await state.r.xadd(keys.LOAD_REQUESTS, {"model": slow.id})
            await until(lambda: _loading(state, slow.id), what="slow loading")
            impatient = Activator(Settings(redis_url=valkey.url, cold_start_timeout_seconds=1.5), state)
            t0 = time.monotonic()
            with pytest.raises(LoadFailed) as e:
                await impatient.ensure_loaded(late.id)
            assert e.value.status == 503 and "not loaded within 1.5s" in str(e.value)
            assert time.monotonic() - t0 >= 1.4
            pod.load_seconds = 0.05
            waiting = asyncio.create_task(act.ensure_loaded(late.id))
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the request must wait for room, not fail"
            assert "waiting for room" in json.loads(await state.r.hget(keys.DECISIONS, late.id))["reason"]
            assert "-" not in await state.copies(late.id)
            got = await asyncio.wait_for(waiting, 8)
        finally:
            watcher.cancel()
        assert got.id == "pod-0"
        assert ("unload", slow.id) in pod.orders
        assert "room freed up" in json.loads(await state.r.hget(keys.DECISIONS, late.id))["why"]


@pytest.mark.parametrize("overlap", [0.0, 0.6])
async def test_a_load_waits_for_its_evictions_unload_unless_overlap_is_allowed(valkey: devmesh.Valkey, overlap: float) -> None:
    """Issue 19: under churn a miss's time was its victim's unload grace (0.5 s). By default
    the load is sent once the unload is confirmed, so the pod never holds more than its
    capacity; with unload_overlap_fraction it is sent at once, the pod holding up to
    capacity x (1 + it) meanwhile."""
    async with cluster(valkey.url, pods=1, capacity=100 * MB, unload_overlap_fraction=overlap, busy_window_seconds=0.3) as (sched, (pod,), state):
        old, new = spec("old", 60 * MB), spec("new", 60 * MB)
        await state.register_models([old, new])
        await state.r.xadd(keys.LOAD_REQUESTS, {"model": old.id})
        await until(lambda: _loaded(state, old.id), what="old loaded")
        await asyncio.sleep(1.0)  # idle: out of the busy window
        pod.unload_seconds = 1.5
        t0 = time.monotonic()
        await state.r.xadd(keys.LOAD_REQUESTS, {"model": new.id})
        await until(lambda: _loaded(state, new.id), what="new loaded")
        took = time.monotonic() - t0
        assert ("unload", old.id) in pod.orders
        if overlap:
            assert took < 1.0, f"{took:.2f}s: the load waited for the unload"
        else:
            assert took >= 1.4, f"{took:.2f}s: the load went before the unload freed its room"


async def _keep_using(pod: FakePod, state: State, model: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and model in pod.held:  # until it is unloaded
        pod.use(model)
        await state.touch([model])
        await asyncio.sleep(0.2)


async def test_copies_follow_request_rate_and_idle_models_unload(valkey: devmesh.Valkey) -> None:
    async with cluster(valkey.url, pods=3, capacity=1000 * MB, scale_up_rps=20.0, scale_down_after_seconds=1.0,
                       idle_unload_seconds=4.0, busy_window_seconds=0.5) as (sched, pods, state):
        m = spec("popular", max_copies=2)
        await state.register_models([m])
        await state.r.xadd(keys.LOAD_REQUESTS, {"model": m.id})
        await until(lambda: _loaded(state, m.id), what="first copy")
        first = next(p for p in pods if m.id in p.held)

        async def hammer() -> None:
            while True:
                for p in pods:
                    if m.id in p.held:
                        p.use(m.id, 30)  # 30 requests per 50 ms on each copy: 600/s
                await asyncio.sleep(0.05)

        h = asyncio.create_task(hammer())
        try:
            await until(lambda: _count_loaded(state, m.id, 2), what="a second copy")
            await asyncio.sleep(1.0)
            assert len(await _live(state, m.id)) == 2, "maxCopies=2 is a ceiling"
        finally:
            h.cancel()
        await until(lambda: _count_loaded(state, m.id, 1), timeout=10, what="back to one copy when quiet")
        await until(lambda: _count_loaded(state, m.id, 0), timeout=10, what="idle unload to zero")
        assert first.orders.count(("load", m.id)) == 1


async def _live(state: State, model: str) -> list[str]:
    return [p for p, c in (await state.copies(model)).items() if c.state == CopyState.LOADED]


async def _count_loaded(state: State, model: str, n: int) -> bool:
    return len(await _live(state, model)) == n and all(
        c.state == CopyState.LOADED for c in (await state.copies(model)).values())


async def test_a_request_waits_for_its_runtime_pool_to_come_back_from_zero(valkey: devmesh.Valkey) -> None:
    """Issue 7, scale from zero: the model names a declared ServingRuntime that has no pods.
    Its request is held (no 503, not placed on the builtin pod that also serves sklearn) and is
    served as soon as a pod of that runtime registers."""
    async with cluster(valkey.url, pods=1, capacity=1000 * MB) as (sched, (builtin,), state):
        await state.set_runtimes({"builtin": runtime_json(["sklearn"], ["sklearn"]),
                                  "mlserver-1.x": runtime_json(["sklearn"], ["sklearn"])})
        m = spec("on-mlserver", runtime="mlserver-1.x")
        await state.register_models([m])
        act = Activator(sched.s, state)
        watcher = asyncio.create_task(act.watch_changes())
        woken = FakePod(Pod("mlserver-0", "127.0.0.1", devmesh.free_port(), 0, 1000 * MB, ["sklearn"], runtime="mlserver-1.x"), state)
        runner: asyncio.Task[None] | None = None
        try:
            request = asyncio.create_task(act.ensure_loaded(m.id))
            await asyncio.sleep(1.5)
            assert not request.done(), "the request should be held while the pool has no pods"
            assert not builtin.orders
            decision = json.loads(await state.r.hget(keys.DECISIONS, m.id))
            assert "ServingRuntime mlserver-1.x has no pods yet" in decision["reason"]
            runner = asyncio.create_task(woken.run())  # the controller scaled the pool to one
            got = await asyncio.wait_for(request, 5)
            assert got.id == "mlserver-0"
            assert woken.orders == [("load", m.id)] and not builtin.orders
        finally:
            watcher.cancel()
            if runner is not None:
                runner.cancel()
            await asyncio.gather(watcher, *([runner] if runner else []), return_exceptions=True)


async def test_a_hot_adapter_gets_a_copy_that_brings_its_base_and_its_siblings_stay(valkey: devmesh.Valkey) -> None:
    """Issue 17 item 2, copies per adapter: an adapter's request rate adds copies of that adapter
    only, and each new copy on a pod without the base brings a copy of the base, loaded first."""
    async with cluster(valkey.url, pods=2, capacity=1000 * MB, scale_up_rps=20.0, busy_window_seconds=0.5,
                       scale_down_after_seconds=60.0) as (sched, pods, state):
        base, a1, a2 = spec("base", 100 * MB), spec("a1", 10 * MB, base="base", max_copies=2), spec("a2", 10 * MB, base="base")
        await state.register_models([base, a1, a2])
        for m in (a1, a2):
            await state.r.xadd(keys.LOAD_REQUESTS, {"model": m.id})
            await until(lambda m=m: _loaded(state, m.id), what=f"{m.alias} loaded")
        home = next(p for p in pods if a1.id in p.held)
        other = next(p for p in pods if p is not home)
        # The base was never asked for: placement loaded it first, beside the first adapter.
        assert home.orders == [("load", base.id), ("load", a1.id), ("load", a2.id)], home.orders
        assert other.orders == []

        async def hammer() -> None:
            while True:
                for p in pods:
                    if a1.id in p.held:
                        p.use(a1.id, 30)  # 600 requests/s on each copy of a1; none for a2
                await asyncio.sleep(0.05)

        h = asyncio.create_task(hammer())
        try:
            await until(lambda: _count_loaded(state, a1.id, 2), timeout=15, what="a second copy of the hot adapter")
        finally:
            h.cancel()
        assert other.orders == [("load", base.id), ("load", a1.id)], other.orders  # its base first, then it
        assert set(await state.copies(base.id)) == {"pod-0", "pod-1"}
        assert list(await state.copies(a2.id)) == [home.pod.id]  # the quiet sibling keeps one copy


async def test_evictions_take_the_adapters_first_and_their_base_only_after_them(valkey: devmesh.Valkey) -> None:
    """Issue 17 item 2, eviction: on a full pod the least recently used adapter goes while its
    sibling keeps the base resident; when the base's room is needed it goes only with its
    adapters, and its unload is ordered after theirs."""
    # No unload reserve, so the sizes alone say what fits; a short busy window, so a copy used a
    # moment ago is idle (evictable in recency order, not as a busy last resort) when x comes.
    async with cluster(valkey.url, pods=1, capacity=130 * MB, unload_reserve_fraction=0.0, busy_window_seconds=0.3) as (sched, (pod,), state):
        base, a1, a2 = spec("base", 100 * MB), spec("a1", 10 * MB, base="base"), spec("a2", 10 * MB, base="base")
        x, y = spec("x", 15 * MB), spec("y", 60 * MB)
        await state.register_models([base, a1, a2, x, y])
        for m in (a1, a2):
            await state.r.xadd(keys.LOAD_REQUESTS, {"model": m.id})
            await until(lambda m=m: _loaded(state, m.id), what=f"{m.alias} loaded")
        await asyncio.sleep(1.2)  # past the landed grace of a2's copy
        pod.use(a1.id)  # a2 is now the least recently used; the base is as recent as a1
        await state.touch([a1.id])


        async def a1_seen_idle() -> bool:  # the leader polled the use, and the busy window passed
            v = sched.view
            return v.last_used.get(a1.id, 0.0) > v.last_used.get(a2.id, 0.0) and a1.id not in v.in_flight

        await until(a1_seen_idle, what="the leader to see a1 used after a2, and idle again")

        await state.r.xadd(keys.LOAD_REQUESTS, {"model": x.id})  # needs 5 MB more than is free
        await until(lambda: _loaded(state, x.id), what="x loaded")
        assert set(pod.held) == {base.id, a1.id, x.id}, pod.orders
        assert ("unload", base.id) not in pod.orders

        await state.r.xadd(keys.LOAD_REQUESTS, {"model": y.id})  # 60 MB: only the base's room will do
        await until(lambda: _loaded(state, y.id), timeout=10, what="y loaded")
        assert base.id not in pod.held and a1.id not in pod.held, pod.orders
        assert pod.orders.index(("unload", a1.id)) < pod.orders.index(("unload", base.id)), pod.orders
