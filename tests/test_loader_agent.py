"""Kind: real servers. The loader agent against a real Valkey and a real built-in runtime process
(run and watched by the agent's RuntimeProcess, on 127.0.0.1, always stopped): load failures of
each kind are reported with their reason and crash nothing; a runtime that dies is restarted and
its models reported lost; loads are bounded per pod; sizes are predicted and measured."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve.model import ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store.keys import POD_EVENTS
from meshserve_loader.agent import Agent
from meshserve_loader.example_models import write_sklearn
from meshserve_loader.servers.builtin import BuiltinAdapter
from meshserve_loader.serving_runtime import builtin_runtime

SLOW_MODEL = '''
import time
class Slow:
    def __init__(self, settings): pass
    def load(self):
        time.sleep(4)
    def predict(self, inputs): return {}
'''


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


def _spec(model_id: str, path: str, fmt: str = "sklearn") -> ModelSpec:
    return ModelSpec(id=model_id, alias=model_id.split("__")[0], format=fmt,
                     storage={"parameters": {"type": "pvc", "name": "vol"}, "path": path})


@pytest.fixture
async def agent(valkey: Any, tmp_path: Path) -> AsyncIterator[Agent]:
    # As `meshserve up` runs it (the loader starts the runtime), on ports the runtime binds itself.
    s = Settings(data_dir=tmp_path, redis_url=valkey.url, host="127.0.0.1", runtime_base_port=0, loader_runs_runtime=True,
                 load_timeout_seconds=2.0, max_concurrent_loads=1, heartbeat_seconds=0.2)
    vol = tmp_path / "pvc" / "vol"
    write_sklearn(vol / "mnist-svm.joblib")
    (vol / "corrupt.joblib").write_bytes(b"this is not a joblib file")
    (vol / "slow").mkdir()
    (vol / "slow" / "model.py").write_text(SLOW_MODEL)
    (vol / "slow" / "model-settings.json").write_text(json.dumps({"implementation": "model.Slow"}))
    state = State.from_url(valkey.url)
    await state.r.flushdb()
    async with aiohttp.ClientSession() as session:
        server = BuiltinAdapter(s, 0, builtin_runtime(["sklearn", "custom"]), session)
        ends = await server.start()
        pod = Pod("pod-0", "127.0.0.1", ends.rest, ends.grpc, 1 << 30, ["sklearn"], max_loading=1)
        # Generous by default: a runtime imports a model library at its first load of that kind,
        # which on a busy 2-core machine passed 2 s (fresh-clone CI runs, 2026-12-03). The
        # failure test shortens it for the load meant to time out.
        a = Agent(s, pod, server, state, load_timeout=30.0)
        await server.wait_ready(60)
        await a.register()
        tasks = [asyncio.create_task(c) for c in (a.order_loop(), a.watch_runtime())]
        try:
            yield a
        finally:
            a.draining = True
            for t in tasks:
                t.cancel()
            await server.stop()
            await state.close()


async def _order(a: Agent, op: str, spec: ModelSpec) -> None:
    await a.state.r.xadd(keys.orders_key(a.pod.id), {"op": op, "model": spec.id, "spec": spec.to_json()})


async def _results(a: Agent, n: int, timeout: float = 30) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await a.state.r.xrange(keys.EVENTS)]
        evs = [e for e in evs if e.get("op") in ("load", "unload")]
        if len(evs) >= n:
            return evs
        await asyncio.sleep(0.1)
    raise TimeoutError(f"fewer than {n} results within {timeout}s")


async def test_failures_are_reported_and_crash_nothing(agent: Agent) -> None:
    good = _spec("mnist__isvc-0000000001", "mnist-svm.joblib")
    # First, alone: the built-in runtime loads one model at a time (to measure each), so a
    # load queued behind the slow one would wait past its own timeout.
    await _order(agent, "load", good)
    await _results(agent, 1, timeout=60)
    agent.load_timeout = 2.0
    for spec in (
        _spec("corrupt__isvc-0000000002", "corrupt.joblib"),
        _spec("wrongfmt__isvc-0000000003", "mnist-svm.joblib", fmt="pytorch"),
        _spec("missing__isvc-0000000004", "nope.joblib"),
        _spec("slow__isvc-0000000005", "slow", fmt="custom"),
        # An adapter whose base is not registered; one whose own files are missing as well
        # (its base is looked up while its files come: the files' error is the one reported).
        dataclasses.replace(_spec("orphan__isvc-0000000006", "mnist-svm.joblib"), base="nobase"),
        dataclasses.replace(_spec("lost__isvc-0000000007", "nope.joblib"), base="nobase"),
    ):
        await _order(agent, "load", spec)
    evs = {e["model"]: e for e in await _results(agent, 7, timeout=60)}
    assert "base model 'nobase' is not registered" in evs["orphan__isvc-0000000006"]["reason"]
    assert "does not exist" in evs["lost__isvc-0000000007"]["reason"]
    assert evs["corrupt__isvc-0000000002"]["ok"] == "0" and "cannot read corrupt.joblib" in evs["corrupt__isvc-0000000002"]["reason"]
    assert "cannot load format 'pytorch'" in evs["wrongfmt__isvc-0000000003"]["reason"]
    assert "does not exist" in evs["missing__isvc-0000000004"]["reason"]
    assert "timed out after 2s" in evs["slow__isvc-0000000005"]["reason"]
    ok = evs[good.id]
    assert ok["ok"] == "1" and int(ok["size"]) > 0 and int(ok["predicted"]) > 0
    assert agent.process is not None and agent.process.alive()
    # The timed-out model finished loading later: the agent unloads it rather than hold it unknown.
    await asyncio.sleep(0)
    deadline = time.monotonic() + 15
    while "slow__isvc-0000000005" in await agent.server.stats() and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    assert "slow__isvc-0000000005" not in await agent.server.stats()
    text = agent.metrics.render().decode()
    assert 'meshserve_model_size_bytes_count{kind="predicted"} 1.0' in text
    assert 'meshserve_model_size_bytes_count{kind="measured"} 1.0' in text


async def test_an_unload_waits_for_the_gateways_and_no_longer(agent: Agent) -> None:
    """Issue 19: the unload of an evicted copy used to wait a fixed grace (0.5 s) for the route
    withdrawal to reach the gateways, the whole of a cold start into a full cache. It now waits
    until every gateway the xDS servers report ACKed routes as new as the order, bounded by the
    grace; with no gateway reported it waits the grace, as before."""
    from meshserve.store.keys import REV, XDS_SYNCED
    from meshserve.store.messages import GatewaySync

    agent.s.unload_grace_seconds = 6.0
    spec = _spec("mnist__isvc-0000000011", "mnist-svm.joblib")
    r = agent.state.r

    async def unload_took(catch_up_after: float | None) -> float:
        await r.delete(keys.EVENTS)
        await _order(agent, "load", spec)
        await _results(agent, 1)
        await r.set(REV, 10)
        await r.hset(XDS_SYNCED, mapping={"gw-a/1": GatewaySync(10, time.time()).encode(), "gw-b/2": GatewaySync(9, time.time()).encode()})
        t0 = time.monotonic()
        await _order(agent, "unload", spec)
        if catch_up_after is not None:
            await asyncio.sleep(catch_up_after)
            assert spec.id in await agent.server.stats()  # gw-b still routes by revision 9: kept
            await r.hset(XDS_SYNCED, "gw-b/2", GatewaySync(10, time.time()).encode())
        evs = await _results(agent, 2)
        assert evs[-1]["op"] == "unload" and evs[-1]["ok"] == "1"
        return time.monotonic() - t0

    took = unload_took(0.5)
    assert await took < 3.0  # unloaded once gw-b caught up (0.5 s), not after the 6 s grace
    assert spec.id not in await agent.server.stats()
    await r.delete(XDS_SYNCED)  # an xDS server that does not report: the whole grace
    agent.s.unload_grace_seconds = 1.0
    assert await unload_took(None) >= 1.0


async def test_runtime_death_is_restarted_and_losses_reported(agent: Agent) -> None:
    spec = _spec("mnist__isvc-00000000aa", "mnist-svm.joblib")
    await _order(agent, "load", spec)
    assert (await _results(agent, 1))[0]["ok"] == "1"
    assert agent.process is not None
    old_pid = agent.process.pid
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    restarts: list[dict[str, str]] = []
    while time.monotonic() < deadline and not restarts:
        restarts = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await agent.state.r.xrange(POD_EVENTS)]
        await asyncio.sleep(0.1)
    assert restarts and json.loads(restarts[0]["models"]) == [spec.id] and "exited with code -9" in restarts[0]["reason"]
    # Then it re-registers holding nothing, so placement drops the lost copy, and loads work again.
    while time.monotonic() < deadline:
        regs = [f for _, f in await agent.state.r.xrange(keys.EVENTS) if f.get(b"op") == b"register"]
        if len(regs) >= 2:
            break
        await asyncio.sleep(0.1)
    assert json.loads(regs[-1][b"models"]) == []
    assert agent.process.pid not in (0, old_pid)
    # The restarted runtime bound new ports (port 0): the pod registered again with those, and
    # they are the ones that answer.
    pod = Pod.from_json(await agent.state.r.hget(keys.PODS, agent.pod.id))
    assert (pod.rest_port, pod.grpc_port) == (agent.server.endpoints.rest, agent.server.endpoints.grpc)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{pod.rest_port}/v2/health/ready") as r:
        assert r.status == 200
    await _order(agent, "load", spec)
    assert [e["ok"] for e in await _results(agent, 2, timeout=60)] == ["1", "1"]


class _CountingRuntime:
    """In-memory fake: counts overlapping loads."""

    def __init__(self) -> None:
        self.active = self.peak = 0

    async def wait_ready(self, timeout: float = 0) -> None: ...

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.2)
        self.active -= 1
        return 1000

    async def unload(self, model_id: str) -> None: ...

    async def stats(self) -> dict[str, Any]:
        return {}


async def test_loads_are_bounded_per_pod(valkey: Any, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, redis_url=valkey.url, max_concurrent_loads=2)
    vol = tmp_path / "pvc" / "vol"
    vol.mkdir(parents=True)
    (vol / "m.txt").write_text("x")
    state = State.from_url(valkey.url)
    await state.r.flushdb()
    rt = _CountingRuntime()
    a = Agent(s, Pod("pod-9", "127.0.0.1", 1, 2, 1 << 30, ["string"]), rt, state)
    await a.register()
    loop = asyncio.create_task(a.order_loop())
    try:
        for i in range(6):
            await _order(a, "load", _spec(f"m{i}__isvc-000000000{i}", "m.txt", "string"))
        evs = await _results(a, 6)
        assert all(e["ok"] == "1" for e in evs)
        assert rt.peak == 2
    finally:
        loop.cancel()
        await state.close()


async def test_drain_marks_the_pod_and_waits_bounded(valkey: Any, tmp_path: Path) -> None:
    """SIGTERM's path: the pod record says draining, a drain event lists its models, and the
    agent waits for placement to move them, but no longer than the drain timeout."""
    s = Settings(data_dir=tmp_path, redis_url=valkey.url)
    state = State.from_url(valkey.url)
    await state.r.flushdb()
    a = Agent(s, Pod("pod-7", "127.0.0.1", 1, 2, 1 << 30, ["string"]), _CountingRuntime(), state)
    await a.register()
    a.loaded = {"m__isvc-0000000001": 1000}
    t0 = time.monotonic()
    await a.drain(0.5)
    assert 0.4 < time.monotonic() - t0 < 3
    assert Pod.from_json(await state.r.hget(keys.PODS, "pod-7")).draining is True
    ev = [f for _, f in await state.r.xrange(POD_EVENTS)][-1]
    assert ev[b"op"] == b"drain" and json.loads(ev[b"models"]) == ["m__isvc-0000000001"]
    a.loaded.clear()  # placement moved everything: drain returns at once
    t0 = time.monotonic()
    await a.drain(5)
    assert time.monotonic() - t0 < 1
    await state.close()
