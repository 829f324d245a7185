"""The built-in runtime process: KServe v2 REST (aiohttp) and gRPC (grpcio) over one model table.

The model to serve is the `mm-model-id` header when present (the gateway sets it from the
alias), else the name in the path or message. Loads come through the repository extension,
which is also how the loader drives MLServer and Triton.

Two listeners, because the data port is reachable from every peer of the pod network: the data
port (REST and gRPC, the pod's address) serves inference, health, stats and metrics only; the
repository API (load, unload, index) is on a REST control port bound to 127.0.0.1, which only
the loader beside the runtime reaches. A load must name a path under the runtime's allowed roots
(its pod's disk cache, the PVC root, configured model roots), checked after resolving symlinks
and `..` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import hdrs, web
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshserve.httpbody import drain
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_loader.builtin import binary, codec
from meshserve_loader.builtin.footprint import footprint
from meshserve_loader.builtin.formats import BASE_OBJECT, Model, ModelLoadError, load_model
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

log = logging.getLogger("meshserve.runtime")

MODEL_ID_HEADER = "mm-model-id"
MAX_BODY_BYTES = MAX_REQUEST_BYTES


class LoadTimeout(TimeoutError):
    """A load did not finish within its timeout; the runtime gave up on it."""


class PathRefused(ModelLoadError):
    """A load named a path outside the runtime's allowed roots."""


def confine(path: str, roots: "list[Path] | tuple[Path, ...]") -> Path:
    """`path` resolved (symlinks, `..`), if it lies in one of `roots` (resolved themselves);
    else PathRefused. Without the check a load could read any file the runtime can (the
    storage-config, service-account tokens) and serve it back through a `string` model."""
    if not path:
        raise PathRefused("a load needs a path")
    target = Path(path).resolve()
    for root in roots:
        r = Path(root).resolve()
        if target == r or r in target.parents:
            return target
    raise PathRefused(f"path {path!r} is outside this runtime's model roots; it loads only from its pod's disk cache and storage roots")


class ModelNotFound(LookupError):
    """No such model here. Its own class, so that a model's IndexError or KeyError (also
    LookupErrors) is never mistaken for it and answered 404."""


class BodyTooLarge(ValueError):
    """A request body that decompresses to more than MAX_BODY_BYTES."""


class UnsupportedEncoding(ValueError):
    """A Content-Encoding the runtime does not decode."""


