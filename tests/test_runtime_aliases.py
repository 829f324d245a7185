"""Kind: unit (the built-in runtime in-process, its REST app on aiohttp's test server, its gRPC
servicer on a real grpc.aio server on 127.0.0.1:0). The runtime finds a model by its alias as
well as its id (docs/design/routing.md "Shared routes"): the gateway may send a request by the
name the client used, in the path, the `mm-model-id` header, the gRPC message or the /v1 body.
Two loaded models with one alias (a rollout): the one loaded first, until it unloads."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshserve_testing.runtime_grpc import runtime_channel
from meshserve_loader.builtin.http_api import build_rest_app
from meshserve_loader.builtin.table import Runtime
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

OLD, NEW = "a__isvc-0000000001", "a__isvc-0000000002"
BODY = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}


async def _runtime(tmp_path: Path) -> Runtime:
    rt = Runtime()
    for m, text in ((OLD, "old"), (NEW, "new")):
        (tmp_path / m).mkdir()
        (tmp_path / m / "m.txt").write_text(text)
        await rt.load(m, "string", str(tmp_path / m), {"alias": "a"})
    return rt


def _said(doc: dict) -> str:
    return doc["outputs"][0]["data"][0]


async def test_rest_by_alias_in_the_path_or_the_header(tmp_path: Path) -> None:
    rt = await _runtime(tmp_path)
    try:
        async with TestClient(TestServer(build_rest_app(rt))) as c:
            r = await c.post("/v2/models/a/infer", json=BODY)
            doc = await r.json()
            assert r.status == 200 and _said(doc) == "old" and doc["model_name"] == OLD  # loaded first; the id answers
            r = await c.post("/v2/models/a/infer", json=BODY, headers={"mm-model-id": "a"})
            assert _said(await r.json()) == "old"
            r = await c.post("/v2/models/a/infer", json=BODY, headers={"mm-model-id": NEW})  # an id is exact
            assert _said(await r.json()) == "new"
            assert (await c.get("/v2/models/a/ready")).status == 200
            assert (await (await c.get("/v2/models/a")).json())["name"] == OLD
            assert (await c.post("/v2/models/b/infer", json=BODY)).status == 404
            rt.unload(OLD)  # the rollout's old version goes: the alias means the new one
            r = await c.post("/v2/models/a/infer", json=BODY)
            assert _said(await r.json()) == "new"
            rt.unload(NEW)
            r = await c.post("/v2/models/a/infer", json=BODY)
            assert r.status == 404 and "'a'" in (await r.json())["error"]
            assert rt.aliases == {} and rt.alias_of == {}
    finally:
        rt.close()


async def test_grpc_by_alias_in_the_message_or_the_header(tmp_path: Path) -> None:
    rt = await _runtime(tmp_path)
    try:
        async with runtime_channel(rt) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            req = pb.ModelInferRequest(model_name="a", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"x"]))])
            resp = await stub.ModelInfer(req, timeout=10)
            assert resp.model_name == OLD and resp.outputs[0].contents.bytes_contents == [b"old"]
            resp = await stub.ModelInfer(req, metadata=[("mm-model-id", "a")], timeout=10)
            assert resp.model_name == OLD
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="a"), timeout=10)).ready
            assert (await stub.ModelMetadata(pb.ModelMetadataRequest(name="a"), timeout=10)).name == OLD
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(pb.ModelInferRequest(model_name="b"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        rt.close()


async def test_a_load_without_an_alias_answers_to_its_id_only(tmp_path: Path) -> None:
    rt = Runtime()
    try:
        (tmp_path / "m.txt").write_text("x")
        await rt.load(OLD, "string", str(tmp_path), {})
        assert rt.resolve("a") == "a" and rt.resolve(OLD) == OLD
    finally:
        rt.close()
