"""The loader agent: registers its pod, carries out load/unload orders from placement, and
reports results, sizes and request recency back through Redis.

Orders arrive on the pod's own stream and are read through a consumer group, so an order is
acknowledged only after its result event is written: a loader that restarts picks up exactly
the orders it had not finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from meshserve import state as st
from meshserve.model import Pod, ModelSpec
from meshserve.settings import Settings
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage import StorageError, predict_size
from meshserve_loader.storage_config import StorageConfigError, load_storage_config

log = logging.getLogger("meshserve.loader")

GROUP = "loader"


@dataclass
class RuntimeClient:
    """The pod's model server, over the KServe v2 REST repository extension."""

    base_url: str
    session: aiohttp.ClientSession

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with self.session.get(f"{self.base_url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"runtime at {self.base_url} not ready after {timeout}s")
            await asyncio.sleep(0.1)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        async with self.session.post(
            f"{self.base_url}/v2/repository/models/{model_id}/load",
            json={"parameters": params},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(body.get("error") if isinstance(body, dict) else f"HTTP {r.status}")
            return int(body.get("size_bytes") or 0)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            if r.status not in (200, 404):
                raise RuntimeError(f"unload of {model_id} failed: HTTP {r.status}")

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base_url}/v2/meshserve/stats") as r:
            return await r.json() if r.status == 200 else {}


class Agent:
    def __init__(self, settings: Settings, pod: Pod, runtime: RuntimeClient, state: st.State, fetcher: Fetcher | None = None):
        self.s, self.pod, self.rt, self.state = settings, pod, runtime, state
        self.fetcher = fetcher or make_fetcher(settings, pod.id)
        self.key = st.orders_key(pod.id)
        self._seen_requests: dict[str, int] = {}

    async def register(self) -> None:
        r = self.state.r
        try:
            await r.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        await r.zadd(st.HEARTBEATS, {self.pod.id: time.time()})
        await self.state.commit([["HSET", st.PODS, self.pod.id, self.pod.to_json()]], [(st.KIND_POD, self.pod.id)])
        held = list((await self.rt.stats()).keys())
        await r.xadd(st.EVENTS, {"op": "register", "pod": self.pod.id, "models": json.dumps(held)})
        log.info("registered pod %s capacity=%d", self.pod.id, self.pod.capacity_bytes)

    async def heartbeat_loop(self) -> None:
        while True:
            try:
                await self.state.r.zadd(st.HEARTBEATS, {self.pod.id: time.time()})
                await self._report_usage()
            except (aioredis.RedisError, aiohttp.ClientError, OSError) as e:
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.s.heartbeat_seconds)

    async def _report_usage(self) -> None:
        # Recency comes from the runtime's own counters: no Python hop on the data path.
        stats = await self.rt.stats()
        used = {}
        for model_id, s in stats.items():
            n = int(s.get("requests", 0))
            if n != self._seen_requests.get(model_id):
                self._seen_requests[model_id] = n
                if s.get("last_used"):
                    used[model_id] = float(s["last_used"])
        if used:
            await self.state.r.zadd(st.LAST_USED, used, gt=True)

    async def order_loop(self) -> None:
        r = self.state.r
        # First the orders this pod took but never acknowledged (a restart), then new ones.
        cursor = "0"
        while True:
            try:
                resp = await r.xreadgroup(GROUP, self.pod.id, {self.key: cursor}, count=16, block=1000)
            except aioredis.RedisError as e:
                log.warning("reading orders failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            entries = resp[0][1] if resp else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            await asyncio.gather(*(self._handle(eid, fields) for eid, fields in entries))

    async def _handle(self, eid: bytes, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op", b"").decode()
        model_id = fields.get(b"model", b"").decode()
        event: dict[str, Any] = {"pod": self.pod.id, "model": model_id, "op": op, "ok": 0, "size": 0, "reason": ""}
        try:
            if op == "load":
                spec = ModelSpec.from_json(fields[b"spec"])
                event["size"] = await self._load(spec)
            elif op == "unload":
                await self.rt.unload(model_id)
                self._seen_requests.pop(model_id, None)
            else:
                raise ValueError(f"unknown order {op!r}")
            event["ok"] = 1
        except asyncio.TimeoutError:
            event["reason"] = f"load timed out after {self.s.load_timeout_seconds:g}s"
        except (StorageError, RuntimeError, ValueError, KeyError, aiohttp.ClientError) as e:
            event["reason"] = str(e) or type(e).__name__
        if not event["ok"]:
            log.warning("%s of %s failed: %s", op, model_id, event["reason"])
        else:
            log.info("%s of %s done (size=%s)", op, model_id, event["size"])
        event["ts"] = time.time()
        async with self.state.r.pipeline(transaction=True) as p:
            p.xadd(st.EVENTS, {k: str(v) for k, v in event.items()}, maxlen=100_000, approximate=True)
            p.xack(self.key, GROUP, eid)
            p.xdel(self.key, eid)
            await p.execute()

    async def _load(self, spec: ModelSpec) -> int:
        path = await self.fetcher.fetch(spec.storage)
        predicted = predict_size(path, spec.format)
        params = {"path": str(path), "format": spec.format, "predicted_size": predicted}
        return await asyncio.wait_for(self.rt.load(spec.id, params, self.s.load_timeout_seconds), self.s.load_timeout_seconds)


def make_fetcher(settings: Settings, pod_id: str) -> Fetcher:
    try:
        stores = load_storage_config(settings.storage_config)
    except StorageConfigError as e:
        # A bad storage-config must not stop local models from loading: say so loudly, go on.
        log.error("storage-config unusable, only local/pvc and plain http models will load: %s", e)
        stores = {}
    return Fetcher(
        pvc_root=settings.pvc_root,
        stores=stores,
        cache=DiskCache(settings.data_dir / "cache" / pod_id, settings.cache_max_bytes),
        max_model_bytes=settings.max_model_bytes,
        progress_min_bytes=settings.pull_progress_bytes,
    )


async def run(settings: Settings, index: int) -> None:
    rest, grpc_port, _ = settings.pod_ports(index)
    pod = Pod(
        id=f"pod-{index}",
        host=settings.host,
        rest_port=rest,
        grpc_port=grpc_port,
        capacity_bytes=settings.pod_capacity_bytes,
        formats=["sklearn", "string"],
    )
    state = st.State.from_url(settings.redis_url)
    async with aiohttp.ClientSession() as session:
        rt = RuntimeClient(f"http://{settings.host}:{rest}", session)
        await rt.wait_ready()
        agent = Agent(settings, pod, rt, state)
        await agent.register()
        await asyncio.gather(agent.heartbeat_loop(), agent.order_loop())
