"""The activator's gRPC side: any GRPCInferenceService call for a cold model is held until a
copy is loaded, then forwarded to that pod, or sent ahead to the pod loading it (activator.py
"Sent ahead"), as on REST: the same `Activator.serve_cold`."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

import grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve import tracing
from meshserve.store import keys as k
from meshserve.headers import MODEL_ID_HEADER, VMODEL_ID_HEADER
from meshserve.model import Pod
from meshserve_placement import repository_api as repo
from meshserve_placement.activator import SERVER_METADATA, Activator, Ahead
from meshserve_placement.coldpath import M_COLD, LoadFailed
from meshserve_proto import grpc_predict_v2_pb2 as pb


INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def serve_on(server: grpc.aio.Server, act: Activator) -> None:
    """The gateway's own gRPC API on `server`: the activator's GRPCInferenceService, and server
    reflection describing it, so that grpcurl, Postman and grpcui work without the .proto file
    (the gateway routes every /grpc.reflection. call here: docs/design/routing.md, "Server reflection")."""
    server.add_generic_rpc_handlers((GrpcActivator(act),))
    reflection.enable_server_reflection((INFERENCE_SERVICE, reflection.SERVICE_NAME), server)


class GrpcActivator(grpc.GenericRpcHandler):
    """Forwards any GRPCInferenceService call for a cold model once it is loaded."""

    SERVICE = "/inference.GRPCInferenceService/"
    # Where each request message carries the model name (field 1 in every one of these).
    NAMED = {"ModelInfer": pb.ModelInferRequest, "ModelMetadata": pb.ModelMetadataRequest, "ModelReady": pb.ModelReadyRequest}
    # Triton's model repository extension, as REST's /v2/repository (the same Activator calls).
    REPOSITORY = {"RepositoryIndex": "_index", "RepositoryModelLoad": "_load", "RepositoryModelUnload": "_unload"}

    def __init__(self, act: Activator):
        self.act = act
        self._channels: dict[str, grpc.aio.Channel] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(self.SERVICE):
            return None
        name = method[len(self.SERVICE) :]
        if name == "ServerLive":
            return grpc.unary_unary_rpc_method_handler(self._live)
        if name == "ServerReady":
            return grpc.unary_unary_rpc_method_handler(self._ready)
        if name == "ServerMetadata":
            return grpc.unary_unary_rpc_method_handler(self._metadata)
        if name in self.REPOSITORY:
            return grpc.unary_unary_rpc_method_handler(getattr(self, self.REPOSITORY[name]))
        if name in self.NAMED:
            return grpc.unary_unary_rpc_method_handler(self._forwarder(method, self.NAMED[name]))
        if name == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return None

    async def _live(self, request: bytes, context: Any) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def _ready(self, request: bytes, context: Any) -> bytes:
        return pb.ServerReadyResponse(ready=await self.act.state.r.hlen(k.PODS) > 0).SerializeToString()

    async def _metadata(self, request: bytes, context: Any) -> bytes:
        return pb.ServerMetadataResponse(**SERVER_METADATA).SerializeToString()

    async def _index(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = await _parse(pb.RepositoryIndexRequest, request, context)
        index = await self.act.repository_index()
        models = [pb.RepositoryIndexResponse.ModelIndex(**m) for m in index if not req.ready or m["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=models).SerializeToString()

    async def _load(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = await _parse(pb.RepositoryModelLoadRequest, request, context)
        await _check(context, repo.check_repository_name, req.repository_name, grpc.StatusCode.UNIMPLEMENTED)
        await _check(context, repo.check_load_parameters, list(req.parameters))
        try:
            await self.act.explicit_load(req.model_name)
        except LoadFailed as e:
            await context.abort(grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.RepositoryModelLoadResponse().SerializeToString()

    async def _unload(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = await _parse(pb.RepositoryModelUnloadRequest, request, context)
        await _check(context, repo.check_repository_name, req.repository_name, grpc.StatusCode.UNIMPLEMENTED)
        ud = req.parameters["unload_dependents"] if "unload_dependents" in req.parameters else pb.ModelRepositoryParameter(bool_param=False)
        kind = ud.WhichOneof("parameter_choice")
        await _check(context, repo.check_unload_dependents, getattr(ud, kind) if kind else None)
        try:
            await self.act.explicit_unload(req.model_name)
        except LoadFailed as e:
            await context.abort(grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.RepositoryModelUnloadResponse().SerializeToString()

    def _forwarder(self, method: str, msg_type: Any) -> Any:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            md = dict(context.invocation_metadata() or ())
            name = md.get(MODEL_ID_HEADER) or md.get(VMODEL_ID_HEADER)
            if not name:
                try:
                    msg = msg_type.FromString(request)
                except Exception:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid protobuf message")
                name = getattr(msg, "model_name", "") or getattr(msg, "name", "")
            if not name:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no model named: set mm-vmodel-id or the request's model name")
            with tracing.tracer(__name__).start_as_current_span(
                "activator.request", context=tracing.extract(md), kind=SpanKind.SERVER,
                attributes={"meshserve.protocol": "grpc", "meshserve.name": name, "rpc.method": method},
                record_exception=False, set_status_on_exception=False,  # context.abort raises: statuses are set below
            ) as span:
                return await self._cold(method, request, context, md, name, span)

        return forward

    async def _cold(self, method: str, request: bytes, context: grpc.aio.ServicerContext, md: dict[str, Any], name: str, span: trace.Span) -> bytes:
        self.act.cold_requests += 1
        t0 = time.monotonic()
        try:
            model_id = await self.act.resolve(name)
        except LoadFailed as e:
            M_COLD.labels("grpc", str(e.status)).inc()
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        span.set_attribute(tracing.ATTR_MODEL, model_id)
        drop = (MODEL_ID_HEADER, VMODEL_ID_HEADER, tracing.TRACEPARENT, tracing.TRACESTATE)
        fwd_md = [(h, v) for h, v in md.items() if h not in drop and not h.startswith(":")]
        fwd_md.append((MODEL_ID_HEADER, model_id))

        async def send(pod: Pod, ahead: Ahead | None = None) -> tuple[int, bytes | grpc.aio.AioRpcError]:
            """The call's answer, or the pod's error (NOT_FOUND as a 404: the copy went, or the
            load it was sent ahead of did not bring it; serve_cold then waits for a copy again)."""
            ch = self._channel(pod)
            with tracing.handling(model_id), tracing.tracer(__name__).start_as_current_span(
                "activator.forward", kind=SpanKind.CLIENT, attributes={tracing.ATTR_MODEL: model_id, tracing.ATTR_POD: pod.id}
            ) as fspan:
                call_md = fwd_md + list(tracing.inject({}).items()) + (list(ahead.headers().items()) if ahead else [])
                try:
                    out = await ch.unary_unary(method)(request, metadata=call_md)
                except grpc.aio.AioRpcError as e:
                    fspan.set_status(Status(StatusCode.ERROR, f"{e.code().name}: {e.details()}"))
                    if ahead is not None and e.code() != grpc.StatusCode.UNAVAILABLE:
                        ahead.answered = True  # the runtime's own status, not a broken connection
                    return (404 if e.code() == grpc.StatusCode.NOT_FOUND else 500), e
                if ahead is not None:
                    ahead.answered = True
                return 200, out

        try:
            out = await self.act.serve_cold(model_id, "grpc", t0, send)
        except LoadFailed as e:
            code = grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.UNAVAILABLE
            if e.status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(e)))
            await context.abort(code, str(e))
        if isinstance(out, grpc.aio.AioRpcError):
            span.set_status(Status(StatusCode.ERROR, f"{out.code().name}: {out.details()}"))
            await context.abort(out.code(), out.details() or "")
        return out


    def _stream(self, method: str) -> Any:
        """ModelStreamInfer for a cold model (the gateway routes a warm one itself, by its header
        or its first request's model). The model is the header's, else the first request's;
        the stream goes on to a pod once the model is loaded there, the requests and answers
        passed through as they come. Not sent ahead of a load: a stream is held whole until
        its copy is loaded."""

        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            md = dict(context.invocation_metadata() or ())
            name = md.get(MODEL_ID_HEADER) or md.get(VMODEL_ID_HEADER)
            incoming = requests.__aiter__()
            first: bytes | None = None
            if not name:
                try:
                    first = await incoming.__anext__()
                except StopAsyncIteration:
                    return  # closed before its first request: nothing to answer
                name = (await _parse(pb.ModelInferRequest, first, context)).model_name
            if not name:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no model named: set mm-vmodel-id or the first request's model name")
            self.act.cold_requests += 1
            try:
                model_id = await self.act.resolve(name)
                pod = await self.act.ensure_loaded(model_id)
            except LoadFailed as e:
                M_COLD.labels("grpc", str(e.status)).inc()
                await context.abort(grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.UNAVAILABLE, str(e))
            M_COLD.labels("grpc", "200").inc()
            self.act.touch_soon(model_id)
            drop = (MODEL_ID_HEADER, VMODEL_ID_HEADER, tracing.TRACEPARENT, tracing.TRACESTATE)
            call_md = [(h, v) for h, v in md.items() if h not in drop and not h.startswith(":")] + [(MODEL_ID_HEADER, model_id)]

            async def onward() -> AsyncIterator[bytes]:
                if first is not None:
                    yield first
                async for r in incoming:
                    yield r

            try:
                async for answer in self._channel(pod).stream_stream(method)(onward(), metadata=call_md):
                    yield answer
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return stream

    def _channel(self, pod: Pod) -> grpc.aio.Channel:
        ch = self._channels.get(pod.id)
        if ch is None:
            ch = self._channels[pod.id] = grpc.aio.insecure_channel(f"{pod.host}:{pod.grpc_port}")
        return ch


async def _parse(msg_type: Any, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return msg_type.FromString(raw)
    except Exception:  # noqa: BLE001 - any decode failure is the caller's bad message
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid protobuf message")


async def _check(context: grpc.aio.ServicerContext, check: Any, value: Any, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    try:
        check(value)
    except repo.RepositoryBodyError as e:
        await context.abort(code, str(e))
