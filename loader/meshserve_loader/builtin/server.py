"""The built-in runtime process: KServe v2 REST (aiohttp) and gRPC (grpcio) over one model table.

The model to serve is the `mm-model-id` header when present (the gateway sets it from the
alias), else the name in the path or message. Loads come through the repository extension,
which is also how the loader drives MLServer and Triton.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_loader.builtin import codec
from meshserve_loader.builtin.formats import Model, ModelLoadError, load_model
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

log = logging.getLogger("meshserve.runtime")

MODEL_ID_HEADER = "mm-model-id"
MAX_BODY_BYTES = MAX_REQUEST_BYTES


class LoadTimeout(TimeoutError):
    """A load did not finish within its timeout; the runtime gave up on it."""


def _in_thread(fn: Any, *args: Any) -> "asyncio.Future[Any]":
    """Run `fn(*args)` in a thread of its own. A load may hang forever (a user's load() that
    never returns): it must not hold one of the loop's few shared executor threads, which every
    later load needs."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, v: Any) -> None:
        if not fut.done():
            fut.set_result(v) if ok else fut.set_exception(v)

    def run() -> None:
        try:
            v, ok = fn(*args), True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            v, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, v)
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody is waiting

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return fut


def worker_count() -> int:
    """Inference threads: one per CPU the process may run on (the pod's CPU limit in a cluster,
    as the kernel's affinity mask tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Entry:
    model: Model
    size: int
    loaded_at: float
    requests: int = 0
    last_used: float = 0.0


@dataclass
class Runtime:
    """The model table and the operations both transports share."""

    name: str = "meshserve-builtin"
    allow_executable: bool = True  # pickle/joblib and user classes (docs/security.md)
    models: dict[str, Entry] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    warm: "asyncio.Future[None] | None" = None  # background imports loads must wait for
    # A load not done within this many seconds (the load's own `timeout_seconds` parameter, which
    # the loader sends, wins) is abandoned: its slot is freed and its result, should it ever
    # come, is dropped. 0: wait forever.
    load_timeout: float = 0.0
    # Inference runs on these threads, never on the event loop: a long batch must not hold up
    # health, stats, loads or other models' requests (the loader's heartbeat reads stats).
    workers: int = field(default_factory=worker_count)

    def __post_init__(self) -> None:
        self._load_lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="infer")
        self.m_requests = Counter(
            "meshserve_runtime_requests", "Inference requests served by this runtime", ["model", "code"], registry=self.registry
        )
        # Per model: with per-route stats off on the gateway (Settings.xds_route_stats) this is
        # where the model dashboard's latency comes from.
        self.m_latency = Histogram(
            "meshserve_runtime_inference_seconds", "Inference time inside the runtime", ["model"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.m_models = Gauge("meshserve_runtime_models_loaded", "Models loaded in this runtime", registry=self.registry)
        self.m_abandoned = Gauge(
            "meshserve_runtime_abandoned_loads", "Loads given up after their timeout whose thread is still running",
            registry=self.registry,
        )
        self.abandoned = 0

    def get(self, name: str) -> Entry:
        e = self.models.get(name)
        if e is None:
            raise LookupError(f"model '{name}' is not loaded on this runtime")
        return e

    async def load(self, name: str, fmt: str, path: str, params: dict[str, Any]) -> int:
        if name in self.models:
            return self.models[name].size
        timeout = float(params.get("timeout_seconds") or self.load_timeout or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        load: "asyncio.Future[Model] | None" = None
        try:
            # The deadline covers the wait for the lock too, and leaving by it releases the lock:
            # a load that hangs holds up the loads behind it for its timeout at most.
            async with asyncio.timeout_at(deadline):
                # One load at a time keeps the RSS delta attributable to the model being loaded.
                async with self._load_lock:
                    if name in self.models:  # loaded by a request for it that came first
                        return self.models[name].size
                    if self.warm is not None:
                        try:
                            await asyncio.shield(self.warm)
                        except ImportError as e:  # a missing optional library fails only its own format
                            log.warning("format library unavailable: %s", e)
                        self.warm = None
                    before = rss_bytes()
                    load = _in_thread(load_model, fmt, Path(path), params, self.allow_executable)
                    model = await asyncio.shield(load)
                    measured = rss_bytes() - before
        except TimeoutError:
            if load is None:
                raise LoadTimeout(f"load of '{name}' did not start within {timeout:g}s: an earlier load still holds the runtime") from None
            self._abandon(name, load)
            raise LoadTimeout(f"load of '{name}' did not finish within {timeout:g}s; the runtime gave up on it") from None
        size = measured if measured > 0 else int(params.get("predicted_size", 0))
        self.models[name] = Entry(model, size, time.time())
        self.m_models.set(len(self.models))
        log.info("loaded model %s (%s) size=%d", name, fmt, size)
        return size

    def _abandon(self, name: str, load: "asyncio.Future[Model]") -> None:
        """A timed-out load keeps running in its thread (Python cannot stop it). Its result is
        dropped whenever it comes, so the runtime never holds a model nobody placed."""
        self.abandoned += 1
        self.m_abandoned.inc()
        log.warning("load of %s timed out; abandoned (%d abandoned loads still running)", name, self.abandoned)

        def done(f: "asyncio.Future[Model]") -> None:
            self.abandoned -= 1
            self.m_abandoned.dec()
            how = f"failed: {f.exception()}" if f.exception() is not None else "finished"
            log.warning("abandoned load of %s %s after its timeout; its result is dropped", name, how)

        load.add_done_callback(done)

    def unload(self, name: str) -> bool:
        e = self.models.pop(name, None)
        self.m_models.set(len(self.models))
        if e is not None:
            # Per-model series go with the model, so label cardinality follows what is loaded.
            for code in ("200", "400", "404", "500"):
                try:
                    self.m_requests.remove(name, code)
                except KeyError:
                    pass
            try:
                self.m_latency.remove(name)
            except KeyError:
                pass
        return e is not None

    def infer(self, name: str, req: codec.InferRequest, entry: Entry | None = None) -> dict[str, Any]:
        """Synchronous: runs on an inference thread (see `run`). `entry` is the model as `run`
        found it: a request that started before an unload finishes on the model it started
        with instead of looking it up again and getting a 404 (docs/design/placement.md)."""
        e = entry or self.get(name)
        t0 = time.perf_counter()
        out = e.model.predict(req)
        self.m_latency.labels(name).observe(time.perf_counter() - t0)
        return out

    async def run(self, name: str, work: Any) -> Any:
        """`work(entry)` on an inference thread: decoding, predicting and encoding all happen off
        the loop, since each can take seconds for a large batch. The model is looked up first, on
        the loop, so an unknown model is a 404 without a thread hop, and the counters the loader
        and placement read are updated on the loop only, when the request is done."""
        e = self.get(name)
        out = await asyncio.get_running_loop().run_in_executor(self._pool, work, e)
        e.requests += 1
        e.last_used = time.time()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def metadata(self, name: str) -> dict[str, Any]:
        e = self.get(name)
        md = e.model.metadata()
        return {"name": name, "versions": [], **md}

    def stats(self) -> dict[str, Any]:
        return {n: {"requests": e.requests, "last_used": e.last_used, "size": e.size} for n, e in self.models.items()}


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def build_rest_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    r = web.RouteTableDef()

    def model_name(request: web.Request) -> str:
        return request.headers.get(MODEL_ID_HEADER) or request.match_info["name"]

    @r.get("/v2/health/live")
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @r.get("/v2/health/ready")
    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    @r.get("/v2")
    async def server_md(_: web.Request) -> web.Response:
        return web.json_response({"name": rt.name, "version": "0.1.0", "extensions": ["model_repository"]})

    @r.get("/v2/models/{name}")
    @r.get("/v2/models/{name}/versions/{version}")
    async def model_md(request: web.Request) -> web.Response:
        try:
            return web.json_response(rt.metadata(model_name(request)))
        except LookupError as e:
            return _err(404, str(e))

    @r.get("/v2/models/{name}/ready")
    @r.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: web.Request) -> web.Response:
        name = model_name(request)
        if name not in rt.models:
            return _err(404, f"model '{name}' is not loaded on this runtime")
        return web.json_response({"name": name, "ready": True})

    @r.post("/v2/models/{name}/infer")
    @r.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: web.Request) -> web.Response:
        name = model_name(request)
        code = "200"
        try:
            raw = await request.read()

            def work(e: Entry) -> bytes:
                req = codec.decode_json_request(raw)
                return codec.encode_json_response(name, req, rt.infer(name, req, e))

            body = await rt.run(name, work)
            return web.Response(body=body, content_type="application/json")
        except LookupError as e:
            code = "404"
            return _err(404, str(e))
        except codec.CodecError as e:
            code = "400"
            return _err(400, str(e))
        except web.HTTPRequestEntityTooLarge:
            code = "413"
            return _err(413, f"request body is larger than the {MAX_BODY_BYTES >> 20} MiB limit")
        except Exception as e:  # a model's own bug must not take the runtime down
            code = "500"
            log.exception("inference failed for %s", name)
            return _err(500, f"model '{name}' failed: {type(e).__name__}: {e}")
        finally:
            rt.m_requests.labels(name, code).inc()

    @r.post("/v2/repository/index")
    async def index(_: web.Request) -> web.Response:
        return web.json_response([{"name": n, "state": "READY"} for n in rt.models])

    @r.post("/v2/repository/models/{name}/load")
    async def load(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = json.loads(await request.read() or b"{}")
            params = body.get("parameters") or {}
            size = await rt.load(name, str(params.get("format", "")), str(params["path"]), params)
        except (ValueError, KeyError, TypeError) as e:
            return _err(400, f"load needs JSON {{'parameters': {{'path', 'format'}}}}: {e}")
        except ModelLoadError as e:
            return _err(400, str(e))
        except LoadTimeout as e:
            return _err(504, str(e))
        except Exception as e:
            log.exception("load failed for %s", name)
            return _err(500, f"load of '{name}' failed: {type(e).__name__}: {e}")
        return web.json_response({"name": name, "size_bytes": size})

    @r.post("/v2/repository/models/{name}/unload")
    async def unload(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not rt.unload(name):
            return _err(404, f"model '{name}' is not loaded")
        return web.json_response({})

    @r.get("/v2/meshserve/stats")
    async def stats(_: web.Request) -> web.Response:
        return web.json_response(rt.stats())

    @r.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(rt.registry), content_type="text/plain")

    app.add_routes(r)
    return app


class GrpcServicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    @staticmethod
    def _name(context: grpc.aio.ServicerContext, fallback: str) -> str:
        for k, v in context.invocation_metadata() or ():
            if k == MODEL_ID_HEADER:
                return v
        return fallback

    async def ServerLive(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=self.rt.name, version="0.1.0", extensions=["model_repository"])

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self._name(context, request.name) in self.rt.models)

    async def ModelMetadata(self, request, context):  # noqa: N802
        name = self._name(context, request.name)
        try:
            md = self.rt.metadata(name)
        except LookupError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        resp = pb.ModelMetadataResponse(name=name, platform=md.get("platform", ""))
        for t in md.get("inputs", []):
            resp.inputs.add(**t)
        for t in md.get("outputs", []):
            resp.outputs.add(**t)
        return resp

    async def ModelInfer(self, request, context):  # noqa: N802
        name = self._name(context, request.model_name)
        code = "200"
        try:
            def work(e: Entry) -> pb.ModelInferResponse:
                return codec.encode_grpc_response(name, request.id, self.rt.infer(name, codec.decode_grpc_request(request), e))

            return await self.rt.run(name, work)
        except LookupError as e:
            code = "404"
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except codec.CodecError as e:
            code = "400"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.rt.m_requests.labels(name, code).inc()

    async def RepositoryIndex(self, request, context):  # noqa: N802
        resp = pb.RepositoryIndexResponse()
        for n in self.rt.models:
            resp.models.add(name=n, state="READY")
        return resp

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        params = {k: v.string_param or v.int64_param for k, v in request.parameters.items()}
        try:
            await self.rt.load(request.model_name, str(params.get("format", "")), str(params.get("path", "")), params)
        except ModelLoadError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LoadTimeout as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        if not self.rt.unload(request.model_name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model_name}' is not loaded")
        return pb.RepositoryModelUnloadResponse()


GRPC_MAX_MESSAGE = 64 << 20


def _preimport() -> None:
    # Import the heavy libraries once at start, so a model's measured size is the model's own
    # memory, not the libraries its first load happened to import, and cold starts skip it.
    import joblib  # noqa: F401
    import sklearn.svm  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.ensemble  # noqa: F401


def _preimport_more() -> None:
    # The other formats' libraries (~3 s of imports on a busy 2-core box) warm up after the
    # server answers, so the pod is up sooner; loads wait for them (Runtime.warm).
    import xgboost  # noqa: F401
    import lightgbm  # noqa: F401
    import onnxruntime  # noqa: F401


async def serve(host: str, rest_port: int, grpc_port: int, allow_executable: bool = True, load_timeout: float = 0.0) -> None:
    await asyncio.get_running_loop().run_in_executor(None, _preimport)
    rt = Runtime(allow_executable=allow_executable, load_timeout=load_timeout)
    rt.warm = asyncio.get_running_loop().run_in_executor(None, _preimport_more)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", GRPC_MAX_MESSAGE), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
    )
    pbg.add_GRPCInferenceServiceServicer_to_server(GrpcServicer(rt), server)
    server.add_insecure_port(f"{host}:{grpc_port}")
    await server.start()
    runner = web.AppRunner(build_rest_app(rt), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, rest_port, backlog=1024).start()
    log.info("built-in runtime serving REST on %s:%d, gRPC on %s:%d", host, rest_port, host, grpc_port)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(1)
        await runner.cleanup()
        rt.close()
