"""Kind: real servers (Valkey and an aiohttp model store on 127.0.0.1, stopped at the end); the
runtime is an in-memory fake (meshserve_testing.fake_runtime), as the loader's own bookkeeping is
what is tested. A base's files stay in the pod's disk cache while adapters over it are loaded:
other models pulled meanwhile evict everything else, and the next adapter's load does not pull
the base again. Once its adapters are unloaded, the base's files are evictable as before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from meshserve.model import ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State, keys
from meshserve.store.keys import ORDERS_GROUP as GROUP
from meshserve.store.messages import LoadOrder, UnloadOrder
from meshserve_loader.agent import Agent
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_testing import devmesh
from meshserve_testing.fake_runtime import RecordingRuntime

FILE = b"x" * 2000  # every model file; the cache holds two of them


async def _store(hits: list[str]) -> tuple[web.AppRunner, str]:
    async def model(request: web.Request) -> web.Response:
        hits.append(request.match_info["name"])
        return web.Response(body=FILE)

    app = web.Application()
    app.router.add_get("/{name}", model)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _spec(model_id: str, uri: str, fmt: str, base: str = "") -> ModelSpec:
    return ModelSpec(id=model_id, alias=model_id.split("__")[0], format=fmt, base=base, storage={"uri": uri})


async def _run(state: State, pod: Pod, orders: list[Any]) -> None:
    """Send `orders` to the pod and wait until the loader has carried them all out."""
    key = keys.orders_key(pod.id)
    for o in orders:
        await state.r.xadd(key, o.encode())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pending = (await state.r.xpending(key, GROUP))["pending"]
        if not pending and await state.r.xlen(key) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the loader did not carry out its orders in 15 s")


async def test_a_resident_base_is_not_pulled_again_for_the_next_adapter(tmp_path: Path) -> None:
    hits: list[str] = []
    runner, url = await _store(hits)
    try:
        with devmesh.valkey() as v:
            state = State.from_url(v.url)
            loop: asyncio.Task[None] | None = None
            try:
                pod = Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["sentence-transformers", "peft", "onnx"])
                await state.r.xgroup_create(keys.orders_key(pod.id), GROUP, id="0", mkstream=True)
                cache = DiskCache(tmp_path / "cache", 2 * len(FILE) + 100)
                rt = RecordingRuntime()
                a = Agent(Settings(data_dir=tmp_path, redis_url=v.url, unload_grace_seconds=0), pod, rt, state,
                          fetcher=Fetcher(tmp_path / "pvc", {}, cache))
                await a.register()
                loop = asyncio.create_task(a.order_loop())
                base = _spec("minilm__isvc-0000000001", f"{url}/base.bin", "sentence-transformers")
                await state.register_models([base])

                def adapter(i: int) -> ModelSpec:
                    return _spec(f"a{i}__isvc-00000000a{i}", f"{url}/a{i}.bin", "peft", base=base.id)

                def other(i: int) -> ModelSpec:
                    return _spec(f"m{i}__isvc-00000000b{i}", f"{url}/m{i}.bin", "onnx")

                await _run(state, pod, [LoadOrder(adapter(0))])
                assert hits.count("base.bin") == 1
                assert rt.params[-1]["base_path"].startswith(str(cache.root))
                # Other models pulled since: the cache holds two files, but the base's stay.
                await _run(state, pod, [LoadOrder(other(1)), LoadOrder(other(2)), LoadOrder(other(3))])
                await _run(state, pod, [LoadOrder(adapter(1))])
                assert hits.count("base.bin") == 1, "the base was pulled again though adapters over it are loaded"
                assert rt.params[-1]["base_path"] == rt.params[0]["base_path"]
                # Its adapters unloaded, the base's files are the cache's to evict again.
                await _run(state, pod, [UnloadOrder(adapter(0).id), UnloadOrder(adapter(1).id)])
                await _run(state, pod, [LoadOrder(other(4)), LoadOrder(other(5))])
                await _run(state, pod, [LoadOrder(adapter(2))])
                assert hits.count("base.bin") == 2
            finally:
                if loop is not None:
                    loop.cancel()
                    await asyncio.gather(loop, return_exceptions=True)
                await state.close()
    finally:
        await runner.cleanup()
