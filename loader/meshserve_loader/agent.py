"""The loader agent: registers its pod, carries out load/unload orders from placement, and
reports results, sizes and request recency back through Redis.

Orders arrive on the pod's own stream and are read through a consumer group, so an order is
acknowledged only after its result event is written: a loader that restarts picks up exactly
the orders it had not finished. A failed load of any kind becomes an event with its reason;
nothing a model does crashes the agent. When the agent runs the runtime process itself
(MLServer pods) it restarts it if it dies and reports the models that went with it.

Traces: an order carries the placement decision's trace context (a `traceparent` field); the
agent handles it inside that context, so a load's `loader.pull` and `loader.load` spans are the
decision's children, log lines carry the trace id and model, and the result event carries the
context back to the leader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import redis.asyncio as aioredis

from meshserve import failures
from meshserve import state as st
from meshserve import tracing
from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.registry import ADAPTER_CONFIG, base_from_adapter_config
from meshserve.yamlfile import ConfigError
from meshserve.settings import Settings
from meshserve.store import ops
from meshserve_loader.builtin_client import RuntimeClient
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.metrics import LoaderMetrics
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.progress import NO_PROGRESS, LoadProgress, ProgressPublisher
from meshserve_loader.storage import StorageError, predict_size
from meshserve_loader.storage_config import StorageConfigError, StorageConfigSource

log = logging.getLogger("meshserve.loader")

GROUP = "loader"
GATEWAY_POLL_S = 0.01  # an unload's look at the gateways' revisions: one HGETALL
# Pod lifecycle news (drain, runtime restarts and the models they lost), for operators and any
# component that wants it. Kept off ms:events, whose readers expect one model per event.
POD_EVENTS = st.POD_EVENTS  # the schema lives in meshserve/state.py, beside its reader `meshserve describe`

__all__ = ["Agent", "RuntimeClient", "Runtime", "make_fetcher"]


class Runtime(Protocol):
    """What the agent needs of a pod's model server (built-in, MLServer, ModelRuntime SPI)."""

    async def wait_ready(self, timeout: float = ...) -> None: ...
    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int: ...
    async def unload(self, model_id: str) -> None: ...
    async def stats(self) -> dict[str, Any]: ...


