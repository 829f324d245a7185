"""Per-model request concurrency, for runtimes that declare a limit (issue 5).

A ModelMesh SPI runtime that answers `runtimeStatus` with `limitModelConcurrency` gives each
model a `maxConcurrency` in its `loadModel` answer, and expects the mesh to hold a model's
requests beyond it. ModelMesh does that in its own container, on the data path of every
request. Here it is a gRPC pass-through in the loader, started only for such a runtime: the pod
registers the proxy's port, so Envoy's requests for that pod come through it, wait for one of
their model's slots (up to a queue timeout, then RESOURCE_EXHAUSTED) and go on, bytes
untouched, to the runtime's data endpoint. Pods of every other runtime keep Envoy -> runtime
with no Python on the path.

The limit is per pod, as ModelMesh's is: each copy of a model takes that many requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from meshserve import wire
from meshserve.headers import MODEL_ID_HEADER, VMODEL_ID_HEADER

log = logging.getLogger("meshserve.loader.limiter")

DEFAULT_QUEUE_TIMEOUT_S = 30.0


class Overloaded(Exception):
    """A request waited its whole queue timeout for a slot of its model."""


class ModelLimits:
    """model -> at most this many requests at once; models without a limit pass straight on."""

    def __init__(self, queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S, registry: CollectorRegistry | None = None):
        self.queue_timeout_s = queue_timeout_s
        self.limits: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        # The loader's labels stay bounded (metrics.py): totals, not per model.
        r = registry if registry is not None else CollectorRegistry()
        self.m_waiting = Gauge("meshserve_loader_requests_waiting", "Requests waiting for a slot of their model's concurrency limit", registry=r)
        self.m_refused = Counter("meshserve_loader_requests_refused", "Requests refused after waiting the whole queue timeout for a slot", registry=r)

    def set(self, model: str, limit: int) -> None:
        """0 (or less) means no limit. Requests in flight keep the slot they hold."""
        if limit > 0:
            self.limits[model] = limit
            self._slots[model] = asyncio.Semaphore(limit)
        else:
            self.drop(model)

    def drop(self, model: str) -> None:
        self.limits.pop(model, None)
        self._slots.pop(model, None)

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        sem = self._slots.get(model)
        if sem is None:
            yield
            return
        self.m_waiting.inc()
        try:
            await asyncio.wait_for(sem.acquire(), self.queue_timeout_s)
        except TimeoutError:
            self.m_refused.inc()
            raise Overloaded(
                f"model '{model}' is at its concurrency limit of {self.limits.get(model, '?')} requests and none finished "
                f"within {self.queue_timeout_s:g}s; retry later, or add copies (meshserve.io/minCopies)"
            ) from None
        finally:
            self.m_waiting.dec()
        try:
            yield
        finally:
            sem.release()


# The v2 methods whose request names the model in field 1 (model_name / name).
NAMED_METHODS = frozenset(f"/inference.GRPCInferenceService/{m}" for m in ("ModelInfer", "ModelMetadata", "ModelReady"))
# Streams of ModelInferRequest both ways (Triton's and MLServer's ModelStreamInfer); each
# request names its model in field 1, as ModelInfer's.
STREAM_METHODS = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})


def renamed(request: bytes, model_id: str) -> bytes:
    """The request with field 1 (the model's name) set to `model_id`, without parsing it: a
    singular field that occurs twice takes its last value (protobuf's merge rule), so one more
    field 1 at the end wins over the client's alias. A tensor of any size is left untouched."""
    return request + wire.length_delimited(1, model_id.encode())


def _model_of(metadata: Any) -> str:
    md = {k: v for k, v in (metadata or ())}
    return str(md.get(MODEL_ID_HEADER) or md.get(VMODEL_ID_HEADER) or "")


class _Forward(grpc.GenericRpcHandler):
    """Every unary method, and ModelStreamInfer, as bytes, to the same method upstream."""

    def __init__(self, channel: grpc.aio.Channel, limits: ModelLimits, rename: bool = False):
        self.channel, self.limits, self.rename = channel, limits, rename
        self._upstream: dict[str, Any] = {}  # method -> its callable on the channel, made once

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        model = _model_of(details.invocation_metadata)
        md_ = {k: v for k, v in (details.invocation_metadata or ())}
        named = method in NAMED_METHODS or method in STREAM_METHODS
        concrete = str(md_.get(MODEL_ID_HEADER) or "") if self.rename and named else ""
        if method in STREAM_METHODS:
            return self._stream(method, model, concrete)
        upstream = self._upstream.get(method)
        if upstream is None:
            upstream = self._upstream[method] = self.channel.unary_unary(method)  # no (de)serializers: bytes through

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            md = [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(("grpc-", ":")) and k != "user-agent"]
            try:
                async with self.limits.slot(model):
                    remaining = context.time_remaining()
                    return await upstream(renamed(request, concrete) if concrete else request, metadata=md, timeout=remaining if remaining is not None and remaining < 1e9 else None)
            except Overloaded as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
            raise AssertionError("unreachable")  # abort raises

        return grpc.unary_unary_rpc_method_handler(call)

    def _stream(self, method: str, model: str, concrete: str) -> grpc.RpcMethodHandler:
        """A stream both ways: each request renamed as a unary one, each answer passed on as
        it comes. The stream holds one of its model's slots while it lasts."""
        upstream = self._upstream.get(method)
        if upstream is None:
            upstream = self._upstream[method] = self.channel.stream_stream(method)

        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            md = [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(("grpc-", ":")) and k != "user-agent"]

            async def onward() -> AsyncIterator[bytes]:
                async for r in requests:
                    yield renamed(r, concrete) if concrete else r

            try:
                async with self.limits.slot(model):
                    remaining = context.time_remaining()
                    answers = upstream(onward(), metadata=md, timeout=remaining if remaining is not None and remaining < 1e9 else None)
                    async for answer in answers:
                        yield answer
            except Overloaded as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return grpc.stream_stream_rpc_method_handler(call)


class LimitingProxy:
    """The pass-through: listens on (host, port), forwards to `upstream` ("host:port").
    With `rename`, a request for a model names the model's concrete id (the gateway's
    mm-model-id header) instead of the alias the client used: for servers that know a model only
    by the id the loader loaded it under (MLServer), as ModelMesh's proxy does."""

    def __init__(self, limits: ModelLimits, upstream: str, rename: bool = False):
        self.limits, self.upstream, self.rename = limits, upstream, rename
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a port the kernel picks); the port it listens on."""
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        self._server.add_generic_rpc_handlers((_Forward(self._channel, self.limits, self.rename),))
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"the concurrency-limiting proxy could not listen on {host}:{port}: is the port taken?")
        await self._server.start()
        log.info("gRPC pass-through%s on %s:%d -> %s", " (renaming to the model id)" if self.rename else "", host, bound, self.upstream)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)
        if self._channel is not None:
            await self._channel.close()
