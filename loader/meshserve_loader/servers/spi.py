"""Runtimes written for ModelMesh's `ModelRuntime` gRPC SPI, driven by the loader agent.

`SpiAdapter` is the agent's side: the runtime runs beside the agent (its own container, on
builtInAdapter.runtimeManagementPort, never started by the loader) and its runtimeStatus sets
the pod's capacity, load concurrency and timeout, as in ModelMesh. `SpiClient` speaks the SPI;
`SpiServer` is a small SPI server of our own around the built-in formats, to test the client
against a real gRPC server and as an example for runtime authors.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from meshserve_loader.builtin.formats import ModelLoadError, load_model
from meshserve_loader.limiter import LimitingProxy, ModelLimits
from meshserve_loader.servers.base import Adapter, Endpoints, Terms
from meshserve_loader.storage import predict_size
from meshserve_proto import model_runtime_pb2 as mr
from meshserve_proto import model_runtime_pb2_grpc as mrg


@dataclass
class RuntimeStatus:
    ready: bool
    capacity_bytes: int
    max_loading: int
    loading_timeout_ms: int
    default_model_size: int
    version: str
    limit_model_concurrency: bool = False  # each load answers the model's maxConcurrency


class SpiClient:
    kind = "modelruntime"

    def __init__(self, target: str):
        self.target = target
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = mrg.ModelRuntimeStub(self.channel)
        self.loaded: dict[str, int] = {}  # the SPI has no index: we track what we loaded
        # Set (by `limit_concurrency`) when the runtime limits per-model concurrency: each
        # load's maxConcurrency is enforced by the pass-through in front of its data endpoint.
        self.limits: ModelLimits | None = None
        self._proxy: LimitingProxy | None = None

    async def limit_concurrency(self, limits: ModelLimits, host: str, port: int, data_target: str) -> int:
        """Serve the pod's gRPC on host:port (0: the kernel's pick) through a pass-through to
        `data_target` that holds each model to the maxConcurrency its load answered; the port."""
        self.limits = limits
        self._proxy = LimitingProxy(limits, data_target)
        return await self._proxy.start(host, port)

    async def close(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()
        await self.channel.close()

    async def status(self, timeout: float = 5.0) -> RuntimeStatus:
        r = await self.stub.runtimeStatus(mr.RuntimeStatusRequest(), timeout=timeout)
        return RuntimeStatus(r.status == mr.RuntimeStatusResponse.READY, r.capacity_in_bytes, r.max_loading_concurrency,
                             r.model_loading_timeout_ms, r.default_model_size_in_bytes, r.runtime_version, r.limit_model_concurrency)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.status(timeout=2.0)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ModelRuntime at {self.target} not READY after {timeout:g}s")
            await asyncio.sleep(0.2)

    async def predict_size(self, model_id: str, params: dict[str, Any]) -> int:
        try:
            r = await self.stub.predictModelSize(_predict_req(model_id, params), timeout=5.0)
            return int(r.size_in_bytes)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # optional in the SPI
                return 0
            raise RuntimeError(f"predictModelSize of {model_id}: {e.code().name}: {e.details()}") from None

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        req = mr.LoadModelRequest(model_id=model_id, model_type=str(params.get("format", "")), model_path=str(params["path"]),
                                  model_key=json.dumps({"storage_key": params.get("storage_key", "")}))
        try:
            r = await self.stub.loadModel(req, timeout=timeout)
            size = int(r.size_in_bytes)
            if not size:
                size = int((await self.stub.modelSize(mr.ModelSizeRequest(model_id=model_id), timeout=30.0)).size_in_bytes)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The SPI's contract: after a cancelled load, unload so nothing stays behind.
                await self.unload(model_id)
                raise asyncio.TimeoutError() from None
            raise RuntimeError(f"ModelRuntime could not load {model_id}: {e.code().name}: {e.details()}") from None
        self.loaded[model_id] = size
        if self.limits is not None:
            self.limits.set(model_id, int(r.max_concurrency))
        return size

    async def unload(self, model_id: str) -> None:
        try:
            await self.stub.unloadModel(mr.UnloadModelRequest(model_id=model_id), timeout=60.0)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise RuntimeError(f"ModelRuntime could not unload {model_id}: {e.code().name}: {e.details()}") from None
        self.loaded.pop(model_id, None)
        if self.limits is not None:
            self.limits.drop(model_id)

    async def stats(self) -> dict[str, Any]:
        return {m: {"size": s} for m, s in self.loaded.items()}


class SpiAdapter(Adapter):
    kind = "modelruntime"

    async def start(self) -> Endpoints:
        s, spec = self.settings, self.spec
        if not spec.runtime_management_port:
            raise SystemExit(f"runtime {spec.name!r}: a modelruntime needs builtInAdapter.runtimeManagementPort (its SPI gRPC port)")
        self.client = client = SpiClient(f"{s.host}:{spec.runtime_management_port}")
        await client.wait_ready(120)
        status = await client.status()
        rest, grpc_port, _ = s.pod_ports(self.index)
        if s.ephemeral_pod_ports:
            # Nothing of ours serves REST for an SPI runtime; the number is held so it stays unused.
            rest = self.server_ports(1, (0,))[0]
        if status.limit_model_concurrency:
            # Envoy reaches this pod's gRPC through the limiting pass-through (limiter.py), which
            # forwards to the runtime's data endpoint (grpcDataEndpoint, else its SPI port).
            data = spec.grpc_data_port or spec.runtime_management_port
            if data == grpc_port:
                raise SystemExit(f"runtime {spec.name!r} limits per-model concurrency, so the pod's gRPC port {grpc_port} is the "
                                 f"loader's pass-through; serve inference on another port (grpcDataEndpoint)")
            grpc_port = await client.limit_concurrency(ModelLimits(s.request_queue_timeout_seconds, self.metrics.registry), s.host,
                                                       grpc_port, f"{s.host}:{data}")
        elif spec.grpc_data_port:
            grpc_port = spec.grpc_data_port  # Envoy goes straight to the runtime's data endpoint
        elif s.ephemeral_pod_ports:
            grpc_port = spec.runtime_management_port  # the SPI port serves inference too
        self.terms = Terms(status.capacity_bytes, status.max_loading, status.loading_timeout_ms)
        self.endpoints = Endpoints(rest, grpc_port)
        return self.endpoints


def _predict_req(model_id: str, params: dict[str, Any]) -> mr.PredictModelSizeRequest:
    return mr.PredictModelSizeRequest(model_id=model_id, model_type=str(params.get("format", "")), model_path=str(params.get("path", "")))


@dataclass
class SpiServer(mrg.ModelRuntimeServicer):
    """A ModelRuntime around the built-in formats. Sizes are the file size x 1.25 (cheap and
    conservative, as the SPI asks of predictModelSize), reported with loadModel."""

    capacity_bytes: int = 1 << 30
    max_loading: int = 1
    loading_timeout_ms: int = 30_000
    models: dict[str, tuple[Any, int]] = field(default_factory=dict)

    async def runtimeStatus(self, request, context):  # noqa: N802 (SPI method names)
        # The SPI asks a runtime to purge what it holds when asked at start (the caller restarted).
        self.models.clear()
        return mr.RuntimeStatusResponse(
            status=mr.RuntimeStatusResponse.READY, capacity_in_bytes=self.capacity_bytes, max_loading_concurrency=self.max_loading,
            model_loading_timeout_ms=self.loading_timeout_ms, default_model_size_in_bytes=1 << 20, runtime_version="meshserve-spi-example",
        )

    async def loadModel(self, request, context):  # noqa: N802
        path = Path(request.model_path)
        try:
            model = await asyncio.get_running_loop().run_in_executor(None, load_model, request.model_type, path, {})
        except ModelLoadError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        size = predict_size(path, request.model_type)
        self.models[request.model_id] = (model, size)
        return mr.LoadModelResponse(size_in_bytes=size)

    async def unloadModel(self, request, context):  # noqa: N802
        self.models.pop(request.model_id, None)
        return mr.UnloadModelResponse()

    async def predictModelSize(self, request, context):  # noqa: N802
        return mr.PredictModelSizeResponse(size_in_bytes=predict_size(Path(request.model_path), request.model_type))

    async def modelSize(self, request, context):  # noqa: N802
        entry = self.models.get(request.model_id)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_id!r} is not loaded")
        return mr.ModelSizeResponse(size_in_bytes=entry[1])


async def serve_spi(servicer: SpiServer, host: str, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """The SPI server on host:port (0: the kernel's pick) and the port it listens on."""
    server = grpc.aio.server()
    mrg.add_ModelRuntimeServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