class Agent:
    def __init__(
        self,
        settings: Settings,
        pod: Pod,
        runtime: Runtime,
        state: st.State,
        fetcher: Fetcher | None = None,
        process: RuntimeProcess | None = None,
        load_timeout: float | None = None,
        metrics: LoaderMetrics | None = None,
    ):
        self.s, self.pod, self.rt, self.state = settings, pod, runtime, state
        self.key = st.orders_key(pod.id)
        self.fetcher = fetcher or make_fetcher(settings, pod.id)
        self.process = process
        self.load_timeout = load_timeout or settings.load_timeout_seconds
        self.metrics = metrics or LoaderMetrics()
        self.progress = ProgressPublisher(state.r, pod.id)  # ms:progress:<model>|<pod>, for `meshserve load`
        self.loaded: dict[str, int] = {}  # model -> size reported, as this agent knows it
        self._seen_requests: dict[str, int] = {}
        # A pod's loads are bounded (ModelMesh's maxLoadingConcurrency); unloads never wait.
        self._load_slots = asyncio.Semaphore(max(1, settings.max_concurrent_loads))
        self._runtime_up = asyncio.Event()
        self._runtime_up.set()
        self.draining = False

    async def register(self) -> None:
        r = self.state.r
        try:
            await r.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        await r.zadd(st.HEARTBEATS, {self.pod.id: time.time()})
        await self.state.commit([["HSET", st.PODS, self.pod.id, self.pod.to_json()]], [(st.KIND_POD, self.pod.id)])
        stats = await asyncio.wait_for(self.rt.stats(), self.s.heartbeat_seconds * 5)
        held = list(stats.keys())
        self.loaded = {m: self.loaded.get(m) or int(stats[m].get("size") or 0) for m in held}
        # The sizes let placement keep what this pod still holds when it had forgotten the pod
        # (withdrawn while the loader was paused): it adopts a copy it still wants, unloads the rest.
        sizes = {m: self.loaded[m] for m in held}
        await r.xadd(st.EVENTS, {"op": "register", "pod": self.pod.id, "models": json.dumps(held), "sizes": json.dumps(sizes)})
        self.metrics.capacity.set(self.pod.capacity_bytes)
        log.info("registered pod %s runtime=%s capacity=%d formats=%s holding %d models", self.pod.id, self.pod.runtime, self.pod.capacity_bytes, ",".join(self.pod.formats), len(held))

    async def heartbeat_loop(self) -> None:
        """The heartbeat is one Redis round trip and nothing else: it never waits on the runtime
        (a long inference, a slow stats call) or on anything it reports. The same round trip
        tells whether placement still knows this pod; when it has forgotten it (withdrawn after
        missed heartbeats: the loader was paused or starved), the pod registers again at once,
        in a task of its own, so the heartbeats go on meanwhile."""
        registering: asyncio.Task[None] | None = None
        while True:
            try:
                async with self.state.r.pipeline(transaction=False) as p:
                    p.zadd(st.HEARTBEATS, {self.pod.id: time.time()}).hexists(st.PODS, self.pod.id)
                    _, known = await p.execute()
                if not known and not self.draining and self._runtime_up.is_set() and (registering is None or registering.done()):
                    log.warning("placement has forgotten pod %s (withdrawn while its heartbeats stopped): registering again", self.pod.id)
                    self.metrics.reregistrations.inc()
                    registering = asyncio.create_task(self._register_quietly())
            except (aioredis.RedisError, OSError) as e:
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.s.heartbeat_seconds)

    async def _register_quietly(self) -> None:
        try:
            await self.register()
        except Exception as e:  # noqa: BLE001 - the next heartbeat tries again
            log.warning("registering again failed: %s", e)

    async def usage_loop(self) -> None:
        """Recency and sizes for placement, apart from the heartbeat: each round is bounded by a
        heartbeat period, so a runtime that answers slowly delays only this report."""
        while True:
            if self._runtime_up.is_set():
                try:
                    await asyncio.wait_for(self._report_usage(), self.s.heartbeat_seconds)
                except asyncio.TimeoutError:
                    log.info("usage report skipped: the runtime did not answer within %.1fs", self.s.heartbeat_seconds)
                except (aioredis.RedisError, aiohttp.ClientError, OSError, ValueError) as e:
                    log.warning("usage report failed: %s", e)
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
        self.metrics.used.set(sum(self.loaded.values()))
        self.metrics.cache_bytes.set(self.fetcher.cache.used_bytes())

    async def order_loop(self) -> None:
        r = self.state.r
        # First the orders this pod took but never acknowledged (a restart), then new ones.
        cursor = "0"
        running: set[asyncio.Task[None]] = set()
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
            if cursor == "0":
                # Pending orders are re-read from "0" until acknowledged: finish these first,
                # but for the loads placement withdrew meanwhile.
                entries = [(eid, fields) for eid, fields in entries if not await self._drop_withdrawn(eid, fields)]
                await asyncio.gather(*(self._handle(eid, fields) for eid, fields in entries))
                continue
            # New orders run concurrently (bounded by the load slots), so one slow load does
            # not hold up an unload behind it.
            for eid, fields in entries:
                t = asyncio.create_task(self._handle(eid, fields))
                running.add(t)
                t.add_done_callback(running.discard)

    async def _handle(self, eid: bytes, fields: dict[bytes, bytes]) -> None:
        with tracing.handling(fields.get(b"model", b"").decode(), fields):
            await self._handle_order(eid, fields)

    async def _routes_withdrawn(self) -> None:
        """Until every gateway applied the routes as of now (the xDS servers publish the
        revision each one ACKed, keys.XDS_SYNCED), at most `unload_grace_seconds`. The order
        arrived after its commit, so the revision read here includes the route's withdrawal.
        With no gateway known (an xDS server that does not report), the whole grace."""
        deadline = time.monotonic() + self.s.unload_grace_seconds
        rev: int | None = None
        while True:
            try:
                rev, there = await ops.gateways_at(self.state.r, rev)
                if there and self.s.unload_waits_for_gateways:
                    return
            except (aioredis.RedisError, OSError) as e:
                log.debug("unload: gateways' revisions: %s", e)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(GATEWAY_POLL_S, left))

    async def _handle_order(self, eid: bytes, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op", b"").decode()
        model_id = fields.get(b"model", b"").decode()
        event: dict[str, Any] = {"pod": self.pod.id, "model": model_id, "op": op, "ok": 0, "size": 0, "reason": ""}
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._runtime_up.wait(), self.load_timeout)
            if op == "load":
                spec = ModelSpec.from_json(fields[b"spec"])
                async with self._load_slots, self.progress.track(spec.id, background=True) as progress:
                    event["size"], event["predicted"] = await self._load(spec, progress)
            elif op == "unload":
                if self.draining:
                    # preStop: the copy is reported gone at once (placement drops it; its routes
                    # went with the unload order), but the runtime keeps serving it until the
                    # gateways stop sending here (see drain) and exits with the pod, so a
                    # request already on its way still gets an answer.
                    log.info("draining: %s stays loaded until requests to it stop", model_id)
                else:
                    # The route withdrawal committed with this order is still on its way to the
                    # gateways: requests they route here meanwhile are served, not 404ed.
                    await self._routes_withdrawn()
                    await self.rt.unload(model_id)
                self.loaded.pop(model_id, None)
                self._seen_requests.pop(model_id, None)
            else:
                raise ValueError(f"unknown order {op!r}")
            event["ok"] = 1
        # Each reason says its kind first (meshserve/failures.py): inference clients are told the
        # kind only, since the detail names endpoints, buckets and paths.
        except asyncio.TimeoutError:
            event["reason"] = failures.tag(failures.TIMEOUT, f"{op} timed out after {self.load_timeout:g}s (the runtime's modelLoadingTimeoutMillis)")
            if op == "load":
                # The runtime may still finish it: unload so memory placement doesn't know of isn't held.
                asyncio.create_task(self._unload_quietly(model_id))
        except (StorageError, StorageConfigError) as e:
            event["reason"] = failures.tag(failures.STORAGE, str(e) or type(e).__name__)
        except aiohttp.ClientError as e:
            event["reason"] = failures.tag(failures.RUNTIME, str(e) or type(e).__name__)
        except (RuntimeError, ValueError, KeyError) as e:
            event["reason"] = failures.tag(failures.LOAD, str(e) or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a failed load must never take the agent down
            log.exception("%s of %s failed unexpectedly", op, model_id)
            event["reason"] = failures.tag(failures.INTERNAL, f"{type(e).__name__}: {e}")
        self.metrics.orders.labels(op if op in ("load", "unload") else "other", "ok" if event["ok"] else "failed").inc()
        if op == "load":
            self.metrics.load_seconds.observe(time.monotonic() - t0)
        elif op == "unload" and event["ok"]:
            self.metrics.unload_seconds.observe(time.monotonic() - t0)
        if not event["ok"]:
            log.warning("%s of %s failed: %s", op, model_id, event["reason"])
        else:
            log.info("%s of %s done (size=%s)", op, model_id, event["size"])
        event["ts"] = time.time()
        tracing.inject(event)
        async with self.state.r.pipeline(transaction=True) as p:
            p.xadd(st.EVENTS, {k: str(v) for k, v in event.items()}, maxlen=100_000, approximate=True)
            p.xack(self.key, GROUP, eid)
            p.xdel(self.key, eid)
            await p.execute()

    async def _drop_withdrawn(self, eid: bytes, fields: dict[bytes, bytes]) -> bool:
        """A load order re-read after a restart can outlive its placement: when the pod missed its
        heartbeats while its loader was down (killed mid-download, say), placement withdrew the
        pod's copies and placed them elsewhere, and it ignores the result of a load it no longer
        expects. Carrying it out would pull the model again and hold memory placement does not
        know of, so it is dropped (acknowledged, with a pod event saying why). A load whose copy
        here is still LOADING (the loader came back in time) goes ahead."""
        if fields.get(b"op") != b"load":
            return False
        model_id = fields.get(b"model", b"").decode()
        try:
            copy = (await self.state.copies(model_id)).get(self.pod.id)
            if copy is not None and copy.state == CopyState.LOADING:
                return False
            reason = f"load order outlived its placement (now {copy.state if copy else 'none'} here): withdrawn while the loader was down"
            log.warning("dropping load of %s: %s", model_id, reason)
            async with self.state.r.pipeline(transaction=True) as p:
                p.xadd(POD_EVENTS, {"op": "order_dropped", "pod": self.pod.id, "models": json.dumps([model_id]), "reason": reason, "ts": str(time.time())})
                p.xack(self.key, GROUP, eid)
                p.xdel(self.key, eid)
                await p.execute()
        except aioredis.RedisError as e:  # can't tell: carry it out, as before
            log.warning("checking the placement of %s failed: %s", model_id, e)
            return False
        return True

    async def _unload_quietly(self, model_id: str, patience: float = 120.0) -> None:
        """After a timed-out load: the runtime may still finish it. Watch for it (bounded) and
        unload it then, so the pod never holds memory placement doesn't know about."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                if model_id in await self.rt.stats():
                    await self.rt.unload(model_id)
                    log.info("unloaded %s, which finished loading after its timeout", model_id)
                    return
            except Exception as e:  # noqa: BLE001 - cleanup is best effort
                log.debug("cleanup of %s: %s", model_id, e)
            await asyncio.sleep(1.0)

    async def _load(self, spec: ModelSpec, progress: LoadProgress = NO_PROGRESS) -> tuple[int, int]:
        """(reported size, predicted size). The prediction is the size the user stated, else the
        files' disk size x 1.25; the reported size is what the runtime measured, never less than
        the prediction (a runtime that measures nothing, or measures an RSS delta that happened
        to shrink, must not make placement book less than the files will take)."""
        tr = tracing.tracer(__name__)
        attrs = {tracing.ATTR_MODEL: spec.id, tracing.ATTR_POD: self.pod.id, "meshserve.format": spec.format}
        with tr.start_as_current_span("loader.pull", attributes=attrs):
            path = await self.fetcher.fetch(spec.storage, progress.pulled)
        progress.loading()
        predicted = spec.size_hint or predict_size(path, spec.format)
        params = {"path": str(path), "format": spec.format, "predicted_size": predicted}
        params.update(await self._base_params(spec, path))
        with tr.start_as_current_span("loader.load", attributes={**attrs, "meshserve.predicted_bytes": predicted}) as span:
            measured = await asyncio.wait_for(self.rt.load(spec.id, params, self.load_timeout), self.load_timeout)
            span.set_attribute("meshserve.measured_bytes", measured)
        self.metrics.observe_size(predicted, measured)
        size = max(measured, predicted)
        self.loaded[spec.id] = size
        return size, predicted

    async def _base_params(self, spec: ModelSpec, path: Path) -> dict[str, Any]:
        """An adapter's base (issue 17): the registered model its spec names (meshserve.io/
        base-model), else the one its PEFT adapter_config.json names, fetched like any model, for
        the runtime to load once and share (`base_path`). {} for a model without a base.

        Placement does not know of bases yet (issue 17 item 2): the base is fetched here even
        when it is not placed on this pod, and its memory is carried by the adapter that
        brought it (builtin/server.py `load_with_base`)."""
        name = spec.base
        if not name:
            cfg = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
            if not cfg.is_file():
                return {}
            try:
                name = base_from_adapter_config(cfg.read_text(), f"{spec.alias}/{ADAPTER_CONFIG}")
            except ConfigError as e:
                raise ValueError(str(e)) from None
            if not name:
                return {}
        base_id = await self.state.resolve(name)
        base = await self.state.model(base_id) if base_id else None
        if base is None:
            raise ValueError(f"{spec.alias}'s base model '{name}' is not registered: register it (an InferenceService named {name!r})")
        if base.base:
            raise ValueError(f"{spec.alias}'s base '{name}' is itself an adapter (of '{base.base}'): a base must be a full model")
        base_path = await self.fetcher.fetch(base.storage)
        return {"base_path": str(base_path), "base_format": base.format, "base_model": base.id,
                "base_predicted_size": base.size_hint or predict_size(base_path, base.format)}

    async def watch_runtime(self) -> None:
        """Restart the runtime process when it dies, and report the models it took with it."""
        if self.process is None:
            return
        while True:
            code = await self.process.exit_code()
            if self.draining:
                return
            lost = sorted(self.loaded)
            self._runtime_up.clear()
            self.process.restarts += 1
            self.metrics.runtime_restarts.inc()
            reason = f"runtime process exited with code {code}"
            log.error("%s; lost %d models (%s); restarting it", reason, len(lost), ", ".join(lost) or "none")
            await self.state.r.xadd(
                POD_EVENTS, {"op": "runtime_restart", "pod": self.pod.id, "models": json.dumps(lost), "reason": reason, "ts": str(time.time())}
            )
            self.loaded.clear()
            self._seen_requests.clear()
            # Back off a little when it keeps dying, so a broken runtime doesn't spin the CPU.
            await asyncio.sleep(min(0.5 * self.process.restarts, 10.0))
            await self.process.start()
            try:
                await self.rt.wait_ready()
            except TimeoutError as e:
                log.error("restarted runtime is not ready: %s", e)
                continue
            await self.register()  # placement drops the lost copies (the pod now holds none)
            self._runtime_up.set()

    async def drain(self, timeout: float) -> None:
        """preStop: tell placement this pod is going so its models are placed elsewhere and routes
        withdrawn, then wait (bounded) for placement to move them, and for the requests still
        coming here to stop, before we exit. The order: draining is marked; placement loads
        each model elsewhere, then orders this copy's unload, which withdraws its routes (the
        unload is deferred, see _handle_order); the gateways apply the new routes and the
        requests in flight finish; then the pod exits."""
        self.draining = True
        self.pod.draining = True
        await self.state.commit([["HSET", st.PODS, self.pod.id, self.pod.to_json()]], [(st.KIND_POD, self.pod.id)])
        await self.state.r.xadd(POD_EVENTS, {"op": "drain", "pod": self.pod.id, "models": json.dumps(sorted(self.loaded)), "ts": str(time.time())})
        log.info("draining pod %s: %d models to move", self.pod.id, len(self.loaded))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.loaded:
            await asyncio.sleep(0.2)
        await self._wait_quiet(deadline)

    async def _wait_quiet(self, deadline: float, quiet: float | None = None) -> None:
        """Until the runtime's request counters have not moved for `quiet` seconds (a heartbeat
        period: it covers the xDS debounce, the push and the gateway's ACK) since the copies
        were dropped, or `deadline`. A gateway that applied routes without this pod sends
        nothing more, and the counters move when a request finishes, so quiet means both. A
        runtime that holds nothing returns at once."""
        quiet = self.s.heartbeat_seconds if quiet is None else quiet
        last: dict[str, int] | None = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            try:
                stats = await self.rt.stats()
            except Exception as e:  # noqa: BLE001 - a runtime that is gone serves nothing
                log.debug("drain: runtime stats: %s", e)
                return
            if not stats:
                return
            counts = {m: int(v.get("requests", 0)) for m, v in stats.items()}
            if counts != last:
                last, since = counts, time.monotonic()
            elif time.monotonic() - since >= quiet:
                log.info("drained pod %s: no request for %.1fs", self.pod.id, quiet)
                return
            await asyncio.sleep(0.1)
        log.warning("drain of pod %s timed out: copies left %s", self.pod.id, sorted(self.loaded) or "none")


def make_fetcher(settings: Settings, pod_id: str) -> Fetcher:
    # The storage-config is re-read at each pull when its file (or mounted Secret) changed, so a
    # Secret edited in Kubernetes applies without a restart. A bad entry fails only the models
    # naming it, and an unreadable storage-config only the models that need it: local/pvc and
    # plain http models always load. Read once here so problems show in the log at start.
    config = StorageConfigSource(settings.storage_config)
    snap = config.current()
    return Fetcher(
        pvc_root=settings.pvc_root,
        stores=snap.stores,
        cache=DiskCache(settings.pod_cache_dir(pod_id), settings.cache_max_bytes),
        max_model_bytes=settings.max_model_bytes,
        progress_min_bytes=settings.pull_progress_bytes,
        model_roots=settings.extra_model_roots,
        config=config,
    )


async def run(settings: Settings, index: int) -> None:
    from meshserve_loader.pod import build_pod

    async with aiohttp.ClientSession() as session:
        built = await build_pod(settings, index, session)
        state = st.State.from_url(settings.redis_url)
        agent = Agent(settings, built.pod, built.runtime, state, process=built.process, load_timeout=built.load_timeout, metrics=built.metrics)
        runner = await built.metrics.serve(settings.host, settings.pod_ports(index)[2])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            await built.runtime.wait_ready()
            await agent.register()
            tasks = [asyncio.create_task(c) for c in (agent.heartbeat_loop(), agent.usage_loop(), agent.order_loop(), agent.watch_runtime())]
            await stop.wait()
            await agent.drain(settings.drain_timeout_seconds)
            for t in tasks:
                t.cancel()
        finally:
            if built.process is not None:
                await built.process.stop()
            await runner.cleanup()
