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
from meshserve_loader.builtin.grpc_api import GrpcServicer, add_servicer
from meshserve_loader.builtin.table import Entry, Runtime
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg


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
    server = grpc.aio.server()
    add_servicer(server, GrpcServicer(rt))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: list[tuple[str, grpc.StatusCode, str]] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
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
        await server.stop(0)
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
