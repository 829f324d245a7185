"""Kind: integration (the built-in runtime's gRPC server in-process on 127.0.0.1:0, fake models).
Issue 18: a model's own bug is INTERNAL with its message and no traceback; a model's IndexError
is not taken for 'model not found'; a malformed message is INVALID_ARGUMENT in plain words."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np

from meshserve_loader.builtin.codec import InferRequest
from meshserve_loader.builtin.table import Entry, Runtime
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_testing.runtime_grpc import runtime_channel


class Buggy:
    def __init__(self, exc: Exception):
        self.exc = exc

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        raise self.exc

    def metadata(self) -> dict[str, Any]:
        return {"platform": "custom", "inputs": [], "outputs": []}


class Echo(Buggy):
    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        return {"y": req.inputs[0].array}


def _request(model: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="r1")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    return req


async def _scenario() -> list[tuple[str, grpc.StatusCode, str]]:
    rt = Runtime(workers=1)
    for name, model in (("zero", Buggy(ZeroDivisionError("division by zero"))), ("index", Buggy(IndexError("list index out of range"))), ("echo", Echo(None))):  # type: ignore[arg-type]
        rt.models[name] = Entry(model, 1, time.time())
    out: list[tuple[str, grpc.StatusCode, str]] = []
    try:
        async with runtime_channel(rt) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            resp = await stub.ModelInfer(_request("echo"), timeout=10)
            out.append(("echo", grpc.StatusCode.OK, f"{resp.id} {list(resp.outputs[0].contents.fp32_contents)}"))
            raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString)
            cases = [
                ("zero", _request("zero").SerializeToString()),
                ("index", _request("index").SerializeToString()),
                ("truncated", _request("echo").SerializeToString()[:-3]),
                ("missing", _request("missing").SerializeToString()),
            ]
            for what, message in cases:
                try:
                    await raw(message, timeout=10)
                    out.append((what, grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as e:
                    out.append((what, e.code(), e.details() or ""))
            ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)  # other methods still registered
            out.append(("ready", grpc.StatusCode.OK, str(ready.ready)))
    finally:
        rt.close()
    return out


def test_grpc_errors_say_whose_fault_in_plain_words() -> None:
    got = {what: (code, details) for what, code, details in asyncio.run(asyncio.wait_for(_scenario(), 60))}
    assert got["echo"] == (grpc.StatusCode.OK, "r1 [1.0, 2.0]")
    assert got["zero"] == (grpc.StatusCode.INTERNAL, "model 'zero' failed: ZeroDivisionError: division by zero")
    assert got["index"] == (grpc.StatusCode.INTERNAL, "model 'index' failed: IndexError: list index out of range")
    code, details = got["truncated"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request is not a valid ModelInferRequest message")
    assert "DecodeError" not in details and "Traceback" not in details
    assert got["missing"] == (grpc.StatusCode.NOT_FOUND, "model 'missing' is not loaded on this runtime")
    assert got["ready"] == (grpc.StatusCode.OK, "True")


async def _stream_scenario(metadata: list[tuple[str, str]]) -> list[pb.ModelStreamInferResponse]:
    rt = Runtime(workers=1)
    for name, model in (("zero", Buggy(ZeroDivisionError("division by zero"))), ("echo", Echo(None))):  # type: ignore[arg-type]
        rt.models[name] = Entry(model, 1, time.time())
    try:
        async with runtime_channel(rt) as ch:
            raw = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
            ok, bug, other = _request("echo"), _request("zero"), _request("missing")
            ok.id, bug.id, other.id = "a", "bug", "other"
            sent = [ok.SerializeToString(), bug.SerializeToString(), ok.SerializeToString()[:-3], other.SerializeToString(),
                    ok.SerializeToString()]
            return [a async for a in raw(iter(sent), metadata=metadata, timeout=10)]
    finally:
        rt.close()


def test_a_stream_answers_each_request_and_goes_on_after_a_failure() -> None:
    """Triton's ModelStreamInfer on the built-in runtime, straight to it (no routing header:
    each request names its model, as on Triton): one answer per request, in order; a failed one
    carries its error and its request's id (Triton's stream_infer_handler.cc keeps the id), and
    the next request is answered."""
    got = asyncio.run(asyncio.wait_for(_stream_scenario([]), 60))
    assert len(got) == 5, got
    assert not got[0].error_message and got[0].infer_response.id == "a" and list(got[0].infer_response.outputs[0].contents.fp32_contents) == [1.0, 2.0]
    assert got[1].error_message == "model 'zero' failed: ZeroDivisionError: division by zero" and got[1].infer_response.id == "bug"
    assert "not a valid ModelInferRequest" in got[2].error_message and got[2].infer_response.id == ""
    assert got[3].error_message == "model 'missing' is not loaded on this runtime" and got[3].infer_response.id == "other"
    assert not got[4].error_message and got[4].infer_response.id == "a"


def test_a_routed_stream_refuses_a_request_for_another_model() -> None:
    """Through the gateway a stream carries one routing header for all its requests (the
    model of its header or first request): one naming another model is refused by name, not
    answered by the stream's model; the stream goes on."""
    got = asyncio.run(asyncio.wait_for(_stream_scenario([("mm-model-id", "echo")]), 60))
    assert [a.infer_response.id for a in got] == ["a", "bug", "", "other", "a"], got
    assert "this stream is for model 'echo', not 'zero'" in got[1].error_message and "one stream per model" in got[1].error_message
    assert "this stream is for model 'echo', not 'missing'" in got[3].error_message
    assert not got[0].error_message and not got[4].error_message
