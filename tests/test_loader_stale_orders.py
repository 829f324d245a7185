"""A loader that restarts re-reads the load orders it never acknowledged. Those whose copy on
this pod placement still expects (LOADING) are carried out; those placement withdrew while the
loader was down (the pod missed its heartbeats, the copy went elsewhere) are dropped with a pod
event, so the restarted pod neither pulls them again nor holds memory placement doesn't know of.

Kind: real server (Valkey on 127.0.0.1); the runtime is an in-memory fake."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve.store.keys import ORDERS_GROUP as GROUP, POD_EVENTS
from meshserve_loader.agent import Agent
from meshserve_testing.fake_runtime import RecordingRuntime


def _spec(model_id: str) -> ModelSpec:
    return ModelSpec(id=model_id, alias=model_id.split("__")[0], format="string",
                     storage={"parameters": {"type": "pvc", "name": "vol"}, "path": "m.txt"})


async def test_restarted_loader_drops_withdrawn_orders_and_resumes_the_rest(tmp_path: Path) -> None:
    (tmp_path / "pvc" / "vol").mkdir(parents=True)
    (tmp_path / "pvc" / "vol" / "m.txt").write_text("x")
    with devmesh.valkey() as v:
        s = Settings(data_dir=tmp_path, redis_url=v.url)
        state = State.from_url(v.url)
        try:
            r = state.r
            pod = Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["string"])
            key = keys.orders_key(pod.id)
            await r.xgroup_create(key, GROUP, id="0", mkstream=True)
            kept, moved, gone = _spec("kept__isvc-01"), _spec("moved__isvc-02"), _spec("gone__isvc-03")
            # Placement's view: `kept` still loading here; `moved` re-placed on pod-1; `gone` withdrawn entirely.
            await r.hset(keys.PLACEMENTS, mapping={
                kept.id: copies_to_json({"pod-0": Copy(CopyState.LOADING, 1)}),
                moved.id: copies_to_json({"pod-1": Copy(CopyState.LOADED, 1)}),
            })
            for spec in (kept, moved, gone):
                await r.xadd(key, {"op": "load", "model": spec.id, "spec": spec.to_json()})
            # The previous loader took all three and died before acknowledging any.
            assert len((await r.xreadgroup(GROUP, pod.id, {key: ">"}, count=10))[0][1]) == 3

            rt = RecordingRuntime()
            a = Agent(s, pod, rt, state)
            await a.register()
            loop = asyncio.create_task(a.order_loop())
            try:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and (await r.xpending(key, GROUP))["pending"]:
                    await asyncio.sleep(0.05)
            finally:
                loop.cancel()
            assert rt.loaded == [kept.id]
            events = [{k.decode(): x.decode() for k, x in f.items()} for _, f in await r.xrange(keys.EVENTS)]
            loads = [e for e in events if e.get("op") == "load"]
            assert [(e["model"], e["ok"]) for e in loads] == [(kept.id, "1")]
            dropped = [{k.decode(): x.decode() for k, x in f.items()} for _, f in await r.xrange(POD_EVENTS)]
            assert sorted(json.loads(e["models"])[0] for e in dropped if e["op"] == "order_dropped") == sorted([moved.id, gone.id])
            assert all("outlived its placement" in e["reason"] for e in dropped if e["op"] == "order_dropped")
            assert await r.xlen(key) == 0
        finally:
            await state.close()