# zlib's wbits per HTTP content coding: gzip framing, and zlib framing for "deflate" (RFC 9110).
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(raw: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body with its Content-Encoding undone, never more than `limit` bytes.

    Called on an inference thread: aiohttp's own decompression runs on the event loop and a
    gzip bomb stalled the whole runtime (health included) for seconds. Decoding stops at
    limit + 1 bytes of output, so a bomb costs at most that much memory and time."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return raw
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body")
    out: list[bytes] = []
    size, data = 0, raw
    # gzip allows several members back to back (`cat a.gz b.gz`); each round decodes one.
    while data:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise codec.CodecError(f"request body is not valid {coding} data ({e}); is Content-Encoding right?") from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body decompresses to more than the {limit >> 20} MiB limit")
        out.append(chunk)
        if not d.eof:
            raise codec.CodecError(f"request body is truncated {coding} data")
        data = d.unused_data
    return b"".join(out)


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


def load_and_size(fmt: str, path: Path, params: dict[str, Any], allow_executable: bool) -> tuple[Model, int]:
    """Load a model and size it: its objects' footprint, never less than the loader's prediction
    (`predicted_size`, disk size x 1.25 or the size the user stated).

    Not the RSS delta: with inference on other threads and allocator arenas growing or reusing
    pages, identical files measured 0 to 16 MB (docs/design/loader.md). The footprint is the
    same for identical files; the prediction covers what it cannot see (native formats' memory
    behind a handle). Runs on the load's thread: the walk of a large model takes a while."""
    model = load_model(fmt, path, params, allow_executable)
    return model, max(footprint(model), int(params.get("predicted_size") or 0))


def load_with_base(fmt: str, path: Path, params: dict[str, Any], allow_executable: bool, base: "SharedBase | None",
                   base_path: Path | None) -> "tuple[Model, int, SharedBase | None]":
    """Load a model that may share a base (issue 17): an adapter over `base` (the resident one)
    or over the base at `base_path`, loaded here first when none is resident. Returns the model,
    its size and the base when this load brought it in.

    An adapter's size is its own objects (the shared base is not walked), plus the base's when
    this load brought the base: placement books sizes per model today, so the first adapter on
    a pod carries its base's memory (adapter-aware placement is the next step, issue 17 item 2)."""
    new: SharedBase | None = None
    if base is None and base_path is not None:
        bmodel, bsize = load_and_size(str(params.get("base_format") or "sentence-transformers"), base_path,
                                      {"predicted_size": int(params.get("base_predicted_size") or 0)}, allow_executable)
        base = new = SharedBase(bmodel, bsize, str(base_path))
    if base is None:
        model, size = load_and_size(fmt, path, params, allow_executable)
        return model, size, None
    model = load_model(fmt, path, {**params, BASE_OBJECT: base.model}, allow_executable)
    size = max(footprint(model, skip=(base.model,)), int(params.get("predicted_size") or 0))
    return model, size + (new.size if new else 0), new


@dataclass
class SharedBase:
    """A base model loaded once per runtime and shared by its adapters (and by the base's own
    registered model, when placement puts that here too). Kept while any of them is loaded."""

    model: Model
    size: int
    key: str  # its resolved path
    users: set[str] = field(default_factory=set)


# The formats whose loaded model can be a shared base, and those that need one.
BASE_FORMATS = frozenset({"sentence-transformers"})


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
    # Where loads may come from (see `confine`). None: anywhere, for in-process use by tests
    # and tools; `serve` always sets it.
    allowed_roots: "tuple[Path, ...] | None" = None
    # resolved path -> a base loaded once and shared (issue 17); model name -> the base it uses
    bases: dict[str, SharedBase] = field(default_factory=dict)
    base_of: dict[str, str] = field(default_factory=dict)

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
            raise ModelNotFound(f"model '{name}' is not loaded on this runtime")
        return e

    async def load(self, name: str, fmt: str, path: str, params: dict[str, Any]) -> int:
        if self.allowed_roots is not None:
            # Before the already-loaded shortcut too: a refused path must be refused every time.
            path = str(confine(path, self.allowed_roots))
        base_path = params.get("base_path")
        if base_path:
            base_path = str(confine(str(base_path), self.allowed_roots)) if self.allowed_roots is not None else str(Path(str(base_path)).resolve())
        if name in self.models:
            return self.models[name].size
        timeout = float(params.get("timeout_seconds") or self.load_timeout or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        load: "asyncio.Future[tuple[Model, int, SharedBase | None]] | None" = None
        try:
            # The deadline covers the wait for the lock too, and leaving by it releases the lock:
            # a load that hangs holds up the loads behind it for its timeout at most.
            async with asyncio.timeout_at(deadline):
                # One load at a time: a pod's loads are bounded anyway, and a load's imports and
                # allocations never race another's.
                async with self._load_lock:
                    if name in self.models:  # loaded by a request for it that came first
                        return self.models[name].size
                    if self.warm is not None:
                        try:
                            await asyncio.shield(self.warm)
                        except ImportError as e:  # a missing optional library fails only its own format
                            log.warning("format library unavailable: %s", e)
                        self.warm = None
                    base, key = self._base_for(fmt, path, params, base_path)
                    if base is not None and fmt.lower() in BASE_FORMATS:  # the base itself, already resident
                        model, size, new = base.model, base.size, None
                    else:
                        load = _in_thread(load_with_base, fmt, Path(path), params, self.allow_executable, base,
                                          Path(base_path) if base_path and base is None else None)
                        model, size, new = await asyncio.shield(load)
        except TimeoutError:
            if load is None:
                raise LoadTimeout(f"load of '{name}' did not start within {timeout:g}s: an earlier load still holds the runtime") from None
            self._abandon(name, load)
            raise LoadTimeout(f"load of '{name}' did not finish within {timeout:g}s; the runtime gave up on it") from None
        if new is not None:
            base = self.bases.setdefault(new.key, new)
            log.info("loaded base %s for %s, shared by its adapters (size=%d)", new.key, name, new.size)
        elif key is not None and fmt.lower() in BASE_FORMATS:
            base = self.bases.setdefault(key, SharedBase(model, size, key))
        if base is not None:
            base.users.add(name)
            self.base_of[name] = base.key
        self.models[name] = Entry(model, size, time.time())
        self.m_models.set(len(self.models))
        log.info("loaded model %s (%s) size=%d", name, fmt, size)
        return size

    def _base_for(self, fmt: str, path: str, params: dict[str, Any], base_path: str | None) -> "tuple[SharedBase | None, str | None]":
        """The resident base this load shares, if any, and the key a base loaded now goes by.
        A base model is keyed by its resolved path; an adapter names its base's path
        (`base_path`) or, failing that, a resident model (`base_model`)."""
        if fmt.lower() in BASE_FORMATS:
            key = str(Path(path).resolve())
            return self.bases.get(key), key
        if base_path:
            return self.bases.get(base_path), base_path
        named = str(params.get("base_model") or "")
        if named and named in self.base_of:
            return self.bases.get(self.base_of[named]), None
        return None, None

    def _abandon(self, name: str, load: "asyncio.Future[tuple[Model, int]]") -> None:
        """A timed-out load keeps running in its thread (Python cannot stop it). Its result is
        dropped whenever it comes, so the runtime never holds a model nobody placed."""
        self.abandoned += 1
        self.m_abandoned.inc()
        log.warning("load of %s timed out; abandoned (%d abandoned loads still running)", name, self.abandoned)

        def done(f: "asyncio.Future[tuple[Model, int]]") -> None:
            self.abandoned -= 1
            self.m_abandoned.dec()
            how = f"failed: {f.exception()}" if f.exception() is not None else "finished"
            log.warning("abandoned load of %s %s after its timeout; its result is dropped", name, how)

        load.add_done_callback(done)

    def unload(self, name: str) -> bool:
        e = self.models.pop(name, None)
        self.m_models.set(len(self.models))
        key = self.base_of.pop(name, None)
        base = self.bases.get(key) if key else None
        if base is not None:
            base.users.discard(name)
            if not base.users:  # nothing shares it any more: its memory goes with the last user
                del self.bases[key]
                log.info("unloaded base %s: no adapter uses it any more", key)
        if e is not None:
            # Per-model series go with the model, so label cardinality follows what is loaded.
            for code in ("200", "400", "404", "413", "415", "500"):
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


CONTROL_HOST = "127.0.0.1"
REPOSITORY_ELSEWHERE = "the repository API (load, unload, index) is served only on the runtime's loopback control port, to the loader beside it"


def _add_read_only(r: web.RouteTableDef, rt: Runtime) -> None:
    """Health and stats on both listeners: placement probes and polls them on the data port,
    the loader on its own."""

    @r.get("/v2/health/live")
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @r.get("/v2/health/ready")
    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    @r.get("/v2/meshserve/stats")
    async def stats(_: web.Request) -> web.Response:
        return web.json_response(rt.stats())


def build_control_app(rt: Runtime) -> web.Application:
    """The loader's API: the repository extension plus health and stats. Bound to loopback only
    (`serve`): whoever can load can read any allowed file back through a `string` model."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    r = web.RouteTableDef()

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
        except PathRefused as e:
            log.warning("refused load of %s: %s", name, e)
            return _err(403, str(e))
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

    _add_read_only(r, rt)
    app.add_routes(r)
    return app


def build_rest_app(rt: Runtime) -> web.Application:
    # No automatic decompression: aiohttp would inflate on the event loop (decode_body).
    app = web.Application(client_max_size=MAX_BODY_BYTES, handler_args={"auto_decompress": False})
    r = web.RouteTableDef()

    def model_name(request: web.Request) -> str:
        return request.headers.get(MODEL_ID_HEADER) or request.match_info["name"]

    @r.get("/v2")
    async def server_md(_: web.Request) -> web.Response:
        # The repository API is not on this port (the loopback control port has it).
        return web.json_response({"name": rt.name, "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    @r.get("/v2/models/{name}")
    @r.get("/v2/models/{name}/versions/{version}")
    async def model_md(request: web.Request) -> web.Response:
        try:
            return web.json_response(rt.metadata(model_name(request)))
        except ModelNotFound as e:
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
            encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
            header_len = request.headers.get(binary.HEADER)

            def work(e: Entry) -> tuple[bytes, int | None]:
                data = decode_body(raw, encoding)
                if header_len is not None:  # Triton's binary tensor extension
                    req, wants = binary.decode_request(data, binary.parse_header_length(header_len, len(data)))
                else:
                    req = codec.decode_json_request(data)
                    # Binary outputs can be asked for by a plain JSON request too.
                    wants = binary.output_wants(json.loads(data)) if b"binary_data" in data else binary.OutputWants()
                return binary.encode_response(name, req, rt.infer(name, req, e), wants)

            body, json_len = await rt.run(name, work)
            if json_len is None:
                return web.Response(body=body, content_type="application/json")
            return web.Response(body=body, content_type="application/octet-stream", headers={binary.HEADER: str(json_len)})
        except ModelNotFound as e:
            code = "404"
            return _err(404, str(e))
        except codec.CodecError as e:
            code = "400"
            return _err(400, str(e))
        except web.HTTPRequestEntityTooLarge:
            code = "413"
            await drain(request)
            return _err(413, f"request body is larger than the {MAX_BODY_BYTES >> 20} MiB limit")
        except BodyTooLarge as e:
            code = "413"
            return _err(413, str(e))
        except UnsupportedEncoding as e:
            code = "415"
            return _err(415, str(e))
        except Exception as e:  # a model's own bug must not take the runtime down
            code = "500"
            log.exception("inference failed for %s", name)
            return _err(500, f"model '{name}' failed: {type(e).__name__}: {e}")
        finally:
            rt.m_requests.labels(name, code).inc()

    @r.route("*", "/v2/repository{tail:.*}")
    async def repository(_: web.Request) -> web.Response:
        # Said plainly rather than a bare 404, so whoever drives this runtime finds the right port.
        return _err(403, REPOSITORY_ELSEWHERE)

    from meshserve_loader.builtin import openai_api

    openai_api.add_routes(r, rt)  # /v1/embeddings and friends (issue 17)
    _add_read_only(r, rt)

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
        return pb.ServerMetadataResponse(name=self.rt.name, version="0.1.0", extensions=["binary_tensor_data"])

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self._name(context, request.name) in self.rt.models)

    async def ModelMetadata(self, request, context):  # noqa: N802
        name = self._name(context, request.name)
        try:
            md = self.rt.metadata(name)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        resp = pb.ModelMetadataResponse(name=name, platform=md.get("platform", ""))
        for t in md.get("inputs", []):
            resp.inputs.add(**t)
        for t in md.get("outputs", []):
            resp.outputs.add(**t)
        return resp

    async def ModelInfer(self, request: bytes, context):  # noqa: N802
        """`request` is the serialized message (add_servicer): parsed here, off the loop, so a
        malformed one is INVALID_ARGUMENT with a plain message."""
        name = self._name(context, "")
        code = "200"
        try:
            msg: pb.ModelInferRequest | None = None
            if not name:  # no routing header: the name is inside the message
                msg = await asyncio.get_running_loop().run_in_executor(self.rt._pool, parse_infer_request, request)
                name = msg.model_name

            def work(e: Entry) -> bytes:
                m = msg if msg is not None else parse_infer_request(request)
                out = self.rt.infer(name, codec.decode_grpc_request(m), e)
                if m.raw_input_contents:  # raw in, raw out (see binary.py)
                    return binary.raw_grpc_response(name, m.id, out).SerializeToString()
                return codec.encode_grpc_response(name, m.id, out).SerializeToString()

            return await self.rt.run(name, work)
        except ModelNotFound as e:
            code = "404"
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except codec.CodecError as e:
            code = "400"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # a model's own bug: INTERNAL with its message, never a traceback
            code = "500"
            log.exception("inference failed for %s", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"model '{name}' failed: {type(e).__name__}: {e}")
        finally:
            self.rt.m_requests.labels(name, code).inc()

    # The gRPC port is the data port, reachable from the pod network: no repository API here (the
    # loader uses the REST control port).
    async def RepositoryIndex(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)


GRPC_MAX_MESSAGE = MAX_REQUEST_BYTES


def parse_infer_request(data: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as e:
        raise codec.CodecError(f"request is not a valid ModelInferRequest message ({e})") from None


def _identity(b: bytes) -> bytes:
    return b


def add_servicer(server: grpc.aio.Server, servicer: GrpcServicer) -> None:
    """The generated add_GRPCInferenceServiceServicer_to_server, except that ModelInfer takes
    and returns bytes. grpc would parse the request before the handler and turn a malformed one
    into UNKNOWN with a Python exception's name in its details; the handler parses it instead
    (on an inference thread, as it serializes the response there)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for m in service.methods:
        raw = m.name == "ModelInfer"
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_identity if raw else getattr(pb, m.input_type.name).FromString,
            response_serializer=_identity if raw else getattr(pb, m.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _preimport() -> None:
    # Import the heavy libraries once at start, so a model's measured size is the model's own
    # memory, not the libraries its first load happened to import, and cold starts skip it.
    from meshserve.extras import needs

    with needs("runtime", "the built-in runtime"):
        import joblib  # noqa: F401
        import sklearn.svm  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        import sklearn.ensemble  # noqa: F401


def _preimport_more() -> None:
    # The other formats' libraries (~3 s of imports on a busy 2-core box) warm up after the
    # server answers, so the pod is up sooner; loads wait for them (Runtime.warm).
    from meshserve.extras import needs

    with needs("runtime", "the built-in runtime"):
        import xgboost  # noqa: F401
        import lightgbm  # noqa: F401
        import onnxruntime  # noqa: F401


async def serve(host: str, rest_port: int, grpc_port: int, allow_executable: bool = True, load_timeout: float = 0.0,
                control_port: int = 0, allowed_roots: "list[Path] | tuple[Path, ...]" = (), ports_file: Path | None = None) -> None:
    """Data listeners on `host` (the pod IP in a cluster), the control listener on 127.0.0.1
    whatever `host` is. Loads only from `allowed_roots`: none given, none succeed. A port of 0
    is the kernel's pick; with `ports_file`, the ports bound are written there once all three
    listen (servers/builtin.py reads it: the loader advertises those)."""
    await asyncio.get_running_loop().run_in_executor(None, _preimport)
    roots = tuple(Path(p).resolve() for p in allowed_roots)
    rt = Runtime(allow_executable=allow_executable, load_timeout=load_timeout, allowed_roots=roots)
    rt.warm = asyncio.get_running_loop().run_in_executor(None, _preimport_more)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", GRPC_MAX_MESSAGE), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
    )
    add_servicer(server, GrpcServicer(rt))
    grpc_bound = server.add_insecure_port(f"{host}:{grpc_port}")
    if not grpc_bound:
        raise OSError(f"gRPC could not listen on {host}:{grpc_port}")
    await server.start()
    runner = web.AppRunner(build_rest_app(rt), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, rest_port, backlog=1024).start()
    control = web.AppRunner(build_control_app(rt), access_log=None)
    await control.setup()
    await web.TCPSite(control, CONTROL_HOST, control_port).start()
    bound = {"rest": runner.addresses[0][1], "grpc": grpc_bound, "control": control.addresses[0][1]}
    if ports_file is not None:
        tmp = ports_file.with_name(ports_file.name + ".tmp")
        tmp.write_text(json.dumps(bound))
        tmp.replace(ports_file)  # whole or absent: the loader polls for it
    log.info("built-in runtime serving REST on %s:%d, gRPC on %s:%d, control (repository API) on %s:%d; loads from %s",
             host, bound["rest"], host, grpc_bound, CONTROL_HOST, bound["control"], ", ".join(map(str, roots)) or "nowhere")
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(1)
        await runner.cleanup()
        await control.cleanup()
        rt.close()
