"""The built-in runtime's gRPC listener: KServe v2 inference over the model table, with
ModelInfer taking and returning bytes (parsed on an inference thread); the repository methods
are refused here (the control port has them)."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from meshserve import wire
from meshserve.headers import AWAIT_LOAD_HEADER
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_loader.builtin import binary, codec, payloads
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_loader.builtin.table import REPOSITORY_ELSEWHERE, MODEL_ID_HEADER, Entry, ModelNotFound, Runtime

log = logging.getLogger("meshserve.runtime")


class GrpcServicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, rt: Runtime):
        self.rt = rt

    def _name(self, context: grpc.aio.ServicerContext, fallback: str) -> str:
        """The routing header, else `fallback` (the message's name); either may be an alias
        (Runtime.resolve). "" stays "": ModelInfer then reads the name from the message."""
        name = fallback
        for k, v in context.invocation_metadata() or ():
            if k == MODEL_ID_HEADER:
                name = v
                break
        return self.rt.resolve(name) if name else name

    async def ServerLive(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=self.rt.name, version="0.1.0", extensions=["binary_tensor_data"])

    async def _await_load(self, context: grpc.aio.ServicerContext) -> None:
        """A call the activator sent ahead of its model's load waits for the load to end
        (Runtime.await_load; the REST port's `awaiting_load` middleware does the same)."""
        md = dict(context.invocation_metadata() or ())
        await self.rt.await_sent_ahead(md.get(MODEL_ID_HEADER), md.get(AWAIT_LOAD_HEADER), gone=context.done)

    async def ModelReady(self, request, context):  # noqa: N802
        await self._await_load(context)
        return pb.ModelReadyResponse(ready=self._name(context, request.name) in self.rt.models)

    async def ModelMetadata(self, request, context):  # noqa: N802
        await self._await_load(context)
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
        await self._await_load(context)
        try:
            return await self._infer(request, self._name(context, ""), context)
        except InferFailed as e:
            await context.abort(e.code, e.message)

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes], context):  # noqa: N802
        """Triton's stream: each request answered in turn, in the order they came (Triton's for
        a model that is not decoupled). A request that fails gets an answer with its error and
        its id (Triton: "repopulate the id so that client knows which request failed",
        src/grpc/stream_infer_handler.cc) and the stream goes on. Without a routing header each
        request names its own model, as on Triton. With one (the gateway's, set once for the
        stream, from its header or its first request) every request goes to that model, so one
        that names another than the first did is refused rather than answered by the wrong one."""
        await self._await_load(context)
        name = self._name(context, "")
        first: list[str] = []  # the model the stream's first request named

        def one_model(m: pb.ModelInferRequest) -> None:
            if not first:
                first.append(m.model_name)
            elif m.model_name and first[0] and m.model_name != first[0]:
                raise codec.CodecError(f"this stream is for model '{first[0]}', not '{m.model_name}': the gateway routes a "
                                       "stream by its first request, so open one stream per model")

        async for request in requests:
            try:
                answer = await self._infer(request, name, context, one_model if name else None)
            except InferFailed as e:
                yield pb.ModelStreamInferResponse(error_message=e.message, infer_response=pb.ModelInferResponse(id=e.request_id)).SerializeToString()
                continue
            yield wire.length_delimited(STREAM_ANSWER_FIELD, answer)  # no re-parse of the answer

    async def _infer(self, request: bytes, name: str, context: grpc.aio.ServicerContext,
                     check: Callable[[pb.ModelInferRequest], None] | None = None) -> bytes:
        """One ModelInferRequest's serialized answer; InferFailed (with the gRPC status) if not."""
        code = "200"
        answer: bytes | None = None
        msg: pb.ModelInferRequest | None = None
        try:
            if not name:  # no routing header: the name is inside the message
                msg = await asyncio.get_running_loop().run_in_executor(self.rt._pool, parse_infer_request, request)
                if check is not None:
                    check(msg)
                name = self.rt.resolve(msg.model_name)

            def work(e: Entry) -> bytes:
                nonlocal msg
                parsed = msg is not None
                msg = m = msg if msg is not None else parse_infer_request(request)
                if check is not None and not parsed:
                    check(m)
                out = self.rt.infer(name, codec.decode_grpc_request(m), e)
                if m.raw_input_contents:  # raw in, raw out (see binary.py)
                    return binary.raw_grpc_response(name, m.id, out).SerializeToString()
                return codec.encode_grpc_response(name, m.id, out).SerializeToString()

            answer = await self.rt.run(name, work)
            return answer
        except ModelNotFound as e:
            code = "404"
            raise InferFailed(grpc.StatusCode.NOT_FOUND, str(e), msg) from None
        except codec.CodecError as e:
            code = "400"
            raise InferFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e), msg) from None
        except Exception as e:  # a model's own bug: INTERNAL with its message, never a traceback
            code = "500"
            log.exception("inference failed for %s", name)
            raise InferFailed(grpc.StatusCode.INTERNAL, f"model '{name}' failed: {type(e).__name__}: {e}", msg) from None
        finally:
            self.rt.m_requests.labels(name, code).inc()
            if self.rt.payloads is not None:  # ModelMesh's payload processors: the bytes as they came and went
                self.rt.payloads.record(name, request, answer, payloads.status_of_http(int(code)), context.invocation_metadata() or ())

    # The gRPC port is the data port, reachable from the pod network: no repository API here (the
    # loader uses the REST control port).
    async def RepositoryIndex(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_ELSEWHERE)


GRPC_MAX_MESSAGE = MAX_REQUEST_BYTES
STREAM_ANSWER_FIELD = pb.ModelStreamInferResponse.INFER_RESPONSE_FIELD_NUMBER


class InferFailed(Exception):
    """A request's failure as a gRPC status: the unary call aborts with it, a stream answers it."""

    def __init__(self, code: grpc.StatusCode, message: str, msg: "pb.ModelInferRequest | None"):
        super().__init__(message)
        self.code, self.message = code, message
        self.request_id = msg.id if msg is not None else ""


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
        if m.name == "ModelStreamInfer":  # bytes both ways, as ModelInfer
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer, request_deserializer=_identity, response_serializer=_identity)
            continue
        raw = m.name == "ModelInfer"
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_identity if raw else getattr(pb, m.input_type.name).FromString,
            response_serializer=_identity if raw else getattr(pb, m.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
