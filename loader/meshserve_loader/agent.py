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
import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from meshserve import failures
from meshserve import tracing
from meshserve.model import CopyState, ModelSpec, Pod, alias_of_id
from meshserve.settings import Settings
from meshserve.store import State, ops
from meshserve.store.messages import LoadOrder, LoadResult, PodEvent, PodRegistered, UnloadOrder, UnloadResult, decode_order
from meshserve_loader.bases import Bases
from meshserve_loader.fetch import Fetcher, make_fetcher
from meshserve_loader.metrics import LoaderMetrics
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers import Adapter
from meshserve_loader.progress import NO_PROGRESS, LoadProgress, ProgressPublisher
from meshserve_loader.storage import StorageError, predict_size
from meshserve_loader.storage_config import StorageConfigError

log = logging.getLogger("meshserve.loader")

__all__ = ["Agent"]
GATEWAY_POLL_S = 0.01  # an unload's look at the gateways' revisions: one HGETALL
CACHE_MEASURE_SECONDS = 30.0  # the disk cache gauge (meshserve_loader_disk_cache_bytes) is this fresh

# Reconnecting to Redis after a failed read: exponential backoff with jitter, so the loaders of a
# cluster don't all come back at once when Redis does.
RECONNECT_WAIT = wait_random_exponential(multiplier=0.1, max=10.0)


class Agent:
    def __init__(
        self,
        settings: Settings,
        pod: Pod,
        server: Adapter,
        state: State,
        fetcher: Fetcher | None = None,
        load_timeout: float | None = None,
        metrics: LoaderMetrics | None = None,
    ):
        self.s, self.pod, self.server, self.state = settings, pod, server, state
        self.fetcher = fetcher or make_fetcher(settings, pod.id)
        self.bases = Bases(state, self.fetcher)
        self.load_timeout = load_timeout or settings.load_timeout_seconds
        self.metrics = metrics or LoaderMetrics()
        self.progress = ProgressPublisher(state.r, pod.id)  # ms:progress:<model>|<pod>, for `meshserve load`
        self.loaded: dict[str, int] = {}  # model -> size reported, as this agent knows it
        # model -> the files of the base it was loaded over, pinned in the disk cache while it is
        # loaded (DiskCache.pin: the next adapter's load must not pull the base again)
        self._base_files: dict[str, str] = {}
        self._seen_requests: dict[str, int] = {}
        self._usage_since = 0.0  # when the last usage report read the runtime (0: never: read everything)
        self._unsent_use: dict[str, float] = {}  # read from the runtime, not yet written (Redis was slow)
        self._cache_measured = 0.0  # when the disk cache's size was last measured for its gauge
        # A pod's loads are bounded (ModelMesh's maxLoadingConcurrency); unloads never wait.
        self._load_slots = asyncio.Semaphore(max(1, settings.max_concurrent_loads))
        self._runtime_up = asyncio.Event()
        self._runtime_up.set()
        self.draining = False

    @property
    def process(self) -> RuntimeProcess | None:
        """The server's process when the loader runs it (restarted by watch_runtime)."""
        return getattr(self.server, "process", None)

    async def register(self) -> None:
        await ops.register_pod(self.state, self.pod)
        stats = await asyncio.wait_for(self.server.stats(), self.s.heartbeat_seconds * 5)
        held = list(stats.keys())
        for m in set(self._base_files) - set(held):
            self._forget(m)
        self.loaded = {m: self.loaded.get(m) or int(stats[m].get("size") or 0) for m in held}
        # The sizes let placement keep what this pod still holds when it had forgotten the pod
        # (withdrawn while the loader was paused): it adopts a copy it still wants, unloads the rest.
        await ops.announce_registered(self.state.r, PodRegistered(self.pod.id, {m: self.loaded[m] for m in held}))
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
                known = await ops.heartbeat(self.state.r, self.pod.id)
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
                    await self._report_usage(self.s.heartbeat_seconds)
                except asyncio.TimeoutError as e:
                    log.info("usage report skipped: %s", e)
                except (aioredis.RedisError, aiohttp.ClientError, OSError, ValueError) as e:
                    log.warning("usage report failed: %s", e)
            await asyncio.sleep(self.s.heartbeat_seconds)

    async def _report_usage(self, limit: float) -> None:
        """Each of its two waits (the runtime's counters, Redis) is bounded by `limit`; a
        TimeoutError says which one was slow."""
        # Recency comes from the runtime's own counters: no Python hop on the data path. Only
        # the models used since the last report (less a second for a use that finished as
        # that one was read): reading every loaded model's counters each heartbeat was 4.5% of
        # the loader at 10,000 loaded (docs/benchmarks.md, "Density").
        started = time.time()
        since = getattr(self.server, "used_since", None)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that lands
        # as its awaitable finishes, and this loop then outlived its agent's shutdown.
        try:
            async with asyncio.timeout(limit):
                stats = await (since(self._usage_since - 1.0) if since is not None and self._usage_since else self.server.stats())
        except TimeoutError:
            raise asyncio.TimeoutError(f"the runtime did not answer within {limit:.1f}s") from None
        self._usage_since = started
        used = self._unsent_use
        for model_id, s in stats.items():
            n = int(s.get("requests", 0))
            if n != self._seen_requests.get(model_id):
                self._seen_requests[model_id] = n
                if s.get("last_used"):
                    used[model_id] = float(s["last_used"])
        try:
            async with asyncio.timeout(limit):
                await ops.mark_used(self.state.r, used)
        except TimeoutError:
            raise asyncio.TimeoutError(f"Redis did not answer within {limit:.1f}s; the uses read are sent with the next report") from None
        self._unsent_use = {}
        self.metrics.used.set(sum(self.loaded.values()))
        if started - self._cache_measured >= CACHE_MEASURE_SECONDS:
            # It walks every entry of the disk cache: not each heartbeat.
            self._cache_measured = started
            self.metrics.cache_bytes.set(self.fetcher.cache.used_bytes())

    async def order_loop(self) -> None:
        # First the orders this pod took but never acknowledged (a restart), then new ones.
        cursor = "0"
        running: set[asyncio.Task[None]] = set()
        while True:
            async for attempt in AsyncRetrying(wait=RECONNECT_WAIT, retry=retry_if_exception_type(aioredis.RedisError),
                                               before_sleep=_log_retry("reading orders")):
                with attempt:
                    entries = await ops.read_orders(self.state.r, self.pod.id, cursor)
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
        with tracing.handling(_peek(fields)[1], fields):
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
        op, model_id = _peek(fields)
        if op not in (LoadOrder.op, UnloadOrder.op):
            reason = f"unknown order {op!r}: no loader carries it out"
            log.warning("dropping order %s of %s: %s", eid, model_id, reason)
            self.metrics.orders.labels("other", "failed").inc()
            await ops.drop_order(self.state.r, self.pod.id, eid, PodEvent("order_dropped", self.pod.id, (model_id,), reason))
            return
        ok, size, predicted, reason = False, 0, None, ""
        t0 = time.monotonic()
        try:
            order = decode_order(fields)  # a load whose spec is unreadable fails as a load
            await asyncio.wait_for(self._runtime_up.wait(), self.load_timeout)
            if isinstance(order, LoadOrder):
                async with self._load_slots, self.progress.track(order.spec.id, background=True) as progress:
                    size, predicted = await self._load(order.spec, progress)
            else:
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
                    await self.server.unload(model_id)
                self._forget(model_id)
            ok = True
        # Each reason says its kind first (meshserve/failures.py): inference clients are told the
        # kind only, since the detail names endpoints, buckets and paths.
        except asyncio.TimeoutError:
            reason = failures.tag(failures.TIMEOUT, f"{op} timed out after {self.load_timeout:g}s (the runtime's modelLoadingTimeoutMillis)")
            if op == LoadOrder.op:
                # The runtime may still finish it: unload so memory placement doesn't know of isn't held.
                asyncio.create_task(self._unload_quietly(model_id))
        except (StorageError, StorageConfigError) as e:
            reason = failures.tag(failures.STORAGE, str(e) or type(e).__name__)
        except aiohttp.ClientError as e:
            reason = failures.tag(failures.RUNTIME, str(e) or type(e).__name__)
        except (RuntimeError, ValueError, KeyError) as e:
            reason = failures.tag(failures.LOAD, str(e) or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a failed load must never take the agent down
            log.exception("%s of %s failed unexpectedly", op, model_id)
            reason = failures.tag(failures.INTERNAL, f"{type(e).__name__}: {e}")
        self.metrics.orders.labels(op, "ok" if ok else "failed").inc()
        if op == LoadOrder.op:
            self.metrics.load_seconds.observe(time.monotonic() - t0)
        elif ok:
            self.metrics.unload_seconds.observe(time.monotonic() - t0)
        if not ok:
            log.warning("%s of %s failed: %s", op, model_id, reason)
        else:
            log.info("%s of %s done (size=%s)", op, model_id, size)
        trace = tracing.inject({})  # the result carries the order's context back to the leader
        result = (LoadResult(self.pod.id, model_id, ok, size, reason, trace=trace, predicted=predicted) if op == LoadOrder.op
                  else UnloadResult(self.pod.id, model_id, ok, size, reason, trace=trace))
        await ops.report_result(self.state.r, self.pod.id, eid, result)

    async def _drop_withdrawn(self, eid: bytes, fields: dict[bytes, bytes]) -> bool:
        """A load order re-read after a restart can outlive its placement: when the pod missed its
        heartbeats while its loader was down (killed mid-download, say), placement withdrew the
        pod's copies and placed them elsewhere, and it ignores the result of a load it no longer
        expects. Carrying it out would pull the model again and hold memory placement does not
        know of, so it is dropped (acknowledged, with a pod event saying why). A load whose copy
        here is still LOADING (the loader came back in time) goes ahead."""
        op, model_id = _peek(fields)
        if op != LoadOrder.op:
            return False
        try:
            copy = (await self.state.copies(model_id)).get(self.pod.id)
            if copy is not None and copy.state == CopyState.LOADING:
                return False
            reason = f"load order outlived its placement (now {copy.state if copy else 'none'} here): withdrawn while the loader was down"
            log.warning("dropping load of %s: %s", model_id, reason)
            await ops.drop_order(self.state.r, self.pod.id, eid, PodEvent("order_dropped", self.pod.id, (model_id,), reason))
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
                if model_id in await self.server.stats():
                    await self.server.unload(model_id)
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
        # A base named in the spec is looked up and found in the disk cache while the adapter's
        # own files come: a round trip and the cache's checks off the cold path. (A base named
        # only in the adapter's files waits for them.)
        base = asyncio.ensure_future(self.bases.params(spec, None)) if spec.base else None
        try:
            with tr.start_as_current_span("loader.pull", attributes=attrs):
                path = await self.fetcher.fetch(spec.storage, progress.pulled)
        except BaseException:
            if base is not None:
                base.cancel()
                await asyncio.gather(base, return_exceptions=True)
            raise
        progress.loading()
        predicted = spec.size_hint or predict_size(path, spec.format)
        params: dict[str, Any] = {"path": str(path), "format": spec.format, "predicted_size": predicted}
        # The built-in runtime then answers to the alias too (the gateway may send a request by
        # alias, docs/design/routing.md "Shared routes"); only when the id says the same alias,
        # which is how the xDS server, reading no specs, knows it (alias_of_id).
        if spec.alias and alias_of_id(spec.id) == spec.alias:
            params["alias"] = spec.alias
        params.update(await base if base is not None else await self.bases.params(spec, path))
        with tr.start_as_current_span("loader.load", attributes={**attrs, "meshserve.predicted_bytes": predicted}) as span:
            measured = await asyncio.wait_for(self.server.load(spec.id, params, self.load_timeout), self.load_timeout)
            span.set_attribute("meshserve.measured_bytes", measured)
        self.metrics.observe_size(predicted, measured)
        size = max(measured, predicted)
        if params.get("base_path") and spec.id not in self._base_files:
            self._base_files[spec.id] = str(params["base_path"])
            self.fetcher.cache.pin(self._base_files[spec.id])
        self.loaded[spec.id] = size
        return size, predicted

    def _forget(self, model_id: str) -> None:
        """`model_id` is no longer loaded here: its bookkeeping goes, and its base's pin."""
        self.loaded.pop(model_id, None)
        self._seen_requests.pop(model_id, None)
        base = self._base_files.pop(model_id, None)
        if base is not None:
            self.fetcher.cache.unpin(base)

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
            await ops.report_pod_event(self.state.r, PodEvent("runtime_restart", self.pod.id, tuple(lost), reason))
            for m in list(self.loaded):
                self._forget(m)
            self._seen_requests.clear()
            # Back off when it keeps dying, so a broken runtime doesn't spin the CPU.
            await asyncio.sleep(RESTART_WAIT(_Attempts(self.process.restarts)))
            try:
                endpoints = await self.server.restart()
            except (TimeoutError, RuntimeError) as e:
                log.error("restarted runtime is not ready: %s", e)
                continue
            # A server on port 0 came back on new ports: the pod registers with them.
            self.pod.rest_port, self.pod.grpc_port = endpoints.rest, endpoints.grpc
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
        await ops.publish_pod(self.state, self.pod)
        await ops.report_pod_event(self.state.r, PodEvent("drain", self.pod.id, tuple(sorted(self.loaded))))
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
                stats = await self.server.stats()
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


def _peek(fields: dict[bytes, bytes]) -> tuple[str, str]:
    """(op, model) of an orders entry before it is decoded (messages.decode_order), so that one
    that can't be decoded is still reported against its model, and the trace names it."""
    return fields.get(b"op", b"").decode(), fields.get(b"model", b"").decode()


RESTART_WAIT = wait_random_exponential(multiplier=0.5, max=10.0)


class _Attempts:
    """The retry state tenacity's wait strategies read (attempt_number), for a loop of our own."""

    def __init__(self, n: int):
        self.attempt_number = max(1, n)


def _log_retry(what: str) -> Any:
    def before_sleep(rs: Any) -> None:
        log.warning("%s failed (attempt %d): %s; retrying in %.1fs", what, rs.attempt_number, rs.outcome.exception(),
                    rs.next_action.sleep if rs.next_action else 0.0)
    return before_sleep
